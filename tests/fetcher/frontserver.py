"""A tiny aiohttp server placed in front of a real registry: it counts requests and can
answer errors, redirects, token challenges or full bodies instead of forwarding."""
from __future__ import annotations

import collections
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web

# behaviour(front, request) -> a Response to send, or None to forward to the registry
Behaviour = Callable[["FrontServer", web.Request], Awaitable[web.StreamResponse | None]]

_FORWARD_HEADERS = ("Content-Range", "Content-Type", "Docker-Content-Digest", "WWW-Authenticate",
                    "Location", "Accept-Ranges")


class FrontServer:
    def __init__(self, upstream: str, behaviour: Behaviour | None = None,
                 upstream_headers: dict[str, str] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.behaviour = behaviour
        self.upstream_headers = upstream_headers or {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.state: dict = {}
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    async def __aenter__(self) -> FrontServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._client = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.close()
        await self._runner.cleanup()

    def count(self, prefix: str) -> int:
        return sum(n for path, n in self.counts.items() if path.startswith(prefix))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.counts[request.path] += 1
        self.requests.append((request.method, request.path_qs, dict(request.headers)))
        if self.behaviour is not None:
            resp = await self.behaviour(self, request)
            if resp is not None:
                return resp
        return await self.forward(request)

    async def forward(self, request: web.Request, path: str | None = None,
                      drop_range: bool = False) -> web.Response:
        headers = dict(self.upstream_headers)
        if "Range" in request.headers and not drop_range:
            headers["Range"] = request.headers["Range"]
        url = self.upstream + (path if path is not None else request.path_qs)
        async with self._client.request(request.method, url, headers=headers,
                                        allow_redirects=False) as up:
            body = await up.read()
            out = {k: up.headers[k] for k in _FORWARD_HEADERS if k in up.headers}
            return web.Response(status=up.status, body=body, headers=out)
