"""The nydusd-compatible control API: HTTP/1.1 on a unix socket (aiohttp), on the daemon's loop.

What containerd's nydus-snapshotter (fscache driver) calls, with nydusd's status codes (204 done,
no body; 200 with a JSON body) and error bodies `{"code": "...", "message": "..."}`:

    GET    /api/v1/daemon, /api/v2/daemon      daemon info (+ "fscached": images, counters)
    PUT    /api/v1/daemon                      {"log_level": "debug"}
    PUT    /api/v2/blobs                       bind an image (fscached.api.bind_entry)
    GET    /api/v2/blobs?domain_id=D           the entries of a domain
    DELETE /api/v2/blobs?domain_id=D           unbind every image of domain D
    DELETE /api/v2/blobs?domain_id=D&blob_id=B unbind one image ("blob_cache: cache entry not found")
    DELETE /api/v2/blobs?blob_id=B             cull B's cache (fscached.cache_gc.cull)
    PUT    /api/v1/daemon/start                READY -> RUNNING
    PUT    /api/v1/daemon/exit                 stop the daemon
    PUT    /api/v1/daemon/fuse/sendfd          state + /dev/cachefiles fd to the --supervisor socket
    PUT    /api/v1/daemon/fuse/takeover        (INIT) state + fd back from the supervisor, restore
    GET    /api/v1/metrics/blobcache?id=F      one bind's cache counters
    PUT    /api/v1/config?id=F                 {"registry_auth": "<base64 user:pass>"}
    GET    /metrics                            Prometheus text (fscached.metrics.render)

Errors: 400 bad request (a broken rule, bad JSON, a wrong method), 404 unknown route
("NO_ROUTE") or unknown entry ("NOT_FOUND"), 409 an image mounted by the daemon and in use, or
still read ("BUSY"), 500 daemon error, 501 unsupported, 503 not ready (INIT, STOPPING,
STOPPED). A bind of an id already bound, or being bound, gets nydusd's 400 "ALREADY_EXISTS";
except the first bind of exactly an image's spec after a takeover gave it back (nydus-snapshotter
binds every image again after a hot upgrade): 204, nothing changes (Daemon.rebind_restored).

The state is the daemon's own (fscached.daemon.DaemonState): INIT (not answering the kernel yet:
binds get 503; a daemon restarted for failover, or started with --upgrade, waits there for a
takeover), READY (bound and serving, or taken over and waiting for start), RUNNING (after `PUT
/api/v1/daemon/start`, or at once with autostart: nydusd's singleton moves itself INIT -> READY
-> RUNNING when created, and nydus-snapshotter waits for exactly RUNNING), STOPPING (a stop was
asked for: the daemon serves what is still read, takes no bind), STOPPED.

This module turns HTTP into calls on the daemon's public methods and their errors into nydusd's
answers; it holds no state of its own beyond the socket.

The socket is 0600 in a directory that is created 0700 when missing; a directory writable by
others and not ours (or owned by another user) is refused; a stale socket (nobody answers) is
replaced, a live one is refused. Idle connections stay open: the snapshotter holds one and takes
its hang-up for the daemon's death.
"""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from fetcher.source import SourceError
from fscached.api.bind_entry import BindError, check_metadata_file, parse_bind_entry, parse_rafs_config
from fscached.config import ConfigError, ImageSpec, check_auth, check_id
from fscached.core.catalog import BlobObject, CatalogError
from fscached.daemon import Daemon, DaemonState, NotServing
from fscached.frontends.base import CullBusy, CullFailed
from fscached.images import AlreadyBound, BusyError, MountpointTaken, NotBound
from fscached.lifecycle.supervisor import FailoverError, Supervisor
from fscached.metrics import render as render_metrics
from fscached.util import mounts
from fscached.util.api_socket import ApiSocketError, Listener, bind_listening, check_socket_path
from fscached.util.buildinfo import build_info

log = logging.getLogger("fscached.api")

