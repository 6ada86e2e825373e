"""Blob bytes from an OCI distribution registry: ranged `GET /v2/<repo>/blobs/sha256:<id>`.

- Range requests; a 206 must carry the Content-Range asked for. A registry that ignores
  Range and answers 200 with the whole blob still works (the range is cut out of the stream,
  which is then dropped), logged once per source.
- Redirects (301/302/303/307/308, typically to object storage) are followed here, not by
  aiohttp, so the Authorization header stays with the registry and the storage URL can be
  cached per blob; a cached URL that stops working (401/403/404/410, other 4xx, expiry) is
  dropped and the blob re-resolved through the registry.
- Auth: anonymous, basic, or Bearer tokens from the challenge's realm (see fetcher.auth).
- Bounded retries with exponential backoff on connection errors, timeouts, 5xx and 429
  (honouring Retry-After). 404 / 416 / auth failures are final.
- Credentials and Authorization headers are never logged; storage URLs are logged without
  their query strings (presigned signatures).
"""
from __future__ import annotations

import asyncio
import logging
import random
import re
import ssl
import time

import aiohttp
from yarl import URL

from fetcher.auth import (RegistryAuth, TransientAuthError, _strip_query, make_credentials,
                          parse_retry_after)
from fetcher.source import SourceError, check_blob_id

log = logging.getLogger("fscached.fetcher.registry")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE = re.compile(r"\s*bytes\s+\*/(\d+)\s*$")
_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECT_HOPS = 5


