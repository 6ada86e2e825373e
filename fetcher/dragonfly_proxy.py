"""Registry blob ranges through a Dragonfly peer's HTTP proxy (dfdaemon, port 4001), as nydusd does.

The request is the registry's own ranged blob GET (same URL, Range and Authorization: the
RegistrySource machinery builds it, handles auth challenges, redirects and the 206 checks),
sent through the forward proxy with:

- `X-Dragonfly-Use-P2P: true` so dfdaemon serves it through a P2P task (dfdaemon 1.5 answers
  a range 206 with its Content-Range, and adds X-Dragonfly-Task-ID);
- `X-Dragonfly-Priority`: 6 for on-demand reads, 3 for prefetch (nydus's values);
- `X-Dragonfly-Scheduling-Policy: always`: dfdaemon 1.4.9+ sends a range of <= 4 MiB straight
  to the origin otherwise, each node on its own;
- `X-Dragonfly-Registry: <https origin>` when `use_http` rewrote https to http for the proxy,
  so the peer still goes back to the real origin over https.

One whole task per blob, first (`whole_task`, the default; see fetcher.dragonfly_grpc for
why: the scheduler triggers the seed peer with the download of the first peer that registers a
task, range included). The first read of a blob starts a GET of the WHOLE blob through the
proxy (no Range, priority 6), read to its end in the background and thrown away: it makes the
blob one P2P task the seed fetches once, and its body, which the proxy writes in order, says how
far the blob is in the local dfdaemon's storage. A read waits until that stream has passed the
end of its range (at most the registry timeout), then asks for its range, which dfdaemon serves
from its storage. When the whole-blob GET fails, reads ask for their ranges directly and the
next read starts it again. With `whole_task=False` the first on-demand read of each blob
carries `X-Dragonfly-Prefetch: true` instead (dfdaemon's own background prefetch: nydusd's way,
but then that first range is what the seed is asked for).

Failure policy (the fallback decision itself belongs to fetcher.chain.SourceChain): HTTP >= 500,
429 (rate limited), 403 (blocked) and connection failures to the proxy raise SourceError at
once (no retries by default) and mark the proxy unhealthy. A background task GETs `ping_url`
every `check_interval` seconds (200..399 = healthy; without a ping_url an unhealthy mark just
lapses after check_interval). A proxy answering 200 with the whole blob instead of 206 (older
dfdaemon) still works: the range is cut out of the stream, logged once; a 200 with just the
bytes asked for is taken as they are (fetcher.range_body reads every answer).

Credentials (registry or proxy userinfo) never reach logs, names or messages.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from typing import Any, Mapping, NoReturn

import aiohttp
from yarl import URL

from fetcher.range_body import BodyKind
from fetcher.registry import RegistrySource
from fetcher.source import SourceError
from fetcher.whole_download import WholeDownload, stop_whole_downloads

log = logging.getLogger("fscached.fetcher.dragonfly_proxy")

PRIORITY_ON_DEMAND = 6
PRIORITY_PREFETCH = 3

# the prefetch flag of the read in progress (read() -> RegistrySource machinery -> _open)
_PREFETCH: contextvars.ContextVar[bool] = contextvars.ContextVar("dragonfly_proxy_prefetch", default=False)
# set while the whole-blob GET is being opened (no Range, no prefetch hint, no read timeout)
_WHOLE: contextvars.ContextVar[bool] = contextvars.ContextVar("dragonfly_proxy_whole", default=False)
WHOLE_CHUNK = 1 << 20


class ProxyFailure(SourceError):
    """The proxy itself failed (HTTP 5xx, 429, 403, a refused connection or CONNECT): it is marked
    unhealthy; the same request straight to the registry may well work."""


class _WholeBody(WholeDownload):
    """This node's GET of a whole blob through the proxy, read to its end and thrown away: how
    far it got (the proxy writes the body in order) is how much of the blob is local."""

    def __init__(self, blob_id: str) -> None:
        super().__init__()
        self.blob_id = blob_id
        self.received = 0
        self.proxy_failed = False  # the error was the proxy's own (ProxyFailure)

    def holds(self, end: int) -> bool:
        return (self.finished or self.received >= end
                or (self.content_length is not None and end > self.content_length))

    async def wait(self, end: int, deadline: float) -> None:
        """Until the stream has passed `end`, or failed; TimeoutError at `deadline`."""
        while not self.holds(end) and self.error is None:
            await self.next_change(deadline)

    def progress(self) -> str:
        total = f" of {self.content_length}" if self.content_length is not None else ""
        return f"{self.received}{total} bytes after {time.monotonic() - self.started_at:.1f} s"


def redact_url(url: str | URL) -> str:
    """scheme://host:port/path: no userinfo, no query (signatures)."""
    u = URL(str(url))
    if not u.host:
        return "<invalid url>"
    port = f":{u.explicit_port}" if u.explicit_port else ""
    path = u.path if u.path not in ("", "/") else ""
    return f"{u.scheme}://{u.host}{port}{path}"


