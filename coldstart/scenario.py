"""Cold starts measured: one workload, one network profile, one kernel path, three modes.

    w = build_workload("small")
    with Scenario(w, "100mbit", workdir) as sc:       # registry netns up, both forms pushed
        results = [sc.classic(), sc.lazy(), sc.lazy_profile()]
    r.seconds, r.bytes_fetched, r.share, r.output, r.samples

Modes (each with a fresh containerd; the page cache dropped right before t0):
- `classic`: t0 = start of `ctr images pull <reg>/<repo>:plain` (every layer downloaded and
  unpacked into overlayfs), then `ctr run` of the workload's command.
- `lazy`: a fresh `fscached --backend <kernel_path>` (fanotify on the host, cachefiles in the
  VM; real CLI, empty cache, API socket) already
  running before t0, as on a node; t0 = the API bind of `<reg>/<repo>:nydus` (`ref=`,
  `scheme=http`, `mountpoint=`: the daemon pulls the bootstrap and mounts), then an overlay
  over the mount and `ctr run --rootfs`.
- `lazy_profile`: a recording node (fresh daemon, bind with `record_profile`, the run, unbind:
  the daemon writes `<work_dir>/profiles/<fsid>.json`), `fscached-image profile push` of that
  file to the image (an OCI referrer), then a fresh daemon with a fresh cache (the next node)
  binds normally, finds the profile in the registry itself, and that run is measured. Where
  the profile support is not installed the result says so (`available=False`), with no numbers.
- `snapshotter`: what a containerd user sees. The real containerd + nydus-snapshotter stack
  (coldstart.snapshotter: fusedev driver on the fanotify path, fscache on cachefiles; daemon
  mode `shared` by default, so its one fscached `nydusd` is running before t0, as on a node)
  with empty caches; t0 = the start of `nerdctl run --snapshotter nydus <reg>/<repo>:nydus`
  (the manifest and the bootstrap layer pulled, the snapshotter has nydusd mount the image,
  overlay, runc). Must run before `lazy_profile`: no profile exists in the registry yet.
- `snapshotter_nydusd`: the `snapshotter` mode with the real nydusd (nydus-rs 2.2.0: FUSE, its
  registry backend over the same network, a blobcache in the snapshotter's cache dir) as
  `nydusd_path`, through a generated wrapper adding `--rlimit-nofile 0`
  (coldstart.snapshotter.nydusd_rlimit_wrapper); issue 17's side-by-side. Not in MODES.
- `snapshotter_profile`: the same with the profile `lazy_profile` pushed (recorded and pushed
  first when `lazy_profile` did not run): the snapshotter's nydusd finds it by the bootstrap's
  digest (profile=auto; the snapshotter passes no manifest digest) and replays it.

Measured, per mode: seconds from t0 to the container's first output line; bytes fetched (the
registry veth's rx counter from t0 to the container's exit: everyone's downloads); the image's
bytes in the registry (classic: manifest, config and gzip layers; lazy: bootstrap and blobs) and
the share fetched; the output; and (t - t0, bytes since t0) samples every 20 ms. Nothing is
asserted here, except that the output is the workload's and, through the snapshotter, that
every daemon it started is the one the mode names (the process's executable: the real nydusd,
or the interpreter running fscached's `nydusd`): else ColdstartError.
"""
from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from coldstart import ColdstartError, drop_caches, one_line, run as run_cmd, unmount_under
from coldstart.containerd import Containerd, RunResult
from coldstart.netns import RegistryNetwork
from coldstart.snapshotter import (DAEMON_MODES, SnapshotterConfig, SnapshotterStack, daemon_identity,
                                   nydus_rs_nydusd, nydusd_rlimit_wrapper)
from coldstart.workload import Workload, push

WORK_ROOT = Path(os.environ.get("FSCACHED_COLDSTART_DIR", "/var/tmp"))  # ext4: fanotify marks, overlay
# in this order: the snapshotter mode must run before lazy_profile pushes a profile that the
# snapshotter's nydusd would find (profile=auto) and replay
MODES = ("classic", "lazy", "snapshotter", "lazy_profile", "snapshotter_profile")
# the real nydusd (nydus-rs, built by `python -m coldstart.peers install nydus-rs`, which make test
# runs and make bench does not) as the snapshotter's nydusd_path: not in MODES, asked for by name
NYDUSD_MODE = "snapshotter_nydusd"
ALL_MODES = (*MODES, NYDUSD_MODE)
DIRECT_MODES = ("classic", "lazy", "lazy_profile")  # no snapshotter: what the VM guests run
FSID = "coldstart"
RECORD_SECONDS = 60.0  # the recording is written at the unbind, long before this


