"""Blob bytes from an OCI distribution registry: ranged `GET /v2/<repo>/blobs/sha256:<id>`.

- Range requests, their answers read by fetcher.range_body: a 206 must carry the
  Content-Range asked for; a 200 holding just the bytes asked for is taken (as nydusd does);
  a registry that ignores Range and answers 200 with the whole blob still works (the range
  is cut out of the stream, which is then dropped); any other 200 is refused. A 200 is
  logged once per source and kind.
- Redirects (301/302/303/307/308, typically to object storage) are followed here, not by
  aiohttp, so the Authorization header stays with the registry and the storage URL can be
  cached per blob; a cached URL that stops working (401/403/404/410, other 4xx, expiry) is
  dropped and the blob re-resolved through the registry.
- Auth: anonymous, basic, or Bearer tokens from the challenge's realm (see fetcher.auth).
- Bounded retries with exponential backoff on connection errors, timeouts, 5xx and 429
  (honouring Retry-After). 404 / 416 / auth failures are final.
- Credentials and Authorization headers are never logged; storage URLs are logged without
  their query strings (presigned signatures).

The same machinery serves whole-document GETs for other parts of fscached (the bootstrap
puller, fetcher.pull): `RegistrySource.get(path, consume, ...)` fetches a manifest, an index
or a whole blob with the auth, redirect, retry, timeout and credential rules above and hands
the 200 response to `consume`. A request that fails for good raises `RegistryError` (a
SourceError naming the registry, the request and the reason, apart in `.what` / `.why`).

Writes, for pushing a start-up profile next to an image (fetcher.referrers): `blob_exists`
(HEAD), `upload_blob` (monolithic POST + PUT upload, the digest checked by the registry) and
`put_manifest`. They use the same auth (Basic, or a Bearer token asked for
`repository:<repo>:pull,push`, kept apart from the pull token reads use), retries and error
rules; redirects are not followed for POST / PUT (the registry's own upload URL is used).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import ssl
import time
from typing import Any, AsyncContextManager, Awaitable, Callable, NoReturn, TypeVar

import aiohttp
from yarl import URL

from fetcher.auth import (AuthError, Credentials, RegistryAuth, TransientAuthError, make_credentials,
                          parse_retry_after, strip_query)
from fetcher.link import LinkEstimate
from fetcher.range_body import BodyKind, ShortBody, read_range_body
from fetcher.source import SourceError, check_blob_id

log = logging.getLogger("fscached.fetcher.registry")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_UNSATISFIED_RANGE = re.compile(r"\s*bytes\s+\*/(\d+)\s*$")
_REDIRECTS = (301, 302, 303, 307, 308)
# what RegistrySource.get may fetch: a manifest / index by tag or digest, a blob by digest
_GET_PATH = re.compile(r"manifests/(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|sha256:[0-9a-f]{64})"
                       r"|(?:blobs|referrers)/sha256:[0-9a-f]{64}")
_MANIFEST_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|sha256:[0-9a-f]{64}")
MAX_REDIRECT_HOPS = 5
T = TypeVar("T")


class RetryableError(Exception):
    """One attempt failed in a way worth another try (connection error, timeout, 5xx, 429, a
    short body). A `consume` callback of RegistrySource.get may raise it too."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RegistryError(SourceError):
    """A registry request failed for good (after its retries, or at once for 4xx, auth, TLS,
    redirect problems). `what` names the request ("blob <id>", "manifest"), `why` what went
    wrong; `status` is the last HTTP status when there was one."""

    def __init__(self, base: str, what: str, why: str, status: int | None = None) -> None:
        super().__init__(f"registry {base}: {what}: {why}")
        self.what = what
        self.why = why
        self.status = status


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
        credentials = make_credentials(username, password, auth)
        self._auth = RegistryAuth(f"{scheme}://{host}", repo, credentials)
        # writes only (uploads, manifest PUTs): its own Bearer token with push scope
        self._push_auth = RegistryAuth(f"{scheme}://{host}", repo, credentials, actions="pull,push")
        self._ssl = self._ssl_context() if scheme == "https" else None
        self._session: aiohttp.ClientSession | None = None
        self._redirects: dict[str, tuple[URL, float]] = {}
        self._told_200: set[BodyKind] = set()  # the kinds of 200 answers to ranges logged so far
        self._closed = False
        self.stats = {"requests": 0, "retries": 0, "redirects_resolved": 0, "redirects_reused": 0}
        self.link = LinkEstimate()  # what a ranged read costs on this registry's link (fetcher.link)

    def __repr__(self) -> str:
        return f"RegistrySource({self.base}/{self.repo}, auth={self._auth.scheme or 'anonymous'})"

    # -- credentials for helpers that fetch on our behalf ------------------------------------
    _auth_probed = False

    @property
    def credentials(self) -> Credentials | None:
        """The credentials this source authenticates with now (renewed ones included)."""
        return self._auth.credentials

    def renew_credentials(self, credentials: Credentials | None) -> None:
        """New credentials for reads and writes alike (RegistryAuth.renew)."""
        self._auth.renew(credentials)
        self._push_auth.renew(credentials)

    def seed_token(self, token: str) -> None:
        """A bearer token for reads, given by the caller (RegistryAuth.seed_token)."""
        self._auth.seed_token(token)

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
                except (TimeoutError, aiohttp.ClientError) as exc:
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

    async def __aenter__(self) -> RegistrySource:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _open(self, session: aiohttp.ClientSession, url: URL, headers: dict[str, str], blob_id: str):
        """One blob GET (registry or storage URL), as an async context manager yielding the
        response. A hook: the Dragonfly proxy source sends it through its proxy."""
        return session.get(url, headers=headers, allow_redirects=False)

    def blob_url(self, blob_id: str) -> str:
        return f"{self.base}/v2/{self.repo}/blobs/sha256:{blob_id}"

    # -- whole manifests, indexes and blobs --------------------------------------------------
    async def get(self, path: str, consume: Callable[[aiohttp.ClientResponse], Awaitable[T]], *,
                  accept: str | None = None, what: str | None = None,
                  timeout: aiohttp.ClientTimeout | None = None,
                  params: dict[str, str] | None = None) -> T:
        """GET `<registry>/v2/<repo>/<path>`, `path` being "manifests/<tag or sha256:hex>",
        "blobs/sha256:<hex>" or "referrers/sha256:<hex>" (`params`: its query), with this source's auth (basic / Bearer, renewed on a 401),
        redirects (followed by hand, no Authorization to another origin), bounded retries with
        backoff (connection errors, timeouts, 5xx, 429 with Retry-After) and timeouts, exactly as
        read(). `consume(resp)` takes the 200 response; it runs again on a retry, so it must start
        over each time; it may raise RetryableError (a short body), anything else it raises passes
        through. `accept`: the Accept header; `what`: the request's name in messages (default
        `path`); `timeout`: instead of the per-request one (a long download bounds idle time).
        A failed request raises RegistryError."""
        if not isinstance(path, str) or not _GET_PATH.fullmatch(path):
            raise ValueError(f"not a manifest or blob path: {str(path)[:200]!r}")
        name = what or path
        session = self._get_session()
        url = URL(f"{self.base}/v2/{self.repo}/{path}", encoded=True)
        if params:
            url = url.with_query(params)
        headers = {"Accept": accept} if accept else {}
        per_request = timeout or self.timeout

        def opener(session: aiohttp.ClientSession, url: URL, headers: dict[str, str]):
            return session.get(url, headers=headers, allow_redirects=False, timeout=per_request)

        async def take(resp: aiohttp.ClientResponse, _url: URL, _hops: int) -> T:
            return await consume(resp)

        async def fail(resp: aiohttp.ClientResponse, where: str) -> NoReturn:
            raise await _http_error(self.base, name, resp, where)

        return await self._retrying(name, lambda: self._exchange(session, url, headers, take, what=name,
                                                                 opener=opener, fail=fail))

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it succeeds, at most 1 + retries times, backing off (exponential,
        jittered, at least a Retry-After up to max_retry_after) after a RetryableError or a
        transient token endpoint failure."""
        last = ""
        for n in range(self.retries + 1):
            if n:
                self.stats["retries"] += 1
            try:
                return await attempt()
            except (RetryableError, TransientAuthError) as exc:
                last = str(exc)
                if n == self.retries:
                    break
                delay = min(self.max_backoff, self.backoff * (2 ** n))
                delay *= 0.5 + random.random() / 2  # jitter
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.max_retry_after))
                log.info("registry %s: %s: %s; retry %d/%d in %.2fs", self.base, what, last, n + 1,
                         self.retries, delay)
                await asyncio.sleep(delay)
        raise RegistryError(self.base, what, f"giving up after {self.retries + 1} attempts: {last}")

    async def _exchange(self, session: aiohttp.ClientSession, url: URL, headers: dict[str, str],
                        consume: Callable[[aiohttp.ClientResponse, URL, int], Awaitable[T]], *, what: str,
                        opener: Callable[[aiohttp.ClientSession, URL, dict[str, str]], AsyncContextManager[Any]],
                        fail: Callable[[aiohttp.ClientResponse, str], Awaitable[NoReturn]],
                        authorize: bool = True, ok: tuple[int, ...] = (200,),
                        push: bool = False, follow_redirects: bool = True) -> T:
        """One attempt of a request: redirects followed here (at most MAX_REDIRECT_HOPS; the
        Authorization header only ever goes to the registry's own origin), a 401 answered once
        through the auth object (the push-scope one when `push`); `consume(resp, final url,
        hops)` takes an `ok` response. 429 and 5xx, connection errors and timeouts raise
        RetryableError; other statuses (redirects too, unless `follow_redirects`) go to
        `fail(resp, where)`, which raises."""
        auth = self._push_auth if push else self._auth
        registry_origin = URL(self.base).origin()
        auth_retried = False
        hops = 0
        while True:
            request_headers = {"Accept-Encoding": "identity", **headers}
            send_auth = authorize and url.origin() == registry_origin
            sent = None
            where = f"{url.scheme}://{url.host}:{url.port}{url.path}"
            try:
                if send_auth:
                    if auth.needs_refresh():
                        await auth.refresh(session, self.timeout)
                    sent = auth.header()
                    if sent is not None:
                        request_headers["Authorization"] = sent
                self.stats["requests"] += 1
                async with opener(session, url, request_headers) as resp:
                    status = resp.status
                    if status in ok:
                        return await consume(resp, url, hops)
                    if status in _REDIRECTS and follow_redirects:
                        location = resp.headers.get("Location")
                        if not location:
                            raise RegistryError(self.base, what, f"HTTP {status} without Location", status)
                        hops += 1
                        if hops > MAX_REDIRECT_HOPS:
                            raise RegistryError(self.base, what, f"more than {MAX_REDIRECT_HOPS} redirects", status)
                        url = url.join(URL(location, encoded=True))
                        if url.scheme not in ("http", "https"):
                            raise RegistryError(self.base, what, f"redirect to unsupported scheme {url.scheme!r}")
                        log.debug("registry %s: %s redirected to %s", self.base, what, strip_query(str(url)))
                        continue
                    if status == 401 and send_auth:
                        if auth_retried:
                            raise auth.denied()
                        auth_retried = True
                        await auth.on_unauthorized(resp.headers.get("WWW-Authenticate"), sent,
                                                         session, self.timeout)
                        continue
                    if status == 429 or status >= 500:
                        raise RetryableError(f"{where}: HTTP {status}",
                                             parse_retry_after(resp.headers.get("Retry-After"), self.max_retry_after))
                    await fail(resp, where)
                    raise RegistryError(self.base, what, f"unexpected HTTP {status} at {where}", status)
            except AuthError as exc:
                raise RegistryError(self.base, what, exc.why, 401) from None
            except aiohttp.ClientSSLError as exc:  # certificate problems do not heal by retrying
                raise RegistryError(self.base, what, f"TLS error talking to {where}: {exc}") from None
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise RetryableError(f"{where}: {type(exc).__name__}: {exc}" if str(exc) else
                                     f"{where}: {type(exc).__name__}") from None
            except aiohttp.ClientResponseError as exc:
                raise RetryableError(f"{where}: {type(exc).__name__}: {exc.status} {exc.message}") from None
            except aiohttp.InvalidURL:
                raise RegistryError(self.base, what, f"invalid URL {strip_query(str(url))}") from None

    # -- writes: blob uploads and manifests ---------------------------------------------------
    async def _send(self, method: str, url: URL, *, what: str, body: bytes | None = None,
                    headers: dict[str, str] | None = None, ok: tuple[int, ...],
                    push: bool = True) -> tuple[int, dict[str, str]]:
        """One attempt of a request whose answer is only a status and headers (the body is
        drained): (status, headers) of an `ok` answer, RegistryError for other final ones."""
        session = self._get_session()

        def opener(session: aiohttp.ClientSession, url: URL, hdrs: dict[str, str]):
            return session.request(method, url, data=body, headers=hdrs, allow_redirects=False)

        async def take(resp: aiohttp.ClientResponse, _url: URL, _hops: int) -> tuple[int, dict[str, str]]:
            await resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}

        async def fail(resp: aiohttp.ClientResponse, where: str) -> NoReturn:
            raise await _http_error(self.base, what, resp, f"{method} {where}")

        return await self._exchange(session, url, dict(headers or {}), take, what=what, opener=opener,
                                    fail=fail, ok=ok, push=push, follow_redirects=method in ("GET", "HEAD"))

    async def blob_exists(self, digest: str) -> bool:
        """HEAD the blob `sha256:<hex>` of this repository: True if the registry has it."""
        if not _DIGEST_RE.fullmatch(digest):
            raise ValueError(f"not a sha256 digest: {digest[:100]!r}")
        url = URL(f"{self.base}/v2/{self.repo}/blobs/{digest}", encoded=True)
        what = f"blob {digest}"
        try:
            await self._retrying(what, lambda: self._send("HEAD", url, what=what, ok=(200,), push=False))
        except RegistryError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def upload_blob(self, data: bytes, media_type: str = "application/octet-stream") -> str:
        """Upload `data` as a blob of this repository (monolithic: POST an upload, PUT the
        bytes with ?digest=); returns "sha256:<hex>". The registry checks the digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        what = f"upload of blob {digest}"
        start = URL(f"{self.base}/v2/{self.repo}/blobs/uploads/", encoded=True)

        async def attempt() -> str:
            _, headers = await self._send("POST", start, what=what, body=b"", ok=(202,),
                                          headers={"Content-Length": "0"})
            location = headers.get("location")
            if not location:
                raise RegistryError(self.base, what, "HTTP 202 without a Location for the upload")
            # the upload URL's own query (its state) is kept byte for byte: no re-encoding
            target = str(start.join(URL(location, encoded=True)))
            target += ("&" if "?" in target else "?") + "digest=" + digest.replace(":", "%3A")
            put_url = URL(target, encoded=True)
            if put_url.scheme not in ("http", "https"):
                raise RegistryError(self.base, what, f"upload Location with unsupported scheme {put_url.scheme!r}")
            status, headers = await self._send("PUT", put_url, what=what, body=data, ok=(201, 204),
                                               headers={"Content-Type": media_type})
            got = headers.get("docker-content-digest")
            if got and got != digest:
                raise RegistryError(self.base, what, f"the registry stored {got[:80]}, not {digest}", status)
            return digest

        return await self._retrying(what, attempt)

    async def put_manifest(self, reference: str, body: bytes, media_type: str) -> dict[str, str]:
        """PUT a manifest or index under `reference` (a tag or its own sha256 digest) with
        Content-Type `media_type`; returns the answer's headers (lower-cased names), in which
        `oci-subject` says the registry indexes referrers itself (OCI 1.1)."""
        if not _MANIFEST_REF.fullmatch(reference):
            raise ValueError(f"not a tag or digest: {reference[:200]!r}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and reference != digest:
            raise ValueError(f"manifest bytes are {digest}, not {reference}")
        what = f"manifest {reference}"
        url = URL(f"{self.base}/v2/{self.repo}/manifests/{reference}", encoded=True)
        status, headers = await self._retrying(
            what, lambda: self._send("PUT", url, what=what, body=body, ok=(201, 200, 204),
                                     headers={"Content-Type": media_type}))
        got = headers.get("docker-content-digest")
        if got and got != digest:
            raise RegistryError(self.base, what, f"the registry stored {got[:80]}, not {digest}", status)
        return headers

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
        return await self._retrying(f"blob {blob_id} [{offset}+{length}]",
                                    lambda: self._attempt(session, blob_id, offset, length))

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
                except RetryableError:
                    self._redirects.pop(blob_id, None)
                    raise
            self._redirects.pop(blob_id, None)
        return await self._get(session, URL(self.blob_url(blob_id)), blob_id, offset, length,
                               authorize=True, cached=False)

    async def _get(self, session: aiohttp.ClientSession, url: URL, blob_id: str, offset: int, length: int,
                   authorize: bool, cached: bool) -> bytes:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        asked = time.monotonic()

        async def take(resp: aiohttp.ClientResponse, final: URL, hops: int) -> bytes:
            answered = time.monotonic()  # the headers are in: the request's fixed cost is paid
            data = await self._body(resp, blob_id, offset, length)
            self.link.observe_split(len(data), answered - asked, time.monotonic() - answered)
            if hops and not cached:
                self._redirects[blob_id] = (final, time.monotonic() + self.redirect_ttl)
                self.stats["redirects_resolved"] += 1
            return data

        async def fail(resp: aiohttp.ClientResponse, where: str) -> NoReturn:
            if cached:
                raise _StaleRedirect(f"HTTP {resp.status}")
            self._fail(resp, where, blob_id, offset, length)

        return await self._exchange(session, url, headers, take, what=f"blob {blob_id}", authorize=authorize,
                                    opener=lambda s, u, h: self._open(s, u, h, blob_id), fail=fail,
                                    ok=(200, 206))

    def _fail(self, resp: aiohttp.ClientResponse, where: str, blob_id: str, offset: int, length: int) -> NoReturn:
        """A final answer to a blob read that is not data (429 / 5xx were retried before)."""
        status = resp.status
        what = f"blob {blob_id} in {self.repo}"
        if status == 416:
            m = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
            size = f"the blob has {m.group(1)} bytes" if m else "range not satisfiable"
            why = f"read past end: wanted bytes {offset}..{offset + length} but {size} (HTTP 416)"
        elif status == 404:
            why = "not found (HTTP 404)"
        elif status == 401:
            why = f"HTTP 401 unauthorized at {where}"
        elif status == 403:
            why = f"HTTP 403 forbidden at {where}"
        else:
            why = f"unexpected HTTP {status} {resp.reason or ''} at {where}".rstrip()
        raise RegistryError(self.base, what, why, status)

    async def _body(self, resp: aiohttp.ClientResponse, blob_id: str, offset: int, length: int) -> bytes:
        try:
            body = await read_range_body(resp, blob_id, offset, length, f"registry {self.base}: blob {blob_id}")
        except ShortBody as exc:
            raise RetryableError(str(exc)) from None
        if body.kind != "partial":
            self._answered_200(body.kind)
        return body.data

    def _answered_200(self, kind: BodyKind) -> None:
        """A ranged GET was answered 200 (and taken): said once per source and kind."""
        if kind in self._told_200:
            return
        self._told_200.add(kind)
        if kind == "whole-blob":
            log.warning("registry %s ignores Range requests (HTTP 200 with the whole blob); reading "
                        "through to the wanted bytes (logged once)", self.base)
        else:
            log.info("registry %s answers ranged GETs with HTTP 200 and just the bytes asked for; "
                     "taken as the range, as nydusd does (logged once)", self.base)


async def _http_error(base: str, what: str, resp: aiohttp.ClientResponse, where: str) -> RegistryError:
    """A registry's failed answer as one RegistryError line (404, auth, or anything else)."""
    status = resp.status
    detail = await _error_detail(resp)
    if status == 404:
        why = f"not found (HTTP 404{detail})"
    elif status in (401, 403):
        why = f"HTTP {status} {'unauthorized' if status == 401 else 'forbidden'} at {where}{detail}"
    else:
        why = f"unexpected HTTP {status} {resp.reason or ''} at {where}{detail}"
    return RegistryError(base, what, why, status)


async def _error_detail(resp: aiohttp.ClientResponse) -> str:
    """The first distribution error code of an error body, for messages (": MANIFEST_UNKNOWN")."""
    try:
        body = await resp.content.read(4096)
        errors = json.loads(body).get("errors") or []
        code = errors[0].get("code") if errors and isinstance(errors[0], dict) else None
        return f": {str(code)[:60]}" if code else ""
    except Exception:
        return ""