class DragonflyProxySource(RegistrySource):
    """BlobSource: a registry's blobs through a Dragonfly HTTP proxy."""

    def __init__(
        self,
        registry: RegistrySource | Mapping[str, Any],
        proxy_url: str,
        ping_url: str | None = None,
        check_interval: float = 5.0,
        use_http: bool = False,
        *,
        retries: int = 0,
        ping_timeout: float | None = None,
        whole_task: bool = True,
    ) -> None:
        """registry: a RegistrySource (its host, repo, scheme, TLS settings, timeouts and its
        auth state, tokens included, are shared) or the keyword arguments of one."""
        proxy = URL(proxy_url)
        if proxy.scheme not in ("http", "https") or not proxy.host:
            raise ValueError(f"proxy url must be http://host:port, not {redact_url(proxy_url)!r}")
        if ping_url is not None:
            ping = URL(ping_url)
            if ping.scheme not in ("http", "https") or not ping.host:
                raise ValueError(f"ping url must be an http(s) URL, not {redact_url(ping_url)!r}")
        if check_interval < 0 or (ping_url is not None and check_interval <= 0):
            raise ValueError("check_interval must be > 0 (>= 0 without a ping url)")
        if isinstance(registry, RegistrySource):
            super().__init__(registry.host, registry.repo, scheme=registry.scheme, ca_file=registry.ca_file,
                             skip_verify=registry.skip_verify, retries=retries, backoff=registry.backoff,
                             max_backoff=registry.max_backoff, max_retry_after=registry.max_retry_after,
                             pool_size=registry.pool_size, redirect_ttl=registry.redirect_ttl)
            self.timeout = registry.timeout
            self._auth = registry._auth  # one token for direct and proxied requests
            self._ssl = registry._ssl
        else:
            super().__init__(**{**dict(registry), "retries": retries})
        self.registry_name = self.name
        self.proxy_url = str(proxy)
        self.ping_url = ping_url
        self.check_interval = float(check_interval)
        self.use_http = use_http
        self.name = f"dragonfly proxy {redact_url(proxy)}"
        self.ping_timeout = ping_timeout if ping_timeout is not None else max(0.5, min(5.0, self.check_interval))
        self._healthy = True
        self._last_unhealthy = ""
        self._unhealthy_until = 0.0
        self._health_task: asyncio.Task | None = None
        self._prefetch_sent: set[str] = set()
        self.whole_task = whole_task
        self._whole: dict[str, _WholeBody] = {}
        self.stats.update({"proxy_errors": 0, "prefetch_hints": 0, "full_body": 0, "range_only_200": 0,
                           "pings": 0, "whole_tasks": 0, "whole_tasks_failed": 0, "waited_for_pieces": 0})

    def __repr__(self) -> str:
        return (f"DragonflyProxySource({redact_url(self.proxy_url)} -> {self.base}/{self.repo}, "
                f"auth={self._auth.scheme or 'anonymous'})")

    # -- health ------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """False after a proxy failure or a failed ping, until the next good ping (or, without
        a ping url, until check_interval has passed)."""
        self.start_health_checks()
        if not self._healthy and self.ping_url is None and time.monotonic() >= self._unhealthy_until:
            self._set_health(True, f"trying it again after {self.check_interval:g}s", quiet=True)
        return self._healthy

    def start_health_checks(self) -> None:
        """Start the ping task (needs a running loop; read() and healthy() call this)."""
        if self.ping_url is None or self._health_task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._health_task = loop.create_task(self._health_loop(self.ping_url), name=f"{self.name} health")

    def _set_health(self, ok: bool, why: str, quiet: bool = False) -> None:
        """Log transitions; the same unhealthy reason again (a proxy that keeps failing after
        each lapse or good ping) and lapses only at debug level."""
        if ok == self._healthy:
            return
        self._healthy = ok
        if ok:
            log.log(logging.DEBUG if quiet else logging.INFO, "%s: healthy again (%s)", self.name, why)
        else:
            repeat = why == self._last_unhealthy
            self._last_unhealthy = why
            log.log(logging.DEBUG if repeat else logging.WARNING, "%s: unhealthy: %s", self.name, why)

    def _mark_unhealthy(self, why: str) -> None:
        self.stats["proxy_errors"] += 1
        self._unhealthy_until = time.monotonic() + self.check_interval
        self._set_health(False, why)

    async def _health_loop(self, ping_url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=self.ping_timeout)
        where = redact_url(ping_url)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while True:
                self.stats["pings"] += 1
                try:
                    async with session.get(ping_url, allow_redirects=False) as resp:
                        ok = 200 <= resp.status < 400
                        why = f"ping {where}: HTTP {resp.status}"
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    ok, why = False, f"ping {where}: {type(exc).__name__}"
                self._set_health(ok, why)
                await asyncio.sleep(self.check_interval)

    # -- reads -------------------------------------------------------------------------------
    async def read(self, blob_id: str, offset: int, length: int, *, prefetch: bool = False) -> bytes:
        self.start_health_checks()
        if self.whole_task and length > 0 and offset >= 0 and not self._closed:
            await self._wait_whole(blob_id, offset + length)
        token = _PREFETCH.set(prefetch)
        try:
            return await super().read(blob_id, offset, length, prefetch=prefetch)
        finally:
            _PREFETCH.reset(token)

    # -- the whole-blob GET --------------------------------------------------------------------
    async def _wait_whole(self, blob_id: str, end: int) -> None:
        whole = self._whole.get(blob_id)
        if whole is None or whole.error is not None:
            whole = self._whole[blob_id] = _WholeBody(blob_id)
            self.stats["whole_tasks"] += 1
            whole.runner = asyncio.get_running_loop().create_task(self._run_whole(whole),
                                                                  name=f"{self.name} whole blob {blob_id}")
        if whole.holds(end):
            return
        self.stats["waited_for_pieces"] += 1
        wait = self.timeout.total or 60.0
        try:
            await whole.wait(end, time.monotonic() + wait)
        except TimeoutError:
            raise SourceError(f"{self.name}: blob {blob_id}: the proxy's P2P download did not reach byte {end} "
                              f"within {wait:g}s ({whole.progress()})") from None
        if whole.proxy_failed:  # a range would fail the same way: one request per read to a broken proxy
            raise SourceError(whole.error)

    async def _run_whole(self, whole: _WholeBody) -> None:
        what = f"blob {whole.blob_id} (the whole blob)"

        async def take(resp: aiohttp.ClientResponse, _final: URL, _hops: int) -> None:
            whole.content_length = resp.content_length
            async for chunk in resp.content.iter_chunked(WHOLE_CHUNK):
                whole.received += len(chunk)
                whole.changed()
            whole.finished = True

        async def fail(resp: aiohttp.ClientResponse, where: str) -> NoReturn:
            raise SourceError(f"{self.name}: {what}: HTTP {resp.status} from {where}")

        token = _WHOLE.set(True)
        try:
            await self._exchange(self._get_session(), URL(self.blob_url(whole.blob_id)), {}, take, what=what,
                                 opener=lambda s, u, h: self._open(s, u, h, whole.blob_id), fail=fail)
            log.debug("%s: %s: done (%s)", self.name, what, whole.progress())
        except asyncio.CancelledError:
            whole.error = "cancelled"
            raise
        except Exception as exc:  # the reads waiting on it go on without it
            whole.error = str(exc) or type(exc).__name__
            whole.proxy_failed = isinstance(exc, ProxyFailure)
            self.stats["whole_tasks_failed"] += 1
            log.info("%s: %s failed (%s); reads ask for their ranges directly: %s", self.name, what,
                     whole.progress(), whole.error)
        finally:
            _WHOLE.reset(token)
            whole.changed()

    @contextlib.asynccontextmanager
    async def _open(self, session: aiohttp.ClientSession, url: URL, headers: dict[str, str], blob_id: str):
        whole = _WHOLE.get()
        prefetch = _PREFETCH.get() and not whole
        headers = dict(headers)
        headers["X-Dragonfly-Use-P2P"] = "true"
        headers["X-Dragonfly-Priority"] = str(PRIORITY_PREFETCH if prefetch else PRIORITY_ON_DEMAND)
        headers["X-Dragonfly-Scheduling-Policy"] = "always"
        hint = not self.whole_task and not prefetch and blob_id not in self._prefetch_sent
        if hint:
            headers["X-Dragonfly-Prefetch"] = "true"
            self._prefetch_sent.add(blob_id)  # concurrent first reads: only one carries the hint
        target = url
        if self.use_http and url.scheme == "https":
            target = url.with_scheme("http")
            headers["X-Dragonfly-Registry"] = str(url.origin())
        proxy = redact_url(self.proxy_url)
        delivered = False
        try:
            if whole:  # the whole blob may take long: no total timeout, one per read of the body
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout.sock_connect,
                                                sock_read=self.timeout.total)
                request = session.get(target, headers=headers, proxy=self.proxy_url, allow_redirects=False,
                                      timeout=timeout)
            else:
                request = session.get(target, headers=headers, proxy=self.proxy_url, allow_redirects=False)
            async with request as resp:
                status = resp.status
                if status >= 500 or status in (429, 403):
                    kind = resp.headers.get("X-Dragonfly-Error-Type")
                    why = f"HTTP {status}" + (f" ({kind} error)" if kind else "")
                    self._mark_unhealthy(why)
                    raise ProxyFailure(f"{self.name}: blob {blob_id}: {why}")
                if hint:
                    self.stats["prefetch_hints"] += 1
                    if status not in (200, 206) and status not in (301, 302, 303, 307, 308):
                        self._prefetch_sent.discard(blob_id)
                delivered = True
                yield resp
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            if delivered:
                raise
            if hint:
                self._prefetch_sent.discard(blob_id)
            why = f"cannot reach the proxy {proxy}: {type(exc).__name__}"
            self._mark_unhealthy(why)
            raise ProxyFailure(f"{self.name}: blob {blob_id}: {why}") from None
        except aiohttp.ClientHttpProxyError as exc:  # https origin: the proxy refused the CONNECT
            if delivered:
                raise
            if hint:
                self._prefetch_sent.discard(blob_id)
            why = f"the proxy {proxy} refused the CONNECT tunnel: HTTP {exc.status}"
            self._mark_unhealthy(why)
            raise ProxyFailure(f"{self.name}: blob {blob_id}: {why}") from None
        except SourceError:
            if hint and not delivered:
                self._prefetch_sent.discard(blob_id)
            raise

    def _answered_200(self, kind: BodyKind) -> None:
        if kind != "whole-blob":
            self.stats["range_only_200"] += 1
            super()._answered_200(kind)
            return
        self.stats["full_body"] += 1
        if kind not in self._told_200:
            self._told_200.add(kind)  # instead of the registry's own message
            log.warning("%s answers ranged GETs with HTTP 200 and the whole blob instead of 206 "
                        "(an older dfdaemon?); cutting the range out of the stream (logged once)",
                        self.name)

    async def close(self) -> None:
        task, self._health_task = self._health_task, None
        self._closed = True
        await stop_whole_downloads(self._whole)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await super().close()
