"""A stand-in for dfdaemon's HTTP proxy (port 4001) and its health port (4003), for tests.

    async with ProxyStandIn() as proxy:          # proxy.url, proxy.ping_url
        ... DragonflyProxySource(reg, proxy.url, ping_url=proxy.ping_url) ...
        proxy.requests[-1].dragonfly              # the X-Dragonfly-* headers it got

A forward proxy (no CONNECT: tunnels get a 4xx): absolute-URI GETs are forwarded to the origin (the real registry in tests)
keeping Range and Authorization, without following redirects; the answer comes back as the
origin gave it (206 with Content-Range for ranges) plus an X-Dragonfly-Task-ID. With
X-Dragonfly-Registry the request goes to that origin (what use_http needs: the client sent
http:// but the registry speaks https).

Knobs:
- fail(status, n=None): answer `status` (with X-Dragonfly-Error-Type) to the next n proxied
  requests (None: until reset()).
- full_body = True: fetch without Range and answer 200 with the whole blob (older dfdaemon).
- range_as_200 = True: fetch the range, answer its bytes with 200 and no Content-Range (what
  some blob proxies do).
- await stop() / await start(): close / reopen the proxy port (connections refused meanwhile);
  the health port keeps running unless stop(health=True).
- health_status = 503: what GET /healthy on the health port answers (default 200).
Only binds 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from yarl import URL

_FORWARD_HEADERS = ("Content-Range", "Content-Type", "Docker-Content-Digest", "WWW-Authenticate",
                    "Location", "Accept-Ranges")


@dataclass
class ProxiedRequest:
    method: str
    url: str  # the absolute URL the client asked the proxy for
    headers: dict[str, str]
    dragonfly: dict[str, str] = field(default_factory=dict)  # X-Dragonfly-* only
    status: int = 0  # what the proxy answered


class ProxyStandIn:
    def __init__(self, origin_ssl: ssl.SSLContext | None = None) -> None:
        self.origin_ssl = origin_ssl
        self.requests: list[ProxiedRequest] = []
        self.pings = 0
        self.health_status = 200
        self.full_body = False
        self.range_as_200 = False
        self._fail_status: int | None = None
        self._fail_left: int | None = None
        self.port = 0
        self.health_port = 0
        self._proxy_runner: web.AppRunner | None = None
        self._health_runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ping_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}/healthy"

    # -- knobs -------------------------------------------------------------------------------
    def fail(self, status: int, n: int | None = None) -> None:
        self._fail_status, self._fail_left = status, n

    def reset(self) -> None:
        self._fail_status = self._fail_left = None
        self.full_body = False
        self.range_as_200 = False
        self.health_status = 200

    def blob_requests(self) -> list[ProxiedRequest]:
        return [r for r in self.requests if "/blobs/" in r.url]

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> ProxyStandIn:
        self._client = aiohttp.ClientSession(auto_decompress=False, trust_env=False)
        health = web.Application()
        health.router.add_get("/healthy", self._healthy)
        self._health_runner, self.health_port = await self._serve(health, 0)
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop(health=True)
        await self._client.close()

    async def start(self) -> None:
        """(Re)open the proxy port; the same port number after a stop()."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._proxy_runner, self.port = await self._serve(app, self.port)

    async def stop(self, health: bool = False) -> None:
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
            self._proxy_runner = None
        if health and self._health_runner is not None:
            await self._health_runner.cleanup()
            self._health_runner = None

    @staticmethod
    async def _serve(app: web.Application, port: int) -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    # -- handlers ----------------------------------------------------------------------------
    async def _healthy(self, request: web.Request) -> web.Response:
        self.pings += 1
        return web.Response(status=self.health_status, text="ok" if self.health_status < 400 else "down")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = request._message.url
        rec = ProxiedRequest(request.method, str(target), dict(request.headers),
                             {k: v for k, v in request.headers.items() if k.lower().startswith("x-dragonfly-")})
        self.requests.append(rec)
        resp = await self._answer(request, target, rec)
        rec.status = resp.status
        return resp

    async def _answer(self, request: web.Request, target: URL, rec: ProxiedRequest) -> web.Response:
        if request.method != "GET":
            return web.Response(status=405, text="the stand-in proxies GET only (no CONNECT)",
                                headers={"X-Dragonfly-Error-Type": "proxy"})
        if not target.is_absolute():
            return web.Response(status=400, text="not a proxy request (absolute URI expected)",
                                headers={"X-Dragonfly-Error-Type": "proxy"})
        if self._fail_status is not None and (self._fail_left is None or self._fail_left > 0):
            if self._fail_left is not None:
                self._fail_left -= 1
            return web.Response(status=self._fail_status, text="stand-in failure",
                                headers={"X-Dragonfly-Error-Type": "dfdaemon"})
        registry = request.headers.get("X-Dragonfly-Registry")
        if registry:
            origin = URL(registry)
            target = target.with_scheme(origin.scheme).with_host(origin.host).with_port(origin.port)
        headers = {}
        for name in ("Authorization", "Accept-Encoding"):
            if name in request.headers:
                headers[name] = request.headers[name]
        if "Range" in request.headers and not self.full_body:
            headers["Range"] = request.headers["Range"]
        task_id = hashlib.sha256(str(target.with_query(None)).encode()).hexdigest()
        try:
            async with self._client.get(target, headers=headers, allow_redirects=False,
                                        ssl=self.origin_ssl if target.scheme == "https" else None) as up:
                body = await up.read()
                out = {k: up.headers[k] for k in _FORWARD_HEADERS if k in up.headers}
                out["X-Dragonfly-Task-ID"] = task_id
                if up.status >= 400:
                    out["X-Dragonfly-Error-Type"] = "backend"
                if up.status == 206 and self.range_as_200:
                    del out["Content-Range"]
                    return web.Response(status=200, body=body, headers=out)
                return web.Response(status=up.status, body=body, headers=out)
        except aiohttp.ClientError as exc:
            return web.Response(status=502, text=f"origin: {type(exc).__name__}",
                                headers={"X-Dragonfly-Error-Type": "backend"})
