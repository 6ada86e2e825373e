"""fscachedctl against a stand-in of the daemon's API on a unix socket (aiohttp, the contract
fscachedctl codes against): every subcommand's request and output, exit codes 1/2/3, and
`mount` calling mount(2) with the daemon's mount arguments; then the same commands against the
real API (fscached.api.server) on a daemon answering the kernel simulator."""
from __future__ import annotations

import asyncio
import errno
import json
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

import native
from fscached import ctl

BLOB_A = "5f" * 32
BLOB_B = "9e" * 32

METRICS = """\
# HELP fscached_reads_total READs answered
# TYPE fscached_reads_total counter
fscached_reads_total{outcome="cached"} 5.0
fscached_reads_total{outcome="filled"} 3.0
fscached_reads_total{outcome="failed"} 1.0
# TYPE fscached_read_bytes_total counter
fscached_read_bytes_total{outcome="cached"} 20480.0
fscached_read_bytes_total{outcome="filled"} 3145728.0
# TYPE fscached_source_bytes_total counter
fscached_source_bytes_total{source="local /images/python/blobs"} 1048576.0
fscached_source_bytes_total{source="registry r.example/team/app"} 2097152.0
# TYPE fscached_objects_open gauge
fscached_objects_open 3.0
# TYPE fscached_cache_bytes gauge
fscached_cache_bytes 4194304.0
"""


def daemon_info() -> dict[str, Any]:
    return {
        "version": {"package_ver": "0.1.0", "git_commit": "0123456789abcdef0123", "build_time": "", "profile": ""},
        "id": "fscached-1",
        "state": "RUNNING",
        "fscached": {
            "backend": "fanotify",
            "kernel": "6.18.0-1-amd64",
            "cache_dir": "/var/cache/fscached",
            "images": [
                {"id": "python", "domain_id": "python", "bootstrap": "/images/python/image.boot",
                 "mountpoint": "/mnt/python",
                 "mount": {"source": "/images/python/image.boot", "fstype": "erofs",
                           "options": f"device=/var/cache/fscached/blobs/python/{BLOB_A}"},
                 "blobs": [BLOB_A]},
                {"id": "app", "domain_id": "shared", "bootstrap": "/var/lib/fscached/bootstraps/app.boot",
                 "mountpoint": None,
                 "mount": {"source": "none", "fstype": "erofs", "options": "domain_id=shared,fsid=app"},
                 "blobs": [{"id": BLOB_A}, {"id": BLOB_B}]},
            ],
            "counters": {"read": 9, "read_cached": 5, "read_failed": 1, "read_bytes": 3145728,
                         "fetched_bytes": 3000000, "objects_open": 7},
        },
    }