@dataclass
class ModeResult:
    mode: str
    network: str
    kernel_path: str
    seconds: float | None              # t0 -> first output line
    bytes_fetched: int                 # veth rx from t0 to the container's exit
    image_bytes: int                   # what the mode's image weighs in the registry
    output: list[str] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s since t0, bytes since t0)
    phases: dict[str, float] = field(default_factory=dict)          # s since t0 when each step ended
    available: bool = True
    note: str = ""

    @property
    def share(self) -> float:
        return self.bytes_fetched / self.image_bytes if self.image_bytes else 0.0

    def summary(self) -> str:
        if not self.available:
            return f"{self.mode:13} {self.network:9} not available: {self.note}"
        secs = f"{self.seconds:.3f} s" if self.seconds is not None else "no output"
        return (f"{self.mode:13} {self.network:9} {secs:>10}  {self.bytes_fetched:>12,} B fetched "
                f"({100 * self.share:.1f} % of {self.image_bytes:,} B)")

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "network": self.network, "kernel_path": self.kernel_path,
                "seconds": self.seconds, "bytes_fetched": self.bytes_fetched,
                "image_bytes": self.image_bytes, "share": self.share, "output": self.output,
                "phases": self.phases, "available": self.available, "note": self.note,
                "samples": self.samples}


def profile_support() -> str | None:
    """None when the daemon can record start-up profiles and `fscached-image profile` exists;
    else why not."""
    for module in ("fscached.core.profile_recorder", "erofs_image.profile_cli"):
        if importlib.util.find_spec(module) is None:
            return f"profile support not available ({module} is not installed)"
    return None