class _Retry(Exception):
    """One attempt failed in a way worth another try."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _StaleRedirect(Exception):
    """The cached storage URL no longer answers: resolve through the registry again."""


class RegistrySource:
    """BlobSource over the OCI distribution API for one repository."""

    def __init__(
        self,
        host: str,
        repo: str,
        scheme: str = "https",
        username: str | None = None,
        password: str | None = None,
        auth: str | None = None,
        ca_file: str | None = None,
        skip_verify: bool = False,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        max_retry_after: float = 30.0,
        pool_size: int = 32,
        redirect_ttl: float = 300.0,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, not {scheme!r}")
        if not host or "/" in host or "@" in host:
            raise ValueError(f"host must be host[:port], not {host[:80]!r}")
        repo = repo.strip("/")
        if not re.fullmatch(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*", repo):
            raise ValueError(f"invalid repository name {repo[:200]!r}")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.host = host
        self.repo = repo
        self.scheme = scheme
        self.base = f"{scheme}://{host}"
        self.name = f"registry {host}/{repo}"
        self.ca_file = ca_file
        self.skip_verify = skip_verify
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.pool_size = pool_size
        self.redirect_ttl = redirect_ttl
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._auth = RegistryAuth(f"{scheme}://{host}", repo, make_credentials(username, password, auth))
        self._ssl = self._ssl_context() if scheme == "https" else None
        self._session: aiohttp.ClientSession | None = None
        self._redirects: dict[str, tuple[URL, float]] = {}
        self._warned_full_body = False
        self._closed = False
        self.stats = {"requests": 0, "retries": 0, "redirects_resolved": 0, "redirects_reused": 0}

    def __repr__(self) -> str:
        return f"RegistrySource({self.base}/{self.repo}, auth={self._auth.scheme or 'anonymous'})"

    # -- credentials for helpers that fetch on our behalf ------------------------------------
    _auth_probed = False

    async def auth_headers(self) -> dict[str, str]:
        """The Authorization header for this repository's blobs, for a helper that fetches them
        on our behalf (a Dragonfly peer going back to source); {} when anonymous access works.
        The first call learns the registry's scheme with one GET /v2/ (fetching a token for a
        Bearer registry); expired tokens are renewed. Raises SourceError."""
        session = self._get_session()
        try:
            if self._auth.scheme is None and not self._auth_probed:
                url = f"{self.base}/v2/"
                try:
                    async with session.get(url, allow_redirects=False) as resp:
                        status, challenge = resp.status, resp.headers.get("WWW-Authenticate")
                except aiohttp.ClientSSLError as exc:
                    raise SourceError(f"registry {self.base}: TLS error: {exc}") from None
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise SourceError(f"registry {self.base}: cannot reach {url}: {type(exc).__name__}") from None
                if status == 401:
                    await self._auth.on_unauthorized(challenge, None, session, self.timeout)
                self._auth_probed = True
            elif self._auth.needs_refresh():
                await self._auth.refresh(session, self.timeout)
        except TransientAuthError as exc:
            raise SourceError(f"registry {self.base}: {exc}") from None
        value = self._auth.header()
        return {"Authorization": value} if value else {}

    # -- plumbing ----------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load CA file {self.ca_file}: {exc}") from exc
        if self.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise SourceError(f"registry {self.base}: source is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.pool_size, ssl=self._ssl if self._ssl else False,
                                             enable_cleanup_closed=False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                                  auto_decompress=False, trust_env=False)
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "RegistrySource":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _open(self, session: aiohttp.ClientSession, url: URL, headers: dict[str, str], blob_id: str):
        """One blob GET (registry or storage URL), as an async context manager yielding the
        response. A hook: the Dragonfly proxy source sends it through its proxy."""
        return session.get(url, headers=headers, allow_redirects=False)

    def blob_url(self, blob_id: str) -> str:
        return f"{self.base}/v2/{self.repo}/blobs/sha256:{blob_id}"

    # -- the BlobSource method ---------------------------------------------------------------
    async def read(self, blob_id: str, offset: int, length: int, *, prefetch: bool = False) -> bytes:
        check_blob_id(blob_id)
        if not _SHA256_HEX.fullmatch(blob_id):
            raise SourceError(f"blob {blob_id[:80]}: not a sha256 hex digest, cannot name a registry blob")
        if offset < 0 or length < 0:
            raise SourceError(f"blob {blob_id}: invalid range offset={offset} length={length}")
        if length == 0:
            return b""
        session = self._get_session()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
            try:
                return await self._attempt(session, blob_id, offset, length)
            except (_Retry, TransientAuthError) as exc:
                last = str(exc)
                if attempt == self.retries:
                    break
                delay = min(self.max_backoff, self.backoff * (2 ** attempt))
                delay *= 0.5 + random.random() / 2  # jitter
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.max_retry_after))
                log.info("registry %s: blob %s [%d+%d]: %s; retry %d/%d in %.2fs", self.base, blob_id,
                         offset, length, last, attempt + 1, self.retries, delay)
                await asyncio.sleep(delay)
        raise SourceError(f"registry {self.base}: blob {blob_id} [{offset}+{length}]: giving up after "
                          f"{self.retries + 1} attempts: {last}")

    async def _attempt(self, session: aiohttp.ClientSession, blob_id: str, offset: int, length: int) -> bytes:
        cached = self._redirects.get(blob_id)
        if cached is not None:
            url, expires = cached
            if time.monotonic() < expires:
                try:
                    data = await self._get(session, url, blob_id, offset, length, authorize=False, cached=True)
                    self.stats["redirects_reused"] += 1
                    return data
                except _StaleRedirect as exc:
                    log.info("registry %s: blob %s: cached storage URL failed (%s); re-resolving",
                             self.base, blob_id, exc)
                except _Retry:
                    self._redirects.pop(blob_id, None)
                    raise
            self._redirects.pop(blob_id, None)
        return await self._get(session, URL(self.blob_url(blob_id)), blob_id, offset, length,
                               authorize=True, cached=False)

    async def _get(self, session: aiohttp.ClientSession, url: URL, blob_id: str, offset: int, length: int,
                   authorize: bool, cached: bool) -> bytes:
        end = offset + length - 1
        registry_origin = URL(self.base).origin()
        auth_retried = False
        hops = 0
        while True:
            headers = {"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"}
            send_auth = authorize and url.origin() == registry_origin
            sent = None
            if send_auth:
                if self._auth.needs_refresh():
                    await self._auth.refresh(session, self.timeout)
                sent = self._auth.header()
                if sent is not None:
                    headers["Authorization"] = sent
            where = f"{url.scheme}://{url.host}:{url.port}{url.path}"
            self.stats["requests"] += 1
            try:
                async with self._open(session, url, headers, blob_id) as resp:
                    status = resp.status
                    if status in (200, 206):
                        data = await self._body(resp, blob_id, offset, length)
                        if hops and not cached:
                            self._redirects[blob_id] = (url, time.monotonic() + self.redirect_ttl)
                            self.stats["redirects_resolved"] += 1
                        return data
                    if status in _REDIRECTS:
                        location = resp.headers.get("Location")
                        if not location:
                            raise SourceError(f"registry {self.base}: blob {blob_id}: HTTP {status} without Location")
                        hops += 1
                        if hops > MAX_REDIRECT_HOPS:
                            raise SourceError(f"registry {self.base}: blob {blob_id}: more than "
                                              f"{MAX_REDIRECT_HOPS} redirects")
                        url = url.join(URL(location, encoded=True))
                        if url.scheme not in ("http", "https"):
                            raise SourceError(f"registry {self.base}: blob {blob_id}: redirect to "
                                              f"unsupported scheme {url.scheme!r}")
                        log.debug("registry %s: blob %s redirected to %s", self.base, blob_id,
                                  _strip_query(str(url)))
                        continue
                    if status == 401 and send_auth:
                        if auth_retried:
                            raise self._auth.denied()
                        auth_retried = True
                        await self._auth.on_unauthorized(resp.headers.get("WWW-Authenticate"), sent,
                                                         session, self.timeout)
                        continue
                    if cached:
                        if status == 429 or status >= 500:
                            raise _Retry(f"storage {where}: HTTP {status}",
                                         parse_retry_after(resp.headers.get("Retry-After"), self.max_retry_after))
                        raise _StaleRedirect(f"HTTP {status}")
                    self._fail(resp, where, blob_id, offset, length)
            except aiohttp.ClientSSLError as exc:  # certificate problems do not heal by retrying
                raise SourceError(f"registry {self.base}: TLS error talking to {where}: {exc}") from None
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                if cached:
                    self._redirects.pop(blob_id, None)
                raise _Retry(f"{where}: {type(exc).__name__}: {exc}" if str(exc) else
                             f"{where}: {type(exc).__name__}") from None
            except aiohttp.ClientResponseError as exc:
                raise _Retry(f"{where}: {type(exc).__name__}: {exc.status} {exc.message}") from None
            except aiohttp.InvalidURL:
                raise SourceError(f"registry {self.base}: blob {blob_id}: invalid URL {_strip_query(str(url))}") from None

    def _fail(self, resp: aiohttp.ClientResponse, where: str, blob_id: str, offset: int, length: int) -> None:
        status = resp.status
        what = f"registry {self.base}: blob {blob_id} in {self.repo}"
        if status == 429 or status >= 500:
            raise _Retry(f"{where}: HTTP {status}",
                         parse_retry_after(resp.headers.get("Retry-After"), self.max_retry_after))
        if status == 416:
            m = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
            size = f"the blob has {m.group(1)} bytes" if m else "range not satisfiable"
            raise SourceError(f"{what}: read past end: wanted bytes {offset}..{offset + length} but {size} (HTTP 416)")
        if status == 404:
            raise SourceError(f"{what}: not found (HTTP 404)")
        if status == 401:
            raise SourceError(f"{what}: HTTP 401 unauthorized at {where}")
        if status == 403:
            raise SourceError(f"{what}: HTTP 403 forbidden at {where}")
        raise SourceError(f"{what}: unexpected HTTP {status} {resp.reason or ''} at {where}".rstrip())

    async def _body(self, resp: aiohttp.ClientResponse, blob_id: str, offset: int, length: int) -> bytes:
        what = f"registry {self.base}: blob {blob_id}"
        if resp.status == 206:
            header = resp.headers.get("Content-Range", "")
            m = _CONTENT_RANGE.match(header)
            if not m:
                raise SourceError(f"{what}: 206 with unusable Content-Range {header[:100]!r}")
            first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
            if first != offset or last < first:
                raise SourceError(f"{what}: asked for bytes {offset}-{offset + length - 1}, got {first}-{last}")
            if last != offset + length - 1:
                size = f"the blob has {total} bytes" if total != "*" else f"the server sent only up to {last}"
                raise SourceError(f"{what}: read past end: wanted bytes {offset}..{offset + length} but {size}")
            data = await resp.read()
            if len(data) != length:
                raise _Retry(f"{what}: short body: {len(data)} of {length} bytes")
            return data
        # 200: the whole blob. Take the range out of the stream and drop the connection.
        if not self._warned_full_body:
            self._warned_full_body = True
            log.warning("registry %s ignores Range requests (HTTP 200 with the whole blob); reading "
                        "through to the wanted bytes (logged once)", self.base)
        total = resp.content_length
        if total is not None and offset + length > total:
            resp.close()
            raise SourceError(f"{what}: read past end: wanted bytes {offset}..{offset + length} "
                              f"but the blob has {total} bytes")
        skip, buf = offset, bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
            buf += chunk
            if len(buf) >= length:
                break
        resp.close()  # do not read the rest of a possibly huge blob
        if len(buf) < length:
            if total is None:
                raise SourceError(f"{what}: read past end: wanted bytes {offset}..{offset + length} "
                                  f"but the blob has {offset - skip + len(buf)} bytes")
            raise _Retry(f"{what}: short body")
        return bytes(buf[:length])