# an idle connection is never closed by the server (aiohttp needs a finite number: 10 years)
KEEPALIVE_SECONDS = 10 * 365 * 24 * 3600.0
SHUTDOWN_SECONDS = 2.0
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "warning": logging.WARNING, "error": logging.ERROR}
# nydusd routes fscached has nothing behind: known, answered 501
NYDUSD_UNSUPPORTED = ("/api/v1/daemon/events", "/api/v1/daemon/backend", "/api/v1/daemon/fuse/resend")
# a POST /api/v1/mount may come before the daemon serves (nydus-snapshotter mounts before it asks
# for the state); it waits this long, under the snapshotter's 30 s per request
MOUNT_WAIT_SECONDS = 25.0
# nydusd's FUSE operation counters (StatsFop): fscached's reads are the kernel's, counted at Read
FOP_READ, FOP_COUNT = 4, 15
# nydusd's read latency buckets (microseconds): <1 ms, <20, <50, <100, <500 ms, <1 s, <2 s, more
NYDUS_LATENCY_US = (1_000, 20_000, 50_000, 100_000, 500_000, 1_000_000, 2_000_000)

class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = " ".join(message.split("\n"))


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


def no_content() -> web.Response:
    return web.Response(status=204)


class ApiServer:
    """The API of one Daemon, served on the daemon's own event loop.

    `start()` / `stop()` run on that loop (before / after `daemon.run()`, or from a task beside
    it). `on_exit` is what `PUT /api/v1/daemon/exit` does (default: `daemon.stop()`).
    `supervisor`: nydus-snapshotter's supervisor socket (sendfd / takeover); `autostart`:
    READY -> RUNNING at once (otherwise at `PUT /api/v1/daemon/start`)."""

    def __init__(self, daemon: Daemon, path: Path, *, daemon_id: str | None = None, supervisor: str | None = None,
                 autostart: bool | None = None, on_exit: Callable[[], None] | None = None,
                 fuse_root: Path | None = None, fuse_domain: str | None = None) -> None:
        self.daemon = daemon
        # nydusd's fusedev shared mode: images mounted at <fuse_root>/<id> by POST /api/v1/mount,
        # their blobs shared in `fuse_domain` (one cache file per blob, whatever image uses it)
        self.fuse_root = fuse_root
        self.fuse_domain = fuse_domain
        self.path = Path(path)
        self.daemon_id = daemon_id
        if supervisor is not None and daemon.supervisor is None:
            daemon.supervisor = Supervisor(supervisor)
        self.supervisor = supervisor
        if autostart is not None:
            daemon.autostart = autostart
        self.on_exit = on_exit or daemon.stop
        self._runner: web.AppRunner | None = None
        self._socket_ino: tuple[int, int] | None = None
        self.app = self._make_app()
        build_info()  # the code this process runs: hashed now, not at the first request

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, listener: Listener | None = None) -> None:
        """Serve on `listener` (a socket bound at our path already: nydusd binds it before its
        imports, fscached.nydusd_cli), else on a socket bound now (ApiSocketError)."""
        if listener is None:
            check_socket_path(self.path)
            listener = bind_listening(self.path)
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                               keepalive_timeout=KEEPALIVE_SECONDS, shutdown_timeout=SHUTDOWN_SECONDS)
        try:
            await runner.setup()
            await web.SockSite(runner, listener.sock).start()
        except BaseException as exc:
            await runner.cleanup()
            listener.close()
            if isinstance(exc, OSError):
                raise ApiSocketError(f"cannot serve the API on {self.path}: {exc.strerror or exc}") from None
            raise
        self._socket_ino = listener.ident
        self._runner = runner
        log.info("API listening on %s", self.path)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
        try:  # ours still (not a successor's): remove it, the snapshotter reads a leftover as a crash
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._socket_ino:
                self.path.unlink()
        except OSError:
            pass

    async def serve_daemon(self, report: Callable[[str], object]) -> int:
        """Start the API, run the daemon beside it until it stops, stop the API: the daemon's exit
        code. An API socket that cannot be served is reported in one line; the daemon is stopped
        (run() releases what it took: keeper, device) and 1 returned."""
        try:
            await self.start()
        except ApiSocketError as exc:
            report(str(exc))
            self.daemon.stop()
            await self.daemon.run()
            return 1
        try:
            return await self.daemon.run()
        finally:
            await self.stop()

    @property
    def runner(self) -> web.AppRunner | None:
        return self._runner

    @property
    def state(self) -> str:
        return self.daemon.state.value

    # -- routing ------------------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        r = app.router
        for version in ("v1", "v2"):
            r.add_get(f"/api/{version}/daemon", self.get_daemon, allow_head=False)
        r.add_put("/api/v1/daemon", self.put_daemon)
        r.add_put("/api/v2/blobs", self.bind)
        r.add_get("/api/v2/blobs", self.list_blobs, allow_head=False)
        r.add_delete("/api/v2/blobs", self.unbind)
        r.add_put("/api/v1/daemon/start", self.start_service)
        r.add_put("/api/v1/daemon/exit", self.exit)
        r.add_put("/api/v1/daemon/fuse/sendfd", self.send_fd)
        r.add_put("/api/v1/daemon/fuse/takeover", self.take_over)
        r.add_get("/api/v1/metrics/blobcache", self.blobcache_metrics, allow_head=False)
        r.add_put("/api/v1/config", self.put_config)
        r.add_get("/metrics", self.prometheus, allow_head=False)
        r.add_post("/api/v1/mount", self.mount)
        r.add_delete("/api/v1/mount", self.umount)
        r.add_get("/api/v1/metrics", self.fs_metrics, allow_head=False)
        r.add_get("/api/v1/metrics/backend", self.backend_metrics, allow_head=False)
        r.add_get("/api/v1/metrics/inflight", self.inflight_metrics, allow_head=False)
        r.add_get("/api/v1/metrics/files", self.files_metrics, allow_head=False)
        r.add_get("/api/v1/metrics/pattern", self.files_metrics, allow_head=False)
        for path in NYDUSD_UNSUPPORTED:
            r.add_route("*", path, self.nydusd_only)
        return app

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message)
        except web.HTTPNotFound:
            response = error_response(404, "NO_ROUTE", f"no such route: {request.path}")
        except web.HTTPMethodNotAllowed:
            response = error_response(400, "BAD_REQUEST", f"method {request.method} is not allowed on {request.path}")
        except web.HTTPException as exc:
            response = error_response(exc.status, "BAD_REQUEST" if exc.status < 500 else "DAEMON_ERROR",
                                      exc.reason or f"HTTP {exc.status}")
        except (ConnectionResetError, asyncio.IncompleteReadError) as exc:  # the client went away mid-body
            log.debug("API %s %s: the client went away (%s)", request.method, request.path, type(exc).__name__)
            response = error_response(400, "BAD_REQUEST", "the request ended before its body")
        except Exception as exc:  # a bug: the caller gets a 500, the daemon keeps serving
            log.exception("API %s %s failed", request.method, request.path)
            response = error_response(500, "DAEMON_ERROR", f"internal error: {type(exc).__name__}: {exc}")
        log.debug("API %s %s -> %d", request.method, request.path_qs, response.status)
        return response

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    async def _json(request: web.Request) -> Any:
        raw = await request.read()
        if not raw.strip():
            raise ApiError(400, "BAD_REQUEST", "the request needs a JSON body")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "BAD_REQUEST", f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "BAD_REQUEST", "the request body is JSON nested too deeply") from None

    def _need_serving(self) -> None:
        if not self.daemon.serving:
            raise ApiError(503, "NOT_READY", f"the daemon is not serving the kernel (state {self.state}): try again "
                                             "once it is READY or RUNNING")

    def _images_with_id(self, wanted: str) -> list[ImageSpec]:
        """The binds with this id, or else with the fscache id nydus-snapshotter derives from a
        snapshot id (sha256 of "nydus-snapshot-<id>"): its metrics requests may name either."""
        images = sorted(self.daemon.catalog.images.items())
        found = [spec for (_, fsid), spec in images if fsid == wanted]
        if not found:
            derived = hashlib.sha256(f"nydus-snapshot-{wanted}".encode()).hexdigest()
            found = [spec for (_, fsid), spec in images if fsid == derived]
        return found

    def _image_json(self, spec: ImageSpec) -> dict[str, Any]:
        daemon = self.daemon
        key = (spec.volume, spec.fsid)
        bootstrap = spec.bootstrap
        try:
            bootstrap = daemon.catalog.bootstrap_of(spec).path
        except KeyError:
            pass
        mount = None
        if daemon.frontend is not None:
            try:
                source, options = daemon.frontend.mount_args(spec)
                mount = {"source": str(source), "fstype": "erofs", "options": options}
            except KeyError:  # still binding: in the catalog, its cache files not made yet
                pass
        return {
            "id": spec.fsid,
            "domain_id": spec.domain or "",
            "bootstrap": str(bootstrap) if bootstrap is not None else None,
            "mountpoint": str(spec.mountpoint) if spec.mountpoint is not None else None,
            "mount": mount,
            "blobs": [blob.info.blob_id for blob in daemon.catalog.devices.get(key, [])],
        }

    # -- daemon -------------------------------------------------------------------------------
    async def get_daemon(self, request: web.Request) -> web.Response:
        daemon = self.daemon
        images = [self._image_json(spec) for _, spec in sorted(daemon.catalog.images.items())]
        body = {
            "version": build_info(),
            "id": self.daemon_id,
            "supervisor": self.supervisor,
            "state": self.state,
            "backend_collection": {},
            "fscached": {
                "backend": daemon.kernel_path,  # the kernel path (a field name API clients read)
                "kernel": platform.release(),
                "cache_dir": str(daemon.config.cache_dir),
                "images": images,
                "counters": daemon.counters(),
            },
        }
        return web.json_response(body)

    async def put_daemon(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        level = body.get("log_level") if isinstance(body, dict) else None
        if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
            raise ApiError(400, "BAD_REQUEST", "log_level must be one of trace, debug, info, warn, error")
        logging.getLogger().setLevel(LOG_LEVELS[level.lower()])
        log.warning("log level set to %s through the API", level.lower())
        return no_content()

    async def start_service(self, request: web.Request) -> web.Response:
        try:
            self.daemon.start_service()
        except NotServing as exc:
            waiting = self.daemon.state == DaemonState.INIT and self.daemon.supervisor is not None
            raise ApiError(503, "NOT_READY", str(exc) + (": waiting for a takeover (PUT /api/v1/daemon/fuse/takeover)"
                                                         if waiting else "")) from None
        return no_content()

    async def exit(self, request: web.Request) -> web.Response:
        log.info("exit asked for through the API%s",
                 " (a hand-over: the supervisor holds the kernel fd)" if self.daemon.handing_over else "")
        asyncio.get_running_loop().call_soon(self.on_exit)  # after this answer is on its way
        return no_content()

    async def send_fd(self, request: web.Request) -> web.Response:
        try:
            await self.daemon.send_fd()
        except FailoverError as exc:
            log.error("%s", exc)
            raise ApiError(exc.status, exc.code, str(exc)) from None
        return no_content()

    async def take_over(self, request: web.Request) -> web.Response:
        if self.daemon.stopping:
            raise ApiError(503, "NOT_READY", "takeover: the daemon is stopping")
        try:
            taken = await self.daemon.take_over(upgrade=self.daemon.upgrade)
        except FailoverError as exc:
            log.error("%s", exc)
            raise ApiError(exc.status, exc.code, str(exc)) from None
        if taken is None:  # as `start` is: asked again (see Daemon.take_over)
            log.info("takeover asked again: taken over already, nothing to do")
        return no_content()

    async def nydusd_only(self, request: web.Request) -> web.Response:
        raise ApiError(501, "UNSUPPORTED", f"{request.path} is a nydusd route fscached has nothing behind: it "
                                           "serves images through the kernel: see /api/v1/metrics/blobcache and /metrics")

    # -- nydusd's fusedev mounts (shared mode: one daemon, an image per directory) -------------------
    def _mount_id(self, request: web.Request) -> str:
        """The image's id from `?mountpoint=/<id>`: one path component below the daemon's root."""
        if self.fuse_root is None:
            raise ApiError(501, "UNSUPPORTED", f"{request.method} {request.path}: this daemon has no FUSE-mode "
                                               "mountpoint (run as `nydusd fuse --mountpoint DIR`)")
        given = request.query.get("mountpoint") or ""
        name = given.strip("/")
        if not name or "/" in name or name in (".", ".."):
            raise ApiError(400, "BAD_REQUEST", f"mountpoint {given[:200]!r} must be /<id>, one directory below "
                                               f"{self.fuse_root}")
        try:
            return check_id("mountpoint", name)
        except ConfigError as exc:
            raise ApiError(400, "BAD_REQUEST", str(exc)) from None

    async def mount(self, request: web.Request) -> web.Response:
        """POST /api/v1/mount?mountpoint=/<id> {"source": bootstrap, "fs_type": "rafs", "config":
        "<daemon config JSON>"}: the image at <root>/<id>, a file-backed EROFS mount served through
        fanotify. Idempotent: the same image already there (bound by this daemon, or mounted by
        its predecessor and taken back) is a success. Failures are logged here: nydus-snapshotter
        does not log them."""
        sid = self._mount_id(request)
        assert self.fuse_root is not None
        try:
            return await self._mount(request, sid, self.fuse_root / sid)
        except ApiError as exc:
            log.error("mount of image %s at %s refused (%d): %s", sid, self.fuse_root / sid, exc.status, exc.message)
            raise

    async def _mount(self, request: web.Request, sid: str, mountpoint: Path) -> web.Response:
        body = await self._json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "BAD_REQUEST", "the body must be {\"source\": ..., \"fs_type\": \"rafs\", \"config\": ...}")
        source, fs_type = body.get("source"), body.get("fs_type", "rafs")
        if not isinstance(source, str) or not source:
            raise ApiError(400, "BAD_REQUEST", f"image {sid}: `source` (the bootstrap's path) is missing")
        if fs_type not in ("rafs", "erofs"):
            raise ApiError(400, "BAD_REQUEST", f"image {sid}: fs_type {str(fs_type)[:40]!r}: fscached mounts RAFS v6 "
                                               "(EROFS) images: \"rafs\"")
        domain = self.fuse_domain
        existing = self.daemon.images.get(domain or sid, sid)
        if existing is not None:
            async with existing.lock:  # a bind of it in progress ends first
                pass
            same = existing.spec.mountpoint == mountpoint and existing.spec.bootstrap is not None and \
                await asyncio.to_thread(os.path.realpath, source) == str(existing.spec.bootstrap)
            if self.daemon.images.get(domain or sid, sid) is existing and same:
                log.info("image %s is mounted on %s already: nothing to do", sid, mountpoint)
                return no_content()
            if self.daemon.images.get(domain or sid, sid) is existing:
                raise ApiError(409, "BUSY", f"image {sid}: another image is mounted on {mountpoint} (bootstrap "
                                            f"{existing.spec.bootstrap}): unmount it first")
        if not await self.daemon.wait_until_serving(MOUNT_WAIT_SECONDS):
            raise ApiError(503, "NOT_READY", f"image {sid}: the daemon is not serving (state {self.state})")
        try:
            bind = await asyncio.to_thread(parse_rafs_config, body.get("config") or {}, fsid=sid, bootstrap=source,
                                           mountpoint=mountpoint, domain=domain, where=f"image {sid}: config")
        except BindError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
        if bind.ignored:
            log.info("image %s: config fields not used by fscached: %s", sid, ", ".join(bind.ignored))
        await self._bind(bind.spec, bind.profile, bind.bootstrap, bind.registry_token)
        log.info("mounted image %s on %s", sid, mountpoint)
        return no_content()

    async def umount(self, request: web.Request) -> web.Response:
        """DELETE /api/v1/mount?mountpoint=/<id>: unmount the image and stop serving it."""
        sid = self._mount_id(request)
        try:
            await self.daemon.unbind_image(self.fuse_domain or sid, sid)
        except NotBound as exc:
            raise ApiError(404, "NOT_FOUND", str(exc)) from None
        except BusyError as exc:
            log.error("unmount of image %s refused: %s", sid, exc)
            raise ApiError(409, "BUSY", str(exc)) from None
        return no_content()

    # -- nydusd's statistics -----------------------------------------------------------------------
    def _metrics_specs(self, request: web.Request) -> list[ImageSpec]:
        wanted = (request.query.get("id") or "").lstrip("/")
        if not wanted:
            return [spec for _, spec in sorted(self.daemon.catalog.images.items())]
        specs = self._images_with_id(wanted)
        if not specs:
            raise ApiError(404, "NOT_FOUND", f"no image with id {wanted}")
        return specs

    async def fs_metrics(self, request: web.Request) -> web.Response:
        """nydusd's FsIoStats, from fscached's counters: the kernel's reads answered (fscached
        sees them per cache-file range, not per file: they are the daemon's, for ?id= too)."""
        self._metrics_specs(request)
        frontend = self.daemon.frontend
        hits = [0] * FOP_COUNT
        errors = [0] * FOP_COUNT
        latency = [0] * (len(NYDUS_LATENCY_US) + 1)
        data_read = sizes = 0
        size_counts: list[int] = []
        total_us = 0
        if frontend is not None:
            frontend.refresh_stats()
            stats = frontend.requests
            hits[FOP_READ] = stats.total("cached") + stats.total("filled")
            errors[FOP_READ] = stats.total("failed")
            data_read = stats.bytes["cached"] + stats.bytes["filled"]
            size_counts = list(stats.size_counts)
            sizes = len(size_counts)
            for outcome in ("cached", "filled", "failed"):
                total_us += int(stats.seconds[outcome] * 1e6)
                for bound, count in zip((*stats.buckets, float("inf")), stats.counts[outcome]):
                    latency[bisect.bisect_left(NYDUS_LATENCY_US, bound * 1e6)] += count
        return web.json_response({
            "files_account_enabled": False, "access_pattern_enabled": False, "measure_latency": True,
            "id": (request.query.get("id") or "").lstrip("/"),
            "data_read": data_read,
            "block_count_read": size_counts or [0] * sizes,
            "fop_hits": hits, "fop_errors": errors,
            "fop_cumulative_latency_total": [total_us if n == FOP_READ else 0 for n in range(FOP_COUNT)],
            "read_latency_dist": latency,
            "nr_opens": frontend.objects_open() if frontend is not None else 0,
        })

    async def backend_metrics(self, request: web.Request) -> web.Response:
        """nydusd's BackendMetrics, summed over the blob sources behind the images."""
        specs = self._metrics_specs(request)
        chains = {id(blob.source): blob.source for spec in specs
                  for blob in self.daemon.catalog.devices.get((spec.volume, spec.fsid), [])}
        ok = failed = amount = 0
        kinds = set()
        for chain in chains.values():
            for key, value in chain.stats.items():
                name, _, result = key.rpartition(":")
                kinds.add(name.split(" ")[0])
                if result == "ok":
                    ok += value
                elif result in ("failed", "integrity"):
                    failed += value
            amount += sum(chain.bytes.values())
        return web.json_response({"id": (request.query.get("id") or "").lstrip("/"),
                                  "backend_type": ",".join(sorted(kinds)) or "none",
                                  "read_count": ok + failed, "read_errors": failed, "read_amount_total": amount})

    async def inflight_metrics(self, request: web.Request) -> web.Response:
        """nydusd's in-flight requests: 204 when none (as nydusd answers), else a JSON array."""
        frontend = self.daemon.frontend
        flights = frontend.in_flight() if frontend is not None else []
        if not flights:
            return no_content()
        return web.json_response([{"inode": f.inode, "opcode": 15, "unique": f.request,
                                   "timestamp_secs": int(f.started)} for f in flights])

    async def files_metrics(self, request: web.Request) -> web.Response:
        """nydusd's per-file statistics and access patterns: the kernel reads the files of an
        EROFS mount itself, fscached sees only ranges of blobs: none to report."""
        self._metrics_specs(request)
        return web.json_response([])

    # -- binds ----------------------------------------------------------------------------------
    async def bind(self, request: web.Request) -> web.Response:
        self._need_serving()
        await self.bind_entry(await self._json(request))
        return no_content()

    async def bind_entry(self, entry: Any) -> ImageSpec:
        """Parse, check and serve one bind entry (the route, and nydusd's `--config` blobs).
        Raises ApiError."""
        self._need_serving()
        try:
            bind = await asyncio.to_thread(parse_bind_entry, entry)
        except BindError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
        spec = bind.spec
        if bind.ignored:
            log.info("image %s: bind fields not used by fscached: %s", spec.fsid, ", ".join(bind.ignored))
        if self.daemon.images.get(spec.volume, spec.fsid) is not None:
            if self.daemon.rebind_restored(spec):  # nydus-snapshotter's bind after a hot upgrade
                return spec
            raise ApiError(400, "ALREADY_EXISTS", f"blob_cache: bootstrap blob already exists: image {spec.fsid} "
                                                  f"in {spec.volume}")
        claimed = any(image.spec.mountpoint == spec.mountpoint for image in self.daemon.images)
        if spec.mountpoint is not None and not claimed and await asyncio.to_thread(mounts.is_mountpoint,
                                                                                    spec.mountpoint):
            raise ApiError(400, "BAD_REQUEST", f"image {spec.fsid}: mountpoint {spec.mountpoint} is already a mount "
                                               "point: give an empty directory")
        if spec.bootstrap is None:  # fscached's "ref": pull the bootstrap, then check it as any other
            spec = await self._pull(spec)
        spec = await self._bind(spec, bind.profile, bind.bootstrap, bind.registry_token)
        log.info("bound image %s%s (%s form)", spec.fsid, f" in domain {spec.domain}" if spec.domain else "", bind.form)
        return spec

    async def _bind(self, spec: ImageSpec, profile: Any, parsed: Any, token: str | None) -> ImageSpec:
        """The daemon's bind, its errors as nydusd's answers."""
        try:
            spec = await self.daemon.bind_image(spec, profile=profile, parsed=parsed)
        except AlreadyBound as exc:
            raise ApiError(400, "ALREADY_EXISTS", str(exc)) from None
        except NotServing as exc:
            raise ApiError(503, "NOT_READY", f"image {spec.fsid}: {exc}") from None
        except (MountpointTaken, CatalogError, ValueError) as exc:
            raise ApiError(400, "BAD_REQUEST", str(exc)) from None
        except OSError as exc:
            raise ApiError(500, "DAEMON_ERROR", f"image {spec.fsid}: {exc.strerror or exc}"
                           + (f" ({exc.filename})" if exc.filename else "")) from None
        except SourceError as exc:
            raise ApiError(500, "DAEMON_ERROR", f"image {spec.fsid}: {exc}") from None
        if token:
            self.daemon.seed_registry_token(spec, token)
        return spec

    async def _pull(self, spec: ImageSpec) -> ImageSpec:
        try:
            path = await self.daemon.pull_image_bootstrap(spec)
        except CatalogError as exc:
            raise ApiError(500, "DAEMON_ERROR", str(exc)) from None
        try:
            await asyncio.to_thread(check_metadata_file, str(path))  # parsed once, by the bind
        except BindError as exc:
            raise ApiError(exc.status, exc.code, f"image {spec.fsid}: pulled from {spec.ref}: {exc}") from None
        return dataclasses.replace(spec, bootstrap=path)

    async def list_blobs(self, request: web.Request) -> web.Response:
        domain_id = request.query.get("domain_id")
        if not domain_id:
            raise ApiError(400, "BAD_REQUEST", "GET /api/v2/blobs needs ?domain_id=")
        entries = [{"type": "bootstrap", **self._image_json(spec)}
                   for (volume, _), spec in sorted(self.daemon.catalog.images.items()) if volume == domain_id]
        return web.json_response(entries)

    async def unbind(self, request: web.Request) -> web.Response:
        domain_id = request.query.get("domain_id") or ""
        blob_id = request.query.get("blob_id") or ""
        if not domain_id and not blob_id:
            raise ApiError(400, "BAD_REQUEST", "DELETE /api/v2/blobs needs ?domain_id= and/or ?blob_id=")
        if self.daemon.frontend is None:
            raise ApiError(503, "NOT_READY", f"the daemon is not serving the kernel (state {self.state})")
        if not domain_id:
            return await self._cull(blob_id)
        if blob_id:
            targets = [(domain_id, blob_id)]
        else:  # nydusd: every entry of the domain; none is not an error
            targets = [image.key for image in self.daemon.images if image.key[0] == domain_id]
        for volume, fsid in targets:
            if self.daemon.images.get(volume, fsid) is None and any(
                    blob.info.blob_id == fsid for v, blob in self.daemon.catalog.blobs() if v == volume):
                raise ApiError(400, "BAD_REQUEST", f"blob_cache: {fsid} is a data blob of domain {volume}: unbind "
                                                   "the images that use it (their bootstrap ids)")
            try:
                await self.daemon.unbind_image(volume, fsid)
            except NotBound as exc:
                if blob_id:
                    raise ApiError(404, "NOT_FOUND", str(exc)) from None
                continue  # unbound by a request beside this one: the domain is empty all the same
            except BusyError as exc:
                raise ApiError(409, "BUSY", str(exc)) from None
            except OSError as exc:
                raise ApiError(500, "DAEMON_ERROR", f"image {fsid}: {exc.strerror or exc}") from None
            log.info("unbound image %s%s", fsid, f" in domain {volume}" if volume != fsid else "")
        return no_content()

    async def _cull(self, blob_id: str) -> web.Response:
        try:
            await self.daemon.janitor.cull(blob_id)
        except CullBusy as exc:
            raise ApiError(409, "BUSY", f"blob {blob_id}: {exc}") from None
        except CullFailed as exc:
            raise ApiError(500, "DAEMON_ERROR", f"culling {blob_id}: {exc}") from None
        except ValueError as exc:
            raise ApiError(400, "BAD_REQUEST", str(exc)) from None
        except LookupError as exc:
            raise ApiError(404, "NOT_FOUND", f"blob_cache: cache entry not found: {exc}") from None
        except OSError as exc:
            raise ApiError(500, "DAEMON_ERROR", f"culling {blob_id}: {exc.strerror or exc}") from None
        return no_content()

    # -- metrics and credentials ------------------------------------------------------------------
    async def blobcache_metrics(self, request: web.Request) -> web.Response:
        wanted = (request.query.get("id") or "").lstrip("/")  # the snapshotter sends "/<id>"
        if wanted:
            specs = self._images_with_id(wanted)
            if not specs:
                raise ApiError(404, "NOT_FOUND", f"blob_cache: cache entry not found: no bind with id {wanted}")
        else:
            specs = [spec for _, spec in sorted(self.daemon.catalog.images.items())]
        return web.json_response(self._cache_metrics(wanted, specs))

    def _cache_metrics(self, wanted: str, specs: list[ImageSpec]) -> dict[str, Any]:
        daemon = self.daemon
        seen: dict[int, tuple[str, BlobObject]] = {}
        for spec in specs:
            for blob in daemon.catalog.devices.get((spec.volume, spec.fsid), []):
                seen.setdefault(id(blob), (spec.volume, blob))
        blobs = [self._blob_metrics(volume, blob) for volume, blob in seen.values()]
        prefetching = sum(1 for spec in specs if spec.prefetch.mode != "none")
        return {
            # nydusd's field names (nydus-snapshotter's CacheMetrics)
            "id": wanted,
            "underlying_files": [b["cache_file"] for b in blobs],
            "store_path": str(daemon.config.cache_dir),
            "partial_hits": 0,
            "whole_hits": 0,
            "total": sum(b["chunks"] for b in blobs),
            "entries_count": len(blobs),
            "prefetch_data_amount": sum(b["bytes_filled"] for b in blobs if b["prefetch"] != "none"),
            "prefetch_requests_count": 0,
            "prefetch_workers": prefetching,
            "prefetch_cumulative_time_millis": 0,
            "prefetch_begin_time_secs": 0,
            "prefetch_end_time_secs": 0,
            "buffered_backend_size": 0,
            # fscached's own: what each blob holds now
            "backend": daemon.kernel_path,  # the kernel path (a field name API clients read)
            "images": [{"id": spec.fsid, "domain_id": spec.domain or ""} for spec in specs],
            "blobs": blobs,
            "size": sum(b["size"] for b in blobs),
            "chunks_filled": sum(b["chunks_filled"] for b in blobs),
            "bytes_filled": sum(b["bytes_filled"] for b in blobs),
        }

    def _blob_metrics(self, volume: str, blob: BlobObject) -> dict[str, Any]:
        frontend = self.daemon.frontend
        cache_file = f"{volume}/{blob.info.blob_id}"
        target = None
        if frontend is not None:
            fill = frontend.blob_fill(volume, blob)
            cache_file, target = fill.cache_file, fill.target
        written = set(target.written) if target is not None else set()
        filled = [c for c in blob.chunk_map.chunks if c.uncompressed_offset in written]
        return {
            "blob_id": blob.info.blob_id,
            "cache_file": cache_file,
            "size": blob.size,
            "chunks": len(blob.chunk_map),
            "chunks_filled": len(filled),
            "bytes_filled": sum(c.uncompressed_size for c in filled),
            "open": target is not None,
            "prefetch": blob.prefetch_mode,
            "users": sorted(blob.users),
        }

    async def put_config(self, request: web.Request) -> web.Response:
        wanted = (request.query.get("id") or "").lstrip("/")
        if not wanted:
            raise ApiError(400, "BAD_REQUEST", "PUT /api/v1/config needs ?id=<bind id>")
        body = await self._json(request)
        auth = body.get("registry_auth") if isinstance(body, dict) else None
        if not isinstance(auth, str) or not auth:
            raise ApiError(400, "BAD_REQUEST", "the body must be {\"registry_auth\": \"<base64 of user:password>\"}")
        try:
            check_auth(f"image {wanted}", "registry_auth", auth)
        except ConfigError as exc:  # names the field, never the value
            raise ApiError(400, "BAD_REQUEST", str(exc)) from None
        specs = self._images_with_id(wanted)
        if not specs:
            raise ApiError(404, "NOT_FOUND", f"blob_cache: cache entry not found: no bind with id {wanted}")
        renewed = 0
        for spec in specs:
            if spec.registry is None:
                raise ApiError(400, "BAD_REQUEST", f"image {wanted} has no registry backend: no credentials to renew")
            renewed += self.daemon.renew_credentials(spec, auth)
        log.info("image %s: registry credentials renewed (%d source(s))", wanted, renewed)
        return no_content()

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=render_metrics(self.daemon), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})