# --------------------------------------------------------------------------- the daemon


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("fscached", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class Daemon:
    """The real `fscached` CLI with an API socket and no image, in `workdir` (fresh cache)."""

    def __init__(self, workdir: Path, backend: str = "fanotify") -> None:
        self.workdir = workdir
        self.cache_dir = workdir / "cache"
        self.work_dir = workdir / "work"
        self.apisock = workdir / "api" / "api.sock"
        self.ready = workdir / "ready"
        self.log = workdir / "fscached.log"
        self.args = [sys.executable, "-m", "fscached.cli", "--backend", backend,
                     "--cache-dir", str(self.cache_dir), "--work-dir", str(self.work_dir),
                     "--apisock", str(self.apisock), "--ready-file", str(self.ready),
                     "--stats-file", str(workdir / "stats.json")]
        self.proc: subprocess.Popen[bytes] | None = None
        self.mountpoints: list[Path] = []

    def start(self, timeout: float = 60) -> Daemon:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (self.ready.exists() and self.apisock.exists()):
            if self.proc.poll() is not None:
                raise ColdstartError(f"fscached exited {self.proc.returncode} at start: {one_line(self.log_tail())}")
            if time.monotonic() > deadline:
                raise ColdstartError(f"fscached not ready within {timeout:g} s: {one_line(self.log_tail())}")
            time.sleep(0.02)
        return self

    def request(self, method: str, path: str, body: Any = None, timeout: float = 600) -> tuple[int, bytes]:
        conn = _UnixHTTPConnection(self.apisock, timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except OSError as exc:
            raise ColdstartError(f"fscached API {method} {path}: {exc}: {one_line(self.log_tail())}") from None
        finally:
            conn.close()

    def bind(self, ref: str, mountpoint: Path, *, fsid: str = FSID, **extra: Any) -> None:
        """PUT /api/v2/blobs: the daemon pulls the bootstrap of `ref` (plain http) and mounts it."""
        from fetcher.image_ref import parse_image_ref

        parsed = parse_image_ref(ref)
        entry: dict[str, Any] = {
            "type": "bootstrap", "id": fsid, "domain_id": fsid, "ref": ref, "mountpoint": str(mountpoint),
            "config": {"id": fsid, "cache_type": "fscache", "cache_config": {"work_dir": str(self.work_dir)},
                       "backend_type": "registry",
                       "backend_config": {"host": parsed.host, "repo": parsed.repo, "scheme": "http"}},
            **extra}
        mountpoint.mkdir(parents=True, exist_ok=True)
        status, data = self.request("PUT", "/api/v2/blobs", entry)
        if status != 204:
            raise ColdstartError(f"fscached refused the bind of {ref} ({status}): {one_line(data, 300)}")
        self.mountpoints.append(mountpoint)

    def unbind(self, fsid: str = FSID) -> None:
        status, data = self.request("DELETE", f"/api/v2/blobs?domain_id={fsid}&blob_id={fsid}")
        if status != 204:
            raise ColdstartError(f"fscached refused the unbind of {fsid} ({status}): {one_line(data, 300)}")

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (it unmounts what it mounted), -9 after 30 s; then no mount, no keeper left."""
        from fscached.frontends.fanotify import keeper

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for mountpoint in self.mountpoints:
            unmount_under(mountpoint)
        keeper.dismiss(self.cache_dir / ".fscached" / "keeper.sock")


# --------------------------------------------------------------------------- the scenario


class Scenario:
    """The registry network with both forms of `workload` pushed; one method per mode."""

    def __init__(self, workload: Workload, network: str = "unshaped", *, workdir: Path | None = None,
                 repo: str | None = None, kernel_path: str = "fanotify", snapshotter_daemon_mode: str = "shared") -> None:
        if kernel_path not in ("fanotify", "cachefiles"):
            raise ColdstartError(f"kernel path {kernel_path!r}: choose fanotify or cachefiles")
        if snapshotter_daemon_mode not in DAEMON_MODES:
            raise ColdstartError(f"snapshotter daemon mode {snapshotter_daemon_mode!r}: choose {' or '.join(DAEMON_MODES)}")
        self.snapshotter_daemon_mode = snapshotter_daemon_mode
        self.workload = workload
        self.network_name = network
        self.kernel_path = kernel_path
        self.repo = repo or f"coldstart/{workload.size}"
        self._own_workdir = workdir is None
        WORK_ROOT.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fscd-cs-", dir=WORK_ROOT))
        self.net: RegistryNetwork | None = None
        self.plain_ref = self.nydus_ref = ""
        self.profile_path: Path | None = None  # the last profile recorded (inside workdir)
        self.profile_pushed = False  # to the nydus image: every later bind with profile=auto replays it
        self._runs = 0

    def __enter__(self) -> Scenario:
        try:
            self.net = RegistryNetwork(self.workdir / "net", self.network_name).start()
            self.plain_ref, self.nydus_ref = push(self.workload, self.net.host, self.repo)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.net is not None:
            self.net.stop()
            self.net = None
        if self._own_workdir:
            unmount_under(self.workdir)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _fresh_dir(self, what: str) -> Path:
        self._runs += 1
        d = self.workdir / f"{self._runs}-{what}"
        d.mkdir(parents=True)
        return d

    @property
    def _network(self) -> RegistryNetwork:
        if self.net is None:
            raise ColdstartError("the scenario is not started (use it as a context manager)")
        return self.net

    def run_modes(self, modes: tuple[str, ...] = MODES) -> list[ModeResult]:
        return [getattr(self, mode)() for mode in modes]

    # -- the modes --------------------------------------------------------------------------
    def classic(self) -> ModeResult:
        net = self._network
        with Containerd(self._fresh_dir("classic") / "ctd") as ctd:
            drop_caches()
            rx0, t0 = net.rx_bytes(), time.monotonic()
            with net.sampling() as samples:
                ctd.pull(self.plain_ref)
                pulled = time.monotonic()
                result = ctd.run(self.workload.command, image=self.plain_ref)
                rx1 = net.rx_bytes()
        return self._result("classic", t0, rx0, rx1, result, samples, self._plain_bytes(),
                            {"pull": pulled - t0})

    def lazy(self) -> ModeResult:
        # no profile replay, even once lazy_profile has pushed one (a daemon without profile
        # support knows no such key: only sent where it exists)
        extra = {"profile": "none"} if profile_support() is None else {}
        return self._lazy_run("lazy", self._fresh_dir("lazy"), **extra)

    def lazy_profile(self, record_seconds: float = RECORD_SECONDS) -> ModeResult:
        why = profile_support()
        if why is not None:
            return ModeResult("lazy_profile", self.network_name, self.kernel_path, None, 0,
                              self._nydus_bytes(), available=False, note=why)
        self._push_profile(record_seconds)
        return self._lazy_run("lazy_profile", self._fresh_dir("lazy-profile"))

    def snapshotter(self) -> ModeResult:
        if self.profile_pushed:
            raise ColdstartError("the snapshotter mode runs before lazy_profile: the profile pushed since would be "
                                 "found and replayed by the snapshotter's nydusd (profile=auto)")
        return self._snapshotter_run("snapshotter", self._fresh_dir("snapshotter"))

    def snapshotter_nydusd(self) -> ModeResult:
        """The snapshotter mode with the real nydusd as nydusd_path (it knows no start-up
        profiles: it may run before or after lazy_profile)."""
        return self._snapshotter_run(NYDUSD_MODE, self._fresh_dir("snapshotter-nydusd"), daemon="nydusd")

    def snapshotter_profile(self, record_seconds: float = RECORD_SECONDS) -> ModeResult:
        why = profile_support()
        if why is not None:
            return ModeResult("snapshotter_profile", self.network_name, self.kernel_path, None, 0,
                              self._nydus_bytes(), available=False, note=why)
        if not self.profile_pushed:
            self._push_profile(record_seconds)
        return self._snapshotter_run("snapshotter_profile", self._fresh_dir("snapshotter-profile"))

    def _push_profile(self, record_seconds: float) -> None:
        """Record the start-up profile on a node of its own and push it to the nydus image."""
        profile = self.profile_path = self._record_profile(self._fresh_dir("record"), record_seconds)
        run_cmd([sys.executable, "-m", "erofs_image.cli", "profile", "push", str(profile), self.nydus_ref,
                 "--plain-http"], f"fscached-image profile push to {self.nydus_ref}", timeout=300)
        self.profile_pushed = True

    # -- snapshotter helper ---------------------------------------------------------------------
    def _snapshotter_run(self, mode: str, d: Path, daemon: str = "fscached") -> ModeResult:
        """One cold `nerdctl run` through a fresh snapshotter stack whose nydusd_path is
        fscached's `nydusd` (daemon "fscached") or the real one behind its rlimit wrapper
        ("nydusd": fusedev only)."""
        net = self._network
        fs_driver = "fusedev" if self.kernel_path == "fanotify" else "fscache"
        real: Path | None = None
        if daemon == "nydusd":
            if fs_driver != "fusedev":
                raise ColdstartError(f"{mode}: the real nydusd is compared through the fusedev driver only "
                                     f"(kernel path {self.kernel_path})")
            real = nydus_rs_nydusd()
            nydusd_path: Path | None = nydusd_rlimit_wrapper(real, d)
        elif daemon == "fscached":
            nydusd_path = None  # the project's own entry point
        else:
            raise ColdstartError(f"{mode}: daemon {daemon!r}: choose fscached or nydusd")
        config = SnapshotterConfig(fs_driver=fs_driver, daemon_mode=self.snapshotter_daemon_mode,
                                   log_level="info", nydusd_path=nydusd_path)
        with SnapshotterStack(net.host, config, workdir=d / "stack", command_timeout=1200) as stack:
            if self.snapshotter_daemon_mode == "shared":
                stack.wait_shared_daemon()  # a node's daemon is up before anyone runs a container
            drop_caches()
            rx0, t0 = net.rx_bytes(), time.monotonic()
            with net.sampling() as samples:
                result = stack.run_streamed(self.nydus_ref, self.workload.command)
                rx1 = net.rx_bytes()
            if result.exit_code != 0:
                said = stack.nydusd_error()
                raise ColdstartError(f"{mode} run ({self.network_name}): nerdctl run exited {result.exit_code}: "
                                     f"{one_line(result.stderr or ' | '.join(result.lines))}"
                                     + (f" (nydusd logged: {said})" if said else ""))
            # the image stays pulled after `run --rm`: its daemon (shared or dedicated) is still up
            served_by = self._check_daemons(stack, mode, daemon, real)
            said = stack.nydusd_error()
            profile_said = [line for line in stack.nydusd_logs().splitlines() if "start-up profile" in line]
        out = self._result(mode, t0, rx0, rx1, result, samples, self._nydus_bytes(), {})
        if daemon == "nydusd":
            out.note = served_by + (f"; it logged an error: {said}" if said else "")
        else:
            out.note = one_line(profile_said[-1], 300) if profile_said else "nydusd logged nothing of a start-up profile"
        return out

    def _check_daemons(self, stack: SnapshotterStack, mode: str, daemon: str, real: Path | None) -> str:
        """ColdstartError unless every nydusd the snapshotter runs now is `daemon` and the image
        is mounted as that daemon mounts it (the real nydusd: FUSE; fscached: EROFS); what was
        found, in words."""
        where = f"{mode} run ({self.network_name})"
        pids = stack.nydusd_pids()
        if not pids:
            raise ColdstartError(f"{where}: no nydusd of the snapshotter is running after the run")
        found = {pid: daemon_identity(pid, real) for pid in pids}
        wrong = {pid: who for pid, who in found.items() if who != daemon}
        if wrong:
            raise ColdstartError(f"{where}: the snapshotter's nydusd is not {daemon}: "
                                 + ", ".join(f"pid {pid}: {who}" for pid, who in wrong.items()))
        fstypes = sorted({m.fstype for m in stack.mounts()})
        want = "fuse" if daemon == "nydusd" else "erofs"
        if not any(t == want or t.startswith(want + ".") for t in fstypes):
            raise ColdstartError(f"{where}: no {want} mount under the snapshotter's root ({', '.join(fstypes)})")
        return f"served by {daemon} (pid {', '.join(map(str, pids))}; {want} mount)"

    # -- lazy helpers -------------------------------------------------------------------------
    def _lazy_run(self, mode: str, d: Path, **bind_extra: Any) -> ModeResult:
        net = self._network
        daemon = Daemon(d / "fscached", self.kernel_path)
        try:
            daemon.start()
            with Containerd(d / "ctd") as ctd:
                mnt = d / "mnt"
                drop_caches()
                rx0, t0 = net.rx_bytes(), time.monotonic()
                with net.sampling() as samples:
                    daemon.bind(self.nydus_ref, mnt, **bind_extra)
                    bound = time.monotonic()
                    with ctd.overlay_rootfs(mnt) as rootfs:
                        result = ctd.run(self.workload.command, rootfs=rootfs)
                    rx1 = net.rx_bytes()
        finally:
            daemon.stop()
        return self._result(mode, t0, rx0, rx1, result, samples, self._nydus_bytes(), {"bind": bound - t0})

    def _record_profile(self, d: Path, seconds: float) -> Path:
        """A recording node: bind with record_profile, run, unbind; the profile file."""
        daemon = Daemon(d / "fscached", self.kernel_path)
        try:
            daemon.start()
            with Containerd(d / "ctd") as ctd:
                mnt = d / "mnt"
                daemon.bind(self.nydus_ref, mnt, record_profile=seconds, profile="none")
                with ctd.overlay_rootfs(mnt) as rootfs:
                    result = ctd.run(self.workload.command, rootfs=rootfs)
                self.workload.check_output(result.lines, "recording run")
                daemon.unbind()
            path = daemon.work_dir / "profiles" / f"{FSID}.json"
            deadline = time.monotonic() + 30
            while not path.exists():
                if time.monotonic() > deadline:
                    raise ColdstartError(f"the recording daemon wrote no profile at {path} within 30 s of the "
                                         f"unbind: {one_line(daemon.log_tail())}")
                time.sleep(0.05)
            return path
        finally:
            daemon.stop()

    # -- results ------------------------------------------------------------------------------
    def _result(self, mode: str, t0: float, rx0: int, rx1: int, run: RunResult,
                samples: list[tuple[float, int]], image_bytes: int, phases: dict[str, float]) -> ModeResult:
        where = f"{mode} run ({self.network_name})"
        if run.exit_code != 0:
            raise ColdstartError(f"{where}: ctr run exited {run.exit_code}: {one_line(run.stderr or ' | '.join(run.lines))}")
        self.workload.check_output(run.lines, where)
        assert run.first_line_at is not None  # check_output saw a line
        phases = dict(phases, first_line=run.first_line_at - t0, exit=run.ended_at - t0)
        return ModeResult(mode, self.network_name, self.kernel_path, run.first_line_at - t0, rx1 - rx0,
                          image_bytes, list(run.lines), [(t - t0, b - rx0) for t, b in samples], phases)

    def _plain_bytes(self) -> int:
        return _layout_bytes(self.workload.oci)

    def _nydus_bytes(self) -> int:
        return self.workload.nydus_blob_bytes + self.workload.bootstrap_bytes


def _layout_bytes(layout: Path) -> int:
    """Manifest, config and layers of an OCI layout's (single) image: what a pull downloads."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    manifest = json.loads((blobs / desc["digest"][7:]).read_text())
    return int(desc["size"]) + int(manifest["config"]["size"]) + sum(int(layer["size"]) for layer in manifest["layers"])


def iter_summaries(results: list[ModeResult]) -> Iterator[str]:
    for r in results:
        yield r.summary()


def main(argv: list[str] | None = None) -> int:
    """`python -m coldstart.scenario [SIZE] [NETWORK] [MODE...]`: print one line per mode."""
    from coldstart.workload import build_workload

    args = sys.argv[1:] if argv is None else argv
    size = args[0] if args else "small"
    network = args[1] if len(args) > 1 else "unshaped"
    modes = tuple(args[2:]) or MODES
    try:
        workload = build_workload(size, progress=lambda m: print(m, file=sys.stderr))
        with Scenario(workload, network) as sc:
            for mode in modes:
                if mode not in ALL_MODES:
                    raise ColdstartError(f"mode {mode!r} is unknown (choose {', '.join(ALL_MODES)})")
                print(getattr(sc, mode)().summary(), flush=True)
    except ColdstartError as exc:
        print(f"coldstart: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