class StandIn:
    """The API's routes, recording each request as (method, path, query, JSON body)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.info = daemon_info()
        self.metrics: str | None = METRICS
        self.delay = 0.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/daemon", self.get_daemon)
        app.router.add_get("/metrics", self.get_metrics)
        app.router.add_put("/api/v2/blobs", self.put_blobs)
        app.router.add_delete("/api/v2/blobs", self.delete_blobs)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.path)).start()

    def close(self) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _record(self, request: web.Request) -> Any:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, dict(request.query), body))
        if self.delay:
            await asyncio.sleep(self.delay)
        return body

    @staticmethod
    def error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"code": code, "message": message}, status=status)

    async def get_daemon(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(self.info)

    async def get_metrics(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.metrics is None:
            return web.Response(status=404, text="404: Not Found")
        return web.Response(body=self.metrics.encode(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def put_blobs(self, request: web.Request) -> web.Response:
        entry = await self._record(request)
        if entry.get("id") == "taken":
            return self.error(409, "AlreadyExists", "image taken:\nalready served in volume taken")
        if entry.get("id") == "crash":
            return web.Response(status=500, text="Internal Server Error")
        return web.Response(status=204)

    async def delete_blobs(self, request: web.Request) -> web.Response:
        await self._record(request)
        if request.query.get("blob_id") not in ("python", "app", BLOB_A):
            return self.error(404, "NotFound", "blob_cache: cache entry not found")
        return web.Response(status=204)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ctl-"))  # short: a unix socket path has 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def api(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no wrapping in the captured output
    server = StandIn(sockdir / "api.sock")
    try:
        yield server
    finally:
        server.close()


def run(api: StandIn | Path, *argv: str) -> int:
    sock = api.path if isinstance(api, StandIn) else api
    return ctl.main(["--sock", str(sock), *argv])


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fscachedctl: error: "), err
    return lines[0]


# -- status, list -------------------------------------------------------------------------------
def test_status_table(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(api, "status") == 0
    assert api.requests == [("GET", "/api/v1/daemon", {}, None), ("GET", "/metrics", {}, None)]
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert lines[0] == "fscached fscached-1"
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines[1:])
    assert rows == {
        "state": "RUNNING",
        "version": "0.1.0 (0123456789ab)",
        "kernel path": "fanotify",
        "kernel": "6.18.0-1-amd64",
        "cache dir": "/var/cache/fscached",
        "images": "2",
        "objects open": "3",  # from /metrics, not the counters
        "bytes served": "3.0 MiB (20.0 KiB from the cache)",
        "bytes fetched": "3.0 MiB",
        "reads": "5 cached, 3 filled, 1 failed",
        "cache size": "4.0 MiB",
    }


def test_status_json(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--json", "--sock", str(api.path), "status"]) == 0  # --json before the command
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "id": "fscached-1", "state": "RUNNING", "version": "0.1.0", "git_commit": "0123456789abcdef0123",
        "backend": "fanotify", "kernel": "6.18.0-1-amd64", "cache_dir": "/var/cache/fscached", "images": 2,
        "objects_open": 3, "bytes_served": 20480 + 3145728, "bytes_served_from_cache": 20480,
        "bytes_fetched": 3 << 20, "reads": {"cached": 5, "filled": 3, "failed": 1}, "cache_bytes": 4 << 20,
    }


def test_status_without_metrics_uses_the_counters(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    api.metrics = None
    assert run(api, "status", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["objects_open"] == 7 and doc["bytes_served"] == 3145728 and doc["bytes_fetched"] == 3000000
    assert doc["reads"] == {"cached": 5, "filled": None, "failed": 1}
    assert doc["cache_bytes"] is None


def test_list_table_and_json(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(api, "list") == 0
    assert api.requests == [("GET", "/api/v1/daemon", {}, None)]
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and not set(line.strip()) <= set("─ ")]
    assert rows == [["ID", "DOMAIN", "MOUNTPOINT", "BLOBS"],
                    ["python", "python", "/mnt/python", "1:", BLOB_A[:12]],
                    ["app", "shared", "-", "2:", BLOB_A[:12], BLOB_B[:12]]]
    assert run(api, "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == daemon_info()["fscached"]["images"]


def test_list_without_images(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    api.info["fscached"]["images"] = []
    assert run(api, "list") == 0
    assert capsys.readouterr().out.strip() == "no images"


# -- bind, unbind, cull ---------------------------------------------------------------------------
@pytest.fixture
def image_dir(sockdir: Path) -> Path:
    image = sockdir / "python"
    (image / "blobs").mkdir(parents=True)
    (image / "image.boot").write_bytes(b"\0" * 4096)
    return image


def test_bind_from_a_bootstrap(api: StandIn, image_dir: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image_dir)  # relative paths go to the daemon absolute
    assert run(api, "bind", "--id", "python", "--bootstrap", "image.boot", "--mountpoint", "mnt") == 0
    assert api.requests == [("PUT", "/api/v2/blobs", {}, {
        "type": "bootstrap", "id": "python", "domain_id": "python",
        "config": {"id": "python", "backend_type": "localfs", "backend_config": {"dir": str(image_dir / "blobs")},
                   "cache_type": "fscache", "cache_config": {"work_dir": "/var/lib/fscached"},
                   "metadata_path": str(image_dir / "image.boot")},
        "mountpoint": str(image_dir / "mnt")})]
    assert capsys.readouterr().out.strip() == f"bound image python and mounted on {image_dir / 'mnt'}"


def test_bind_with_domain_and_blobs_json(api: StandIn, image_dir: Path, sockdir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    other = sockdir / "elsewhere"
    other.mkdir()
    assert run(api, "bind", "--id", "python", "--domain", "shared", "--bootstrap", str(image_dir / "image.boot"),
               "--blobs", str(other), "--json") == 0
    (_, _, _, entry), = api.requests
    assert entry["domain_id"] == "shared" and entry["id"] == "python" and "mountpoint" not in entry
    assert entry["config"]["backend_config"] == {"dir": str(other)}
    assert json.loads(capsys.readouterr().out) == {"bound": "python", "domain_id": "shared", "mountpoint": None}


def test_bind_from_a_registry_reference(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(api, "bind", "--id", "app", "--ref", "127.0.0.1:5000/team/app:v1", "--scheme", "http") == 0
    assert api.requests == [("PUT", "/api/v2/blobs", {}, {
        "type": "bootstrap", "id": "app", "domain_id": "app", "ref": "127.0.0.1:5000/team/app:v1",
        "config": {"id": "app", "backend_type": "registry",
                   "backend_config": {"host": "127.0.0.1:5000", "repo": "team/app", "scheme": "http"},
                   "cache_type": "fscache", "cache_config": {"work_dir": "/var/lib/fscached"}}})]
    assert capsys.readouterr().out.strip() == "bound image app"


@pytest.mark.parametrize("argv, why", [
    (["bind", "--id", "x"], "one of the arguments --bootstrap --ref is required"),
    (["bind", "--id", "x", "--bootstrap", "/b", "--ref", "r.example/a:1"], "not allowed with argument"),
    (["bind", "--bootstrap", "/nonexistent/image.boot"], "the following arguments are required: --id"),
    (["bind", "--id", "x", "--bootstrap", "/nonexistent/image.boot"], "--bootstrap /nonexistent/image.boot: no such file"),
    (["bind", "--id", "x", "--ref", "https://r.example/a:1"], "--ref: invalid image reference"),
    (["bind", "--id", "x", "--ref", "r.example/a:1", "--blobs", "/tmp"], "--blobs goes with --bootstrap"),
    (["bind", "--id", "x", "--ref", "r.example/a:1", "--scheme", "ftp"], "invalid choice: 'ftp'"),
    (["unbind"], "the following arguments are required: --id"),
    (["cull"], "the following arguments are required: BLOB_ID"),
    (["mount", "python"], "the following arguments are required: DIR"),
    (["frob"], "invalid choice: 'frob'"),
    ([], "the following arguments are required: COMMAND"),
    (["--timeout", "0", "status"], "--timeout must be positive"),
])
def test_usage_errors_exit_2_without_a_request(api: StandIn, argv: list[str], why: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run(api, *argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert why in line, line
    assert api.requests == []


def test_bind_refused_by_the_daemon_exits_1(api: StandIn, image_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(api, "bind", "--id", "taken", "--bootstrap", str(image_dir / "image.boot")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == ("fscachedctl: error: the daemon refused (409 AlreadyExists): image taken: already served "
                    "in volume taken")
    assert run(api, "bind", "--id", "crash", "--bootstrap", str(image_dir / "image.boot")) == 1
    assert one_error_line(capsys.readouterr().err) == \
        "fscachedctl: error: the daemon refused (500): Internal Server Error"


def test_unbind(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(api, "unbind", "--id", "python") == 0
    assert run(api, "unbind", "--id", "app", "--domain", "shared", "--json") == 0
    assert api.requests == [("DELETE", "/api/v2/blobs", {"domain_id": "python", "blob_id": "python"}, None),
                            ("DELETE", "/api/v2/blobs", {"domain_id": "shared", "blob_id": "app"}, None)]
    out = capsys.readouterr().out
    assert out.startswith("unbound image python\n")
    assert json.loads(out.split("\n", 1)[1]) == {"unbound": "app", "domain_id": "shared"}


def test_unbind_unknown_exits_1(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(api, "unbind", "--id", "nope") == 1
    assert one_error_line(capsys.readouterr().err) == \
        "fscachedctl: error: the daemon refused (404 NotFound): blob_cache: cache entry not found"


def test_cull(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(api, "cull", BLOB_A) == 0
    assert api.requests == [("DELETE", "/api/v2/blobs", {"blob_id": BLOB_A}, None)]
    assert capsys.readouterr().out.strip() == f"culled blob {BLOB_A}"
    assert run(api, "--json", "cull", BLOB_A) == 0
    assert json.loads(capsys.readouterr().out) == {"culled": BLOB_A}
    assert run(api, "cull", BLOB_B) == 1
    assert "cache entry not found" in one_error_line(capsys.readouterr().err)


# -- mount ----------------------------------------------------------------------------------------
@pytest.fixture
def mounts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    def fake_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
        calls.append((source, target, fstype, flags, data))
        if target.endswith("busy"):
            raise OSError(errno.EBUSY, "Device or resource busy")
        if target.endswith("denied"):
            raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(native, "mount", fake_mount)
    return calls


def test_mount_calls_mount2_with_the_daemons_arguments(api: StandIn, sockdir: Path, mounts: list[tuple[Any, ...]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    target = sockdir / "mnt"
    target.mkdir()
    assert run(api, "mount", "python", str(target)) == 0  # fanotify: the bootstrap, device= per blob
    assert run(api, "mount", "app", str(target), "--json") == 0  # cachefiles: none, fsid=
    assert mounts == [
        ("/images/python/image.boot", str(target), "erofs", 1, f"device=/var/cache/fscached/blobs/python/{BLOB_A}"),
        ("none", str(target), "erofs", 1, "domain_id=shared,fsid=app"),
    ]
    assert api.requests == [("GET", "/api/v1/daemon", {}, None)] * 2
    out = capsys.readouterr().out
    assert out.startswith(f"mounted image python on {target}\n")
    assert json.loads(out.split("\n", 1)[1]) == {"mounted": "app", "mountpoint": str(target), "source": "none",
                                                 "fstype": "erofs", "options": "domain_id=shared,fsid=app"}


def test_mount_failures(api: StandIn, sockdir: Path, mounts: list[tuple[Any, ...]],
                        capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("busy", "denied"):
        (sockdir / name).mkdir()
    assert run(api, "mount", "python", str(sockdir / "denied")) == 1
    assert one_error_line(capsys.readouterr().err) == \
        f"fscachedctl: error: mount image python on {sockdir / 'denied'}: Operation not permitted (mounting needs root)"
    assert run(api, "mount", "python", str(sockdir / "busy")) == 1
    assert "Device or resource busy (already mounted?)" in one_error_line(capsys.readouterr().err)
    assert run(api, "mount", "nope", str(sockdir / "busy")) == 1
    assert one_error_line(capsys.readouterr().err) == \
        "fscachedctl: error: the daemon serves no image nope (see fscachedctl list)"
    assert run(api, "mount", "python", str(sockdir / "busy"), "--domain", "other") == 1
    assert "no image python in domain other" in one_error_line(capsys.readouterr().err)
    assert run(api, "mount", "python", str(sockdir / "missing")) == 2
    assert one_error_line(capsys.readouterr().err) == \
        f"fscachedctl: error: {sockdir / 'missing'}: not a directory (create the mount point first)"
    assert len(mounts) == 2


def test_mount_ambiguous_fsid_needs_a_domain(api: StandIn, sockdir: Path, mounts: list[tuple[Any, ...]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    images = api.info["fscached"]["images"]
    images.append({**images[1], "domain_id": "other", "mount": {"source": "none", "fstype": "erofs",
                                                                "options": "domain_id=other,fsid=app"}})
    assert run(api, "mount", "app", str(sockdir)) == 2
    assert "image app is served in domains shared, other: say which with --domain" in \
        one_error_line(capsys.readouterr().err)
    assert run(api, "mount", "app", str(sockdir), "--domain", "other") == 0
    assert mounts == [("none", str(sockdir), "erofs", 1, "domain_id=other,fsid=app")]


# -- the daemon out of reach ------------------------------------------------------------------------
def test_socket_missing_exits_3(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status"], ["list"], ["unbind", "--id", "x"], ["cull", BLOB_A]):
        assert run(sockdir / "nope.sock", *argv) == 3
        line = one_error_line(capsys.readouterr().err)
        assert line == (f"fscachedctl: error: cannot reach the daemon: {sockdir / 'nope.sock'} does not exist "
                        "(is fscached running with its API socket there? see --sock)")


def test_nobody_listening_exits_3(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a killed daemon leaves behind
        assert run(stale, "status") == 3
    assert one_error_line(capsys.readouterr().err) == \
        f"fscachedctl: error: cannot reach the daemon at {stale}: Connection refused"


def test_no_answer_in_time_exits_3(api: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    api.delay = 5
    assert run(api, "--timeout", "0.3", "list") == 3
    assert one_error_line(capsys.readouterr().err) == \
        f"fscachedctl: error: no answer from the daemon at {api.path} within 0.3 s (GET /api/v1/daemon)"


def test_default_socket_path() -> None:
    args = ctl.parser().parse_args(["status"])
    assert not hasattr(args, "sock")  # main() fills in the default
    assert ctl.DEFAULT_SOCK == "/run/fscached/api.sock"


# -- the real API (fscached.api.server) with a daemon answering the kernel simulator ---------------------
def test_against_the_real_api(work: Path, mounts: list[tuple[Any, ...]], capsys: pytest.CaptureFixture[str]) -> None:
    import fscached.api.server as api_module
    from erofs_image.builder import convert
    from erofs_image.reader import Bootstrap
    from fscached.config import ImageSpec
    from simdaemon import Running, make_tree
    from standins.kernel_simulator import KernelSimulator

    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="zstd", chunk_size=64 << 10)
    blob_id = Bootstrap.open(out / "image.boot").blobs[0].blob_id
    sock = work / "api.sock"

    def ctl_json(*argv: str) -> Any:
        assert run(sock, *argv, "--json") == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    with KernelSimulator(work / "kernel") as sim:
        running = Running(sim, [ImageSpec("img1", out / "image.boot", out / "blobs")], work / "kernel")
        daemon = running.daemon
        api = api_module.ApiServer(daemon, sock)
        try:
            deadline = time.monotonic() + 30
            while not daemon.serving and time.monotonic() < deadline:
                time.sleep(0.02)
            daemon.submit(api.start()).result(30)
            status = ctl_json("status")
            assert (status["state"], status["backend"], status["images"], status["objects_open"]) == \
                ("RUNNING", "cachefiles", 1, 0)
            meta = sim.mount("erofs,img1", b"img1")
            blob = sim.mount("erofs,img1", blob_id.encode())
            sim.read(meta, 0, 4096)
            sim.read(blob, 0, 4096)
            status = ctl_json("status")
            assert status["objects_open"] == 2
            assert status["reads"] == {"cached": 0, "filled": 2, "failed": 0}
            assert status["bytes_served"] == 8192 and status["bytes_fetched"] > 0 and status["cache_bytes"] > 0

            assert run(sock, "bind", "--id", "img2", "--domain", "shared", "--bootstrap", str(out / "image.boot")) == 0
            assert capsys.readouterr().out.strip() == "bound image img2 (domain shared)"
            images = {i["id"]: i for i in ctl_json("list")}
            assert set(images) == {"img1", "img2"}
            assert images["img2"]["domain_id"] == "shared" and images["img2"]["blobs"] == [blob_id]
            assert run(sock, "list") == 0
            assert "img2" in capsys.readouterr().out
            assert run(sock, "bind", "--id", "img2", "--domain", "shared", "--bootstrap", str(out / "image.boot")) == 1
            assert "already exists" in one_error_line(capsys.readouterr().err)

            target = work / "mnt"
            target.mkdir()
            assert run(sock, "mount", "img2", str(target)) == 0
            assert run(sock, "mount", "img1", str(target)) == 0
            assert mounts == [("none", str(target), "erofs", 1, "domain_id=shared,fsid=img2"),
                              ("none", str(target), "erofs", 1, "fsid=img1")]
            capsys.readouterr()

            assert run(sock, "unbind", "--id", "img2", "--domain", "shared") == 0
            assert capsys.readouterr().out.strip() == "unbound image img2 (domain shared)"
            assert [i["id"] for i in ctl_json("list")] == ["img1"]
            assert run(sock, "unbind", "--id", "img2", "--domain", "shared") == 1
            assert "cache entry not found" in one_error_line(capsys.readouterr().err)
            sim.close(blob)
            sim.close(meta)
        finally:
            daemon.submit(api.stop()).result(30)
            assert running.stop() == 0
