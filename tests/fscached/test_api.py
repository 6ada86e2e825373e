"""The nydusd-compatible control API (fscached.api.server) against a Daemon answering the kernel
simulator, spoken to as nydus-snapshotter does: HTTP/1.1 over the unix socket (aiohttp's
UnixConnector), with the API running on the daemon's own loop."""
from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import uvloop

from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from fscached.api.server import KEEPALIVE_SECONDS, ApiServer, ApiSocketError, check_socket_path
from fscached.config import Config
from fscached.daemon import Daemon
from simdaemon import expected_blob_space, make_tree
from standins.kernel_simulator import KernelSimulator



def available(module: str) -> bool:
    """Asked when the route is called: other modules come and go in a shared checkout."""
    return importlib.util.find_spec(module) is not None


class ApiDaemon:
    """A Daemon with its API on one uvloop thread. The API starts first (state INIT); the
    daemon binds to the simulator and serves once `release()` is called."""

    def __init__(self, sim: KernelSimulator, cache: Path, sock: Path, *, autostart: bool = True) -> None:
        self.daemon = Daemon(Config(cache_dir=cache, work_dir=cache.parent / "state"), device=sim.device())
        self.api = ApiServer(self.daemon, sock, daemon_id="daemon-1", supervisor="/run/sup.sock", autostart=autostart)
        self.sock = sock
        self.loop: asyncio.AbstractEventLoop | None = None
        self.go: asyncio.Event | None = None
        self.started = threading.Event()
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(30), "API did not start"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        async def main() -> int:
            self.loop = asyncio.get_running_loop()
            self.go = asyncio.Event()
            try:
                await self.api.start()
            except BaseException as exc:
                self.error = exc
                self.started.set()
                return 1
            self.started.set()
            try:
                await self.go.wait()
                if self.daemon.stopping:
                    return 0
                self.daemon.take_kernel_path()
                return await self.daemon.run()
            finally:
                await self.api.stop()

        self.exit_code = uvloop.run(main())

    def release(self) -> None:
        assert self.loop is not None and self.go is not None
        self.loop.call_soon_threadsafe(self.go.set)
        deadline = time.monotonic() + 30
        while not self.daemon.serving:
            assert time.monotonic() < deadline, "daemon did not start serving"
            time.sleep(0.01)

    def stop(self) -> int | None:
        if not self.thread.is_alive():
            return self.exit_code
        self.daemon.stop()
        if self.loop is not None and self.go is not None:
            self.loop.call_soon_threadsafe(self.go.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "daemon did not stop"
        return self.exit_code


def call(sock: Path, method: str, path: str, body: Any = None, *, raw: bytes | None = None
         ) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection: (status, headers, JSON body | bytes | None)."""
    async def go() -> tuple[int, dict[str, str], Any]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session:
            kwargs: dict[str, Any] = {}
            if raw is not None:
                kwargs["data"] = raw
            elif body is not None:
                kwargs["json"] = body
            async with session.request(method, f"http://localhost{path}", **kwargs) as resp:
                data = await resp.read()
                headers = dict(resp.headers)
                if not data:
                    return resp.status, headers, None
                if resp.content_type == "application/json":
                    return resp.status, headers, json.loads(data)
                return resp.status, headers, data
    return asyncio.run(go())


def legacy_entry(fsid: str, built: Path, work: Path, domain: str | None = None, **extra: Any) -> dict[str, Any]:
    """What nydus-snapshotter sends (legacy "config" form), localfs backend."""
    return {
        "type": "bootstrap", "id": fsid, "domain_id": domain or fsid,
        "config": {
            "id": fsid, "backend_type": "localfs",
            "backend_config": {"dir": str(built / "blobs"), "readahead": False},
            "cache_type": "fscache", "cache_config": {"work_dir": str(work)},
            "prefetch_config": {"enable": False, "threads_count": 8, "merging_size": 1048576, "bandwidth_rate": 0},
            "metadata_path": str(built / "image.boot"),
        },
        **extra,
    }


def v2_entry(fsid: str, built: Path, work: Path, domain: str | None = None) -> dict[str, Any]:
    return {
        "type": "bootstrap", "id": fsid, "domain_id": domain or "",
        "config_v2": {
            "version": 2, "id": fsid,
            "backend": {"type": "localfs", "localfs": {"dir": str(built / "blobs")}},
            "cache": {"type": "fscache", "fscache": {"work_dir": str(work)},
                      "prefetch": {"enable": True, "threads": 4, "prefetch_all": False}},
            "metadata_path": str(built / "image.boot"),
        },
    }


@pytest.fixture
def built(work: Path) -> Path:
    convert(make_tree(work / "tree"), work / "built", compressor="zstd", chunk_size=64 << 10)
    return work / "built"


@pytest.fixture
def running(work: Path) -> Iterator[tuple[ApiDaemon, KernelSimulator]]:
    with KernelSimulator(work / "kernel") as sim:
        api = ApiDaemon(sim, work / "cache", work / "run" / "api" / "api.sock")
        try:
            api.release()
            yield api, sim
        finally:
            assert api.stop() == 0


def assert_error(result: tuple[int, dict[str, str], Any], status: int, code: str, text: str = "") -> str:
    got, headers, body = result
    assert got == status, result
    assert headers["Content-Type"].startswith("application/json"), headers
    assert isinstance(body, dict) and set(body) == {"code", "message"}, body
    assert body["code"] == code, body
    assert text in body["message"], body
    return body["message"]


def test_states_init_ready_running_then_exit(work: Path, built: Path) -> None:
    sock = work / "run" / "api.sock"
    with KernelSimulator(work / "kernel") as sim:
        api = ApiDaemon(sim, work / "cache", sock, autostart=False)
        try:
            status, _, info = call(sock, "GET", "/api/v1/daemon")
            assert status == 200 and info["state"] == "INIT", info
            assert_error(call(sock, "PUT", "/api/v2/blobs", legacy_entry("img", built, work)), 503, "NOT_READY", "INIT")
            assert_error(call(sock, "PUT", "/api/v1/daemon/start"), 503, "NOT_READY")
            api.release()
            assert call(sock, "GET", "/api/v2/daemon")[2]["state"] == "READY"
            # binds work in READY already
            assert call(sock, "PUT", "/api/v2/blobs", legacy_entry("img", built, work))[0] == 204
            assert call(sock, "PUT", "/api/v1/daemon/start")[:3:2] == (204, None)
            assert call(sock, "GET", "/api/v1/daemon")[2]["state"] == "RUNNING"
            assert call(sock, "PUT", "/api/v1/daemon/start")[0] == 204, "start while RUNNING is a no-op"
            assert call(sock, "PUT", "/api/v1/daemon/exit")[:3:2] == (204, None)
            api.thread.join(30)
            assert not api.thread.is_alive(), "exit did not stop the daemon"
            assert api.exit_code == 0
            assert not sock.exists(), "a clean exit removes the socket"
        finally:
            api.stop()


def test_daemon_info_fields(running: tuple[ApiDaemon, KernelSimulator], built: Path, work: Path) -> None:
    from fscached.util.buildinfo import build_info

    api, _ = running
    assert call(api.sock, "PUT", "/api/v2/blobs", legacy_entry("img", built, work))[0] == 204
    assert call(api.sock, "PUT", "/api/v2/blobs", legacy_entry("img2", built, work, domain="dom"))[0] == 204
    for path in ("/api/v1/daemon", "/api/v2/daemon"):
        status, headers, info = call(api.sock, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert set(info) == {"version", "id", "supervisor", "state", "backend_collection", "fscached"}
        assert set(info["version"]) == {"package_ver", "git_commit", "build_time", "profile", "rustc"}
        assert info["version"] == build_info() and len(info["version"]["git_commit"]) == 40
        assert (info["id"], info["supervisor"], info["state"]) == ("daemon-1", "/run/sup.sock", "RUNNING")
        own = info["fscached"]
        assert set(own) == {"backend", "kernel", "cache_dir", "images", "counters"}
        assert own["backend"] == "cachefiles" and own["kernel"] == os.uname().release
        assert own["cache_dir"] == str(work / "cache")
        boot = Bootstrap.open(built / "image.boot")
        images = {i["id"]: i for i in own["images"]}
        assert set(images) == {"img", "img2"}
        for image in images.values():
            assert set(image) == {"id", "domain_id", "bootstrap", "mountpoint", "mount", "blobs"}
            assert image["bootstrap"] == str(built / "image.boot") and image["mountpoint"] is None
            assert image["blobs"] == [b.blob_id for b in boot.blobs]
        assert images["img"]["domain_id"] == "" and images["img2"]["domain_id"] == "dom"
        assert images["img"]["mount"] == {"source": "none", "fstype": "erofs", "options": "fsid=img"}
        assert images["img2"]["mount"] == {"source": "none", "fstype": "erofs", "options": "domain_id=dom,fsid=img2"}
        assert isinstance(own["counters"], dict)


def test_bind_legacy_and_v2_then_kernel_reads_the_right_bytes(running: tuple[ApiDaemon, KernelSimulator],
                                                              built: Path, work: Path) -> None:
    api, sim = running
    boot = Bootstrap.open(built / "image.boot")
    want = expected_blob_space(boot, built / "blobs", 0)
    raw_boot = (built / "image.boot").read_bytes()
    # the snapshotter's form, domain = the id (no shared domain): volume "erofs,<id>"
    fsid = "a" * 64
    assert call(api.sock, "PUT", "/api/v2/blobs", legacy_entry(fsid, built, work))[:3:2] == (204, None)
    meta = sim.mount(f"erofs,{fsid}", fsid.encode())
    assert sim.read(meta, 0, 4096) == raw_boot[:4096]
    blob = sim.mount(f"erofs,{fsid}", boot.blobs[0].blob_id.encode())
    assert blob.copen_result == len(want)
    assert sim.read(blob, 0, len(want)) == want
    # config_v2 form in a shared domain
    assert call(api.sock, "PUT", "/api/v2/blobs", v2_entry("img-v2", built, work, domain="shared"))[0] == 204
    blob2 = sim.mount("erofs,shared", boot.blobs[0].blob_id.encode())
    mid = len(want) // 2 // 4096 * 4096
    assert sim.read(blob2, mid, 8192) == want[mid:mid + 8192]
    # the v2 entry asked for prefetch (table): the catalog got it
    spec = api.daemon.catalog.images[("shared", "img-v2")]
    assert spec.prefetch.mode == "table"
    # per-bind cache metrics
    status, _, metrics = call(api.sock, "GET", f"/api/v1/metrics/blobcache?id=/{fsid}")
    assert status == 200
    for key in ("id", "underlying_files", "store_path", "partial_hits", "whole_hits", "total", "entries_count",
                "prefetch_data_amount", "prefetch_requests_count", "prefetch_workers",
                "prefetch_cumulative_time_millis", "prefetch_begin_time_secs", "prefetch_end_time_secs",
                "buffered_backend_size"):
        assert key in metrics, key
    assert metrics["id"] == fsid and metrics["entries_count"] == 1
    assert metrics["blobs"][0]["blob_id"] == boot.blobs[0].blob_id and metrics["blobs"][0]["open"]
    assert metrics["blobs"][0]["chunks_filled"] == metrics["blobs"][0]["chunks"] > 0, "the whole blob was read"
    assert metrics["bytes_filled"] > 0
    assert_error(call(api.sock, "GET", "/api/v1/metrics/blobcache?id=nope"), 404, "NOT_FOUND")
    # named by the snapshot id the fscache id was derived from (as nydus-snapshotter derives it)
    snap = "snapshot-7"
    snap_id = hashlib.sha256(f"nydus-snapshot-{snap}".encode()).hexdigest()
    assert call(api.sock, "PUT", "/api/v2/blobs", legacy_entry(snap_id, built, work))[0] == 204
    status, _, by_snapshot = call(api.sock, "GET", f"/api/v1/metrics/blobcache?id=/{snap}")
    assert status == 200 and by_snapshot["images"] == [{"id": snap_id, "domain_id": ""}]
    assert call(api.sock, "DELETE", f"/api/v2/blobs?domain_id={snap_id}")[0] == 204
    assert call(api.sock, "GET", "/api/v1/metrics/blobcache")[2]["entries_count"] == 2  # every bind
    # GET /api/v2/blobs?domain_id=
    status, _, entries = call(api.sock, "GET", "/api/v2/blobs?domain_id=shared")
    assert status == 200 and [e["id"] for e in entries] == ["img-v2"]
    # unbind: the snapshotter's forms; the image's objects close
    assert call(api.sock, "DELETE", f"/api/v2/blobs?domain_id={fsid}")[:3:2] == (204, None)
    assert not sim.anon_fd_open(blob) and not sim.anon_fd_open(meta)
    assert sim.mount(f"erofs,{fsid}", fsid.encode()).copen_result == -errno.ENOENT
    assert call(api.sock, "DELETE", "/api/v2/blobs?domain_id=shared&blob_id=img-v2")[0] == 204
    assert api.daemon.catalog.images == {}
    # unbind of a missing entry: the text nydus-snapshotter matches
    assert_error(call(api.sock, "DELETE", "/api/v2/blobs?domain_id=shared&blob_id=img-v2"), 404, "NOT_FOUND",
                 "blob_cache: cache entry not found")
    # nydusd: removing every entry of an empty domain is not an error
    assert call(api.sock, "DELETE", "/api/v2/blobs?domain_id=nothing-here")[0] == 204


def test_bind_errors(running: tuple[ApiDaemon, KernelSimulator], built: Path, work: Path) -> None:
    api, sim = running
    assert call(api.sock, "PUT", "/api/v2/blobs", legacy_entry("img", built, work))[0] == 204
    # a second bind of the same bootstrap (same id in the same domain)
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", legacy_entry("img", built, work)), 400, "ALREADY_EXISTS",
                 "already")
    # metadata_path missing: refused before anything is served
    entry = legacy_entry("ghost", built, work)
    entry["config"]["metadata_path"] = str(work / "no-such" / "image.boot")
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", entry), 400, "BAD_REQUEST", "metadata_path")
    assert sim.mount("erofs,ghost", b"ghost").copen_result == -errno.ENOENT
    assert ("ghost", "ghost") not in api.daemon.catalog.images
    # metadata_path a directory, and not a bootstrap at all
    entry["config"]["metadata_path"] = str(work)
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", entry), 400, "BAD_REQUEST", "not a regular file")
    (work / "junk.boot").write_bytes(os.urandom(8192))
    entry["config"]["metadata_path"] = str(work / "junk.boot")
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", entry), 400, "BAD_REQUEST", "RAFS v6")
    # nydusd's rules: ids, work_dir, registry host/repo; oss: unsupported
    bad = legacy_entry("x/y", built, work)
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", bad), 400, "BAD_REQUEST", "'/'")
    bad = legacy_entry("img3", built, work)
    bad["config"]["cache_config"]["work_dir"] = ""
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", bad), 400, "BAD_REQUEST", "work_dir")
    bad = legacy_entry("img3", built, work)
    bad["config"]["backend_type"] = "oss"
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", bad), 501, "UNSUPPORTED", "oss")
    # bodies that are not a bind entry
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", raw=b"{not json"), 400, "BAD_REQUEST", "JSON")
    assert_error(call(api.sock, "PUT", "/api/v2/blobs"), 400, "BAD_REQUEST", "JSON body")
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", [1, 2]), 400, "BAD_REQUEST")
    assert set(api.daemon.catalog.images) == {("img", "img")}


def test_other_routes(running: tuple[ApiDaemon, KernelSimulator], built: Path, work: Path) -> None:
    import logging

    api, _ = running
    sock = api.sock
    # log level
    before = logging.getLogger().level
    try:
        assert call(sock, "PUT", "/api/v1/daemon", {"log_level": "debug"})[:3:2] == (204, None)
        assert logging.getLogger().level == logging.DEBUG
        assert call(sock, "PUT", "/api/v1/daemon", {"log_level": "warn"})[0] == 204
        assert logging.getLogger().level == logging.WARNING
        assert_error(call(sock, "PUT", "/api/v1/daemon", {"log_level": "loud"}), 400, "BAD_REQUEST", "log_level")
    finally:
        logging.getLogger().setLevel(before)
    # failover (tests/fscached/test_failover_sim.py): nobody listens on this supervisor socket, and a
    # daemon that bound the device itself takes nothing over
    assert_error(call(sock, "PUT", "/api/v1/daemon/fuse/sendfd"), 500, "DAEMON_ERROR", "/run/sup.sock")
    assert_error(call(sock, "PUT", "/api/v1/daemon/fuse/takeover"), 400, "BAD_REQUEST", "not waiting")
    # nydusd's statistics are answered (issue 15); its fusedev mounts only by `nydusd fuse`
    status, _, fs = call(sock, "GET", "/api/v1/metrics")
    assert status == 200 and fs["fop_errors"] == [0] * 15 and "data_read" in fs, fs
    assert_error(call(sock, "POST", "/api/v1/mount?mountpoint=/x", {}), 501, "UNSUPPORTED")
    # unknown route, wrong method, missing query
    assert_error(call(sock, "GET", "/api/v1/nothing"), 404, "NO_ROUTE", "/api/v1/nothing")
    assert_error(call(sock, "GET", "/api/v1/daemon/exit"), 400, "BAD_REQUEST", "GET")
    assert_error(call(sock, "POST", "/api/v2/blobs", {}), 400, "BAD_REQUEST")
    assert_error(call(sock, "DELETE", "/api/v2/blobs"), 400, "BAD_REQUEST", "domain_id")
    assert_error(call(sock, "GET", "/api/v2/blobs"), 400, "BAD_REQUEST", "domain_id")
    # cull (DELETE ?blob_id=): fscached.cache_gc when installed
    cull_available = available("fscached.cache_gc")
    result = call(sock, "DELETE", "/api/v2/blobs?blob_id=" + "b" * 64)
    if cull_available:  # nothing cached under that id
        assert_error(result, 404, "NOT_FOUND", "blob_cache: cache entry not found")
        assert_error(call(sock, "DELETE", "/api/v2/blobs?blob_id=sha256:" + "b" * 64), 400, "BAD_REQUEST")
    else:
        assert_error(result, 501, "UNSUPPORTED", "fscached.cache_gc")
    # Prometheus text: fscached.metrics when installed
    metrics_available = available("fscached.metrics")
    status, headers, body = call(sock, "GET", "/metrics")
    if metrics_available:
        assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert isinstance(body, bytes)
    else:
        assert_error((status, headers, body), 501, "UNSUPPORTED", "fscached.metrics")


def test_bind_by_reference_pulls_the_bootstrap(running: tuple[ApiDaemon, KernelSimulator], built: Path,
                                               work: Path, registry: Any) -> None:
    """fscached's "ref" field (what `fscachedctl bind --ref` sends): the daemon pulls the
    bootstrap from the registry, blobs come from there too."""
    import shutil

    if shutil.which("skopeo") is None:
        pytest.fail("skopeo not installed (make deps installs it)")
    index = json.loads((built / "oci" / "index.json").read_text())
    tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    push = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{built / 'oci'}:{tag}",
                           f"docker://{registry.host}/api/app:v1"], capture_output=True, text=True, timeout=120)
    assert push.returncode == 0, push.stderr
    api, sim = running
    entry = {"type": "bootstrap", "id": "pulled", "domain_id": "pulled", "ref": f"{registry.host}/api/app:v1",
             "config": {"id": "pulled", "backend_type": "registry", "backend_config": {"scheme": "http"},
                        "cache_type": "fscache", "cache_config": {"work_dir": str(work)}}}
    assert call(api.sock, "PUT", "/api/v2/blobs", entry)[:3:2] == (204, None)
    spec = api.daemon.catalog.images[("pulled", "pulled")]
    assert spec.ref == f"{registry.host}/api/app:v1" and spec.registry is not None
    assert (spec.registry.host, spec.registry.repo, spec.registry.scheme) == (registry.host, "api/app", "http")
    assert spec.bootstrap is not None and spec.bootstrap.read_bytes() == (built / "image.boot").read_bytes()
    assert str(spec.bootstrap).startswith(str(work / "state")), "pulled into the daemon's work dir"
    boot = Bootstrap.open(built / "image.boot")
    blob = sim.mount("erofs,pulled", boot.blobs[0].blob_id.encode())
    want = expected_blob_space(boot, built / "blobs", 0)
    assert sim.read(blob, 0, len(want)) == want, "blob bytes fetched from the registry"
    # a reference that does not exist: the daemon could not pull it
    missing = dict(entry, id="gone", domain_id="gone", ref=f"{registry.host}/api/app:nope")
    assert_error(call(api.sock, "PUT", "/api/v2/blobs", missing), 500, "DAEMON_ERROR", "cannot pull")
    assert ("gone", "gone") not in api.daemon.catalog.images


def test_registry_credentials_renewed_never_echoed(running: tuple[ApiDaemon, KernelSimulator], built: Path,
                                                   work: Path) -> None:
    from fetcher.registry import RegistrySource

    api, _ = running
    old = base64.b64encode(b"alice:old-secret").decode()
    entry = legacy_entry("reg", built, work)
    entry["config"]["backend_type"] = "registry"
    entry["config"]["backend_config"] = {"host": "registry.invalid:5000", "repo": "team/app", "auth": old,
                                         "scheme": "http", "timeout": 5, "proxy": {"url": ""}}
    assert call(api.sock, "PUT", "/api/v2/blobs", entry)[0] == 204
    chain = api.daemon.catalog.devices[("reg", "reg")][0].source
    registry = next(s for s in chain.sources if isinstance(s, RegistrySource))
    assert registry._auth.credentials.password == "old-secret"
    new = base64.b64encode(b"alice:new-secret").decode()
    assert call(api.sock, "PUT", "/api/v1/config?id=reg", {"registry_auth": new})[:3:2] == (204, None)
    assert registry._auth.credentials.password == "new-secret"
    secret = "not-base64-but-secret!"
    message = assert_error(call(api.sock, "PUT", "/api/v1/config?id=reg", {"registry_auth": secret}), 400,
                           "BAD_REQUEST", "registry_auth")
    assert secret not in message
    assert_error(call(api.sock, "PUT", "/api/v1/config?id=nope", {"registry_auth": new}), 404, "NOT_FOUND")
    assert_error(call(api.sock, "PUT", "/api/v1/config", {"registry_auth": new}), 400, "BAD_REQUEST", "id")
    # nydusd's registry_token: sent as a Bearer token (until the registry refuses it)
    tokened = json.loads(json.dumps(entry))
    tokened["id"] = tokened["domain_id"] = "tok"
    tokened["config"]["backend_config"].update(host="other.invalid", auth="", registry_token="tkn-123")
    assert call(api.sock, "PUT", "/api/v2/blobs", tokened)[0] == 204
    chain = api.daemon.catalog.devices[("tok", "tok")][0].source
    other = next(s for s in chain.sources if isinstance(s, RegistrySource))
    assert other._auth.header() == "Bearer tkn-123"
    _, _, info = call(api.sock, "GET", "/api/v1/daemon")
    assert "tkn-123" not in json.dumps(info) and "old-secret" not in json.dumps(info)
    assert call(api.sock, "PUT", "/api/v2/blobs", legacy_entry("local", built, work))[0] == 204
    assert_error(call(api.sock, "PUT", "/api/v1/config?id=local", {"registry_auth": new}), 400, "BAD_REQUEST",
                 "no registry")
    # a bad auth in a bind entry: named, never echoed
    bad = json.loads(json.dumps(entry))
    bad["id"] = bad["domain_id"] = "reg2"
    bad["config"]["backend_config"]["auth"] = secret
    message = assert_error(call(api.sock, "PUT", "/api/v2/blobs", bad), 400, "BAD_REQUEST", "auth")
    assert secret not in message


def test_idle_keepalive_connection_survives_pauses(running: tuple[ApiDaemon, KernelSimulator]) -> None:
    api, _ = running

    async def go() -> int:
        created = 0

        async def on_create(*_: Any) -> None:
            nonlocal created
            created += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_create)
        connector = aiohttp.UnixConnector(path=str(api.sock), keepalive_timeout=300)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            for _ in range(4):
                async with session.get("http://localhost/api/v1/daemon") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["state"] == "RUNNING"
                await asyncio.sleep(1.0)
        return created

    assert asyncio.run(go()) == 1, "the idle connection was closed between requests"
    # the snapshotter's liveness monitor: a connection that never sends anything stays open
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(api.sock))
    try:
        time.sleep(1.5)
        raw.setblocking(False)
        with pytest.raises(BlockingIOError):
            raw.recv(1)  # b"" would be the server hanging up
        raw.setblocking(True)
        raw.sendall(b"GET /api/v1/daemon HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        assert api.api.runner is not None and api.api.runner.server is not None
        handlers = api.api.runner.server.connections
        assert handlers and all(h.keepalive_timeout >= KEEPALIVE_SECONDS >= 365 * 24 * 3600 for h in handlers)
    finally:
        raw.close()


def test_socket_permissions_and_directory_checks(work: Path) -> None:
    # created: the directory 0700, the socket 0600
    sock = work / "new" / "dir" / "api.sock"
    with KernelSimulator(work / "kernel") as sim:
        api = ApiDaemon(sim, work / "cache", sock)
        try:
            assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
            st = os.lstat(sock)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            # a live socket is not taken over
            with pytest.raises(ApiSocketError, match="in use"):
                check_socket_path(sock)
        finally:
            api.stop()
    # a stale socket (nobody answers) is replaced
    stale_dir = work / "stale"
    stale_dir.mkdir(mode=0o700)
    stale = stale_dir / "api.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    check_socket_path(stale)
    assert not stale.exists()
    # something else at the path is left alone
    stale.write_text("not a socket")
    with pytest.raises(ApiSocketError, match="not a socket"):
        check_socket_path(stale)
    # a directory others may write to and that is not ours; one owned by another user
    if os.geteuid() == 0:
        shared = work / "shared"
        shared.mkdir()
        os.chown(shared, 65534, 65534)
        os.chmod(shared, 0o777)
        with pytest.raises(ApiSocketError, match="writable by others"):
            check_socket_path(shared / "api.sock")
        os.chmod(shared, 0o755)
        with pytest.raises(ApiSocketError, match="belongs to uid 65534"):
            check_socket_path(shared / "api.sock")
    # ours and 0755 (what nydus-snapshotter creates): fine
    plain = work / "plain"
    plain.mkdir(mode=0o755)
    check_socket_path(plain / "api.sock")


# -- the `nydusd` command line (fscached.nydusd_cli) ------------------------------------------------
NYDUSD = [sys.executable, "-m", "fscached.nydusd_cli"]


def nydusd_version() -> dict[str, str]:
    proc = subprocess.run([*NYDUSD, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("nydusd (fscached) ")
    return {k: v.strip() for k, v in (line.split(":", 1) for line in proc.stdout.splitlines()[1:])}


def test_nydusd_version_matches_the_api(tmp_path: Path) -> None:
    """What the snapshotter compares: `nydusd --version`'s Git Commit line and a running
    nydusd's version.git_commit (a real process: --upgrade serves the API without a kernel)."""
    sock = tmp_path / "run" / "api.sock"
    for _attempt in range(3):  # other people edit this checkout: the code may change between the two
        before = nydusd_version()
        proc = subprocess.Popen([*NYDUSD, "singleton", "--fscache", str(tmp_path / "cache"), "--apisock", str(sock),
                                 "--upgrade"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not sock.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "nydusd --upgrade did not start"
                time.sleep(0.05)
            info = call(sock, "GET", "/api/v1/daemon")[2]["version"]
            assert call(sock, "PUT", "/api/v1/daemon/exit")[0] == 204
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        after = nydusd_version()
        if before == after:
            break
    assert set(before) == {"Version", "Git Commit", "Build Time", "Profile", "Rustc"}
    assert before["Git Commit"] == info["git_commit"], "the snapshotter would start a hot upgrade"
    assert before["Version"] == info["package_ver"] and len(info["git_commit"]) == 40


@pytest.mark.parametrize("args, text", [
    ([], "no mode"),
    (["fuse", "--fscache", "/x", "--apisock", "/y"], "--mountpoint DIR is required"),
    (["singleton", "--apisock", "/y"], "--fscache"),
    (["singleton", "--fscache", "/x"], "--apisock"),
    (["singleton", "--fscache", "/x", "--apisock", "/y", "--log-level", "loud"], "--log-level"),
    (["singleton", "--fscache", "/x", "--apisock", "/y", "--fscache-threads", "0"], "--fscache-threads"),
    (["singleton", "--fscache", "/x", "--apisock", "/y", "--log-rotation-size", "-1"], "--log-rotation-size"),
    (["singleton", "--fscache", "/x", "--apisock", "/y", "--no-such-flag"], "unrecognized"),
])
def test_nydusd_command_line_errors(args: list[str], text: str) -> None:
    proc = subprocess.run([*NYDUSD, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("nydusd: error: ") and text in proc.stderr


def test_nydusd_accepts_the_snapshotters_command_line() -> None:
    from fscached.nydusd_cli import check_args, parse_args

    args = parse_args(["singleton", "--fscache", "/var/lib/containerd-nydus/cache", "--fscache-threads", "4",
                       "--upgrade", "--id", "d1", "--apisock", "/run/containerd-nydus/socket/d1/api.sock",
                       "--log-level", "warn", "--log-rotation-size", "100",
                       "--supervisor", "/run/containerd-nydus/supervisor/d1.sock",
                       "--log-file", "/var/lib/containerd-nydus/logs/d1/nydusd.log"])
    check_args(args)
    assert (args.mode, args.fscache_threads, args.upgrade, args.id, args.log_rotation_size) == (
        "singleton", "4", True, "d1", "100")


def test_nydusd_logs_journal_and_file(tmp_path: Path) -> None:
    """nydusd logs through fscached.util.logs: on the journal (JOURNAL_STREAM matches stderr) no
    timestamp and a syslog priority; --log-file with --log-rotation-size: a rotated file."""
    import logging
    import logging.handlers

    from fscached.nydusd_cli import LOG_BACKUPS, setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        with open(tmp_path / "stream", "w") as stream:
            st = os.fstat(stream.fileno())
            real_stderr = sys.stderr
            sys.stderr = stream
            try:
                os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
                setup_logging("info", None, 0)
                logging.getLogger("fscached.x").warning("to the journal")
            finally:
                sys.stderr = real_stderr
                del os.environ["JOURNAL_STREAM"]
        line = (tmp_path / "stream").read_text()
        assert line.startswith("<4>") and line.endswith("fscached.x: to the journal\n"), line
        assert not line[3:7].isdigit(), "no timestamp on the journal"
        log_file = tmp_path / "logs" / "d1" / "nydusd.log"
        setup_logging("debug", str(log_file), 1)
        handler = next(h for h in root.handlers if isinstance(h, logging.handlers.RotatingFileHandler))
        assert handler.maxBytes == 1 << 20 and handler.backupCount == LOG_BACKUPS
        logging.getLogger("fscached.y").debug("to the file")
        handler.flush()
        line = log_file.read_text().strip()
        assert line.endswith("DEBUG fscached.y: to the file") and line[:4].isdigit(), line  # timestamped
    finally:
        for handler in list(root.handlers):
            if handler not in saved[0]:
                root.removeHandler(handler)
                handler.close()
        for handler in saved[0]:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved[1])


def test_nydusd_without_on_demand_cachefiles_fails_in_one_line(tmp_path: Path) -> None:
    """This machine's kernel has no usable /dev/cachefiles for the daemon (the VM test runs it
    for real): the start-up error is one line, exit 1, and no API socket is left."""
    if os.path.exists("/dev/cachefiles"):
        pytest.skip("/dev/cachefiles exists here: tested in the VM instead")
    sock = tmp_path / "run" / "api.sock"
    proc = subprocess.run([*NYDUSD, "singleton", "--fscache", str(tmp_path / "cache"), "--apisock", str(sock),
                           "--log-file", str(tmp_path / "nydusd.log")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1 and "cachefiles" in proc.stderr, proc.stderr
    assert not sock.exists()
    assert "cachefiles" in (tmp_path / "nydusd.log").read_text()


def test_nydusd_upgrade_waits_in_init(tmp_path: Path) -> None:
    """--upgrade: INIT, takeover refused without a supervisor, exit through the API."""
    sock = tmp_path / "run" / "api.sock"
    proc = subprocess.Popen([*NYDUSD, "singleton", "--fscache", str(tmp_path / "cache"), "--apisock", str(sock),
                             "--upgrade", "--id", "d2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        status, _, info = call(sock, "GET", "/api/v1/daemon")
        assert status == 200 and info["state"] == "INIT" and info["id"] == "d2"
        assert_error(call(sock, "PUT", "/api/v1/daemon/fuse/takeover"), 400, "BAD_REQUEST", "--supervisor")
        assert_error(call(sock, "PUT", "/api/v1/daemon/start"), 503, "NOT_READY", "INIT")
        assert_error(call(sock, "PUT", "/api/v2/blobs", {"type": "bootstrap"}), 503, "NOT_READY")
        assert call(sock, "PUT", "/api/v1/daemon/exit")[0] == 204
        assert proc.wait(30) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
