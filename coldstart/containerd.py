"""Debian's containerd (1.6) and runc, started by us with state of our own; nothing of the
machine's containerd is used or touched.

    with Containerd(workdir) as ctd:                 # starts containerd, waits for `ctr version`
        ctd.pull("10.213.0.2:5000/app:plain")        # ctr images pull --plain-http: classic mode
        r = ctd.run(["python3", "/app/start.py"], image="10.213.0.2:5000/app:plain")
        with ctd.overlay_rootfs(lower) as rootfs:    # lazy mode: overlay over an EROFS mount
            r = ctd.run(["python3", "/app/start.py"], rootfs=rootfs)
        r.first_line_at, r.lines, r.exit_code        # time.monotonic() of the first stdout line

Isolation. containerd 1.6 hard-codes a few paths under /run/containerd (shim sockets, runc's
root, ctr's stdio fifos), so containerd runs in a mount namespace of its own (`unshare -m`, mounts
propagating from the host as a slave) where `<workdir>/run` is bind-mounted over /run, and every
`ctr` call enters that namespace (`nsenter -m`). Its root, state, gRPC socket (0600 in a 0700
dir), ttrpc socket and the opt plugin's directory are under `workdir`; the CRI plugin is
disabled; the snapshotter is overlayfs; ctr's namespace is `fscached-coldstart`. `workdir` is
bind-mounted on itself and made shared first, so mounts made under it on the host (the lazy
mode's overlay rootfs) are visible to containerd and its shims.

Teardown (`stop()`, the context manager's exit, also after a failure): every task is killed and
deleted, every container removed, containerd stopped (SIGTERM, then SIGKILL), shims still
running for our socket killed by pid, everything mounted under `workdir` unmounted and the empty
cgroups runc made for our namespace removed. No CNI: containers get their own network namespace
with only loopback.

In a VM guest (root filesystem read-only over 9p, tmpfs /run): put `workdir` on the scratch disk
(overlayfs needs a real filesystem for upper dirs); cgroup2 is mounted on /sys/fs/cgroup when
nothing is mounted there.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

from coldstart import ColdstartError, mounts_under, one_line, pid_alive, run as run_cmd, unmount_under

NAMESPACE = "fscached-coldstart"
# what an image's config would give; a --rootfs container has no image config
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DISABLED_PLUGINS = ["io.containerd.grpc.v1.cri"]


@dataclass
class RunResult:
    """One `ctr run`: its start, first stdout line and end as time.monotonic() values."""

    started_at: float
    first_line_at: float | None
    ended_at: float
    exit_code: int
    lines: list[str] = field(default_factory=list)
    stderr: str = ""

    @property
    def seconds_to_first_line(self) -> float | None:
        return None if self.first_line_at is None else self.first_line_at - self.started_at


def ensure_cgroups() -> None:
    """Mount cgroup2 on /sys/fs/cgroup when nothing is mounted there (a bare VM guest)."""
    if any(m == "/sys/fs/cgroup" or m.startswith("/sys/fs/cgroup/") for m in mounts_under(Path("/sys/fs"))):
        return
    run_cmd(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"], "mount cgroup2 on /sys/fs/cgroup")


def _config(workdir: Path, socket: Path) -> str:
    return "\n".join([
        "version = 2",
        f'root = "{workdir / "root"}"',
        f'state = "{workdir / "state"}"',
        f"disabled_plugins = {DISABLED_PLUGINS!r}".replace("'", '"'),
        "[grpc]",
        f'  address = "{socket}"',
        "[ttrpc]",
        f'  address = "{socket}.ttrpc"',
        "[debug]",
        '  address = ""',
        '  level = "info"',
        "[metrics]",
        '  address = ""',
        "[plugins]",
        '  [plugins."io.containerd.internal.v1.opt"]',
        f'    path = "{workdir / "opt"}"',
        '  [plugins."io.containerd.runtime.v1.linux"]',
        f'    state = "{workdir / "state" / "v1"}"',
        "",
    ])


class Containerd:
    """containerd + runc with every path under `workdir` (created; must be short enough for a
    unix socket path: under ~80 bytes). See the module docstring."""

    def __init__(self, workdir: Path, *, namespace: str = NAMESPACE, start_timeout: float = 30) -> None:
        self.workdir = Path(workdir).resolve()
        self.namespace = namespace
        self.start_timeout = start_timeout
        self.socket = self.workdir / "sock" / "containerd.sock"
        self.log_path = self.workdir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._bound = False
        self._ids = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Containerd:
        for binary in ("containerd", "ctr", "runc", "unshare", "nsenter"):
            if shutil.which(binary) is None:
                raise ColdstartError(f"containerd harness: {binary} is not installed (make deps)")
        if len(os.fsencode(self.socket)) > 100:
            raise ColdstartError(f"containerd harness: socket path {self.socket} is too long: use a shorter workdir")
        ensure_cgroups()
        for d in ("root", "state", "opt", "run"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.socket.parent, 0o700)
        config = self.workdir / "config.toml"
        config.write_text(self.config_text())
        self._share_workdir()
        inner = (f'mount --bind "{self.workdir / "run"}" /run && '
                 f'exec containerd --config "{config}"')
        try:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sh", "-c", inner],
                                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def config_text(self) -> str:
        """containerd's config.toml (a subclass may configure more: coldstart.snapshotter)."""
        return _config(self.workdir, self.socket)

    def _share_workdir(self) -> None:
        """Bind `workdir` on itself, shared: our host-side mounts below it reach containerd."""
        run_cmd(["mount", "--bind", str(self.workdir), str(self.workdir)], f"bind-mount {self.workdir}")
        self._bound = True
        run_cmd(["mount", "--make-shared", str(self.workdir)], f"make {self.workdir} a shared mount")

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        error = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ColdstartError(f"containerd exited {self.proc.returncode} at start: {one_line(self.log_tail(), 300)}")
            if self.socket.exists():
                r = subprocess.run(self.ctr_args("version"), capture_output=True, text=True, timeout=10)
                if r.returncode == 0 and "Server:" in r.stdout:
                    os.chmod(self.socket, 0o600)
                    return
                error = one_line(r.stderr, 200)
            time.sleep(0.05)
        raise ColdstartError(f"containerd did not answer `ctr version` within {self.start_timeout:g} s ({error})")

    def stop(self) -> None:
        """Idempotent, safe after a failed start: see the module docstring."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ColdstartError, subprocess.SubprocessError, OSError):
                self._remove_all_containers()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_shims()
        unmount_under(self.workdir)  # our overlays, and the shared bind of workdir itself
        self._bound = False
        self._remove_cgroups()

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- ctr ----------------------------------------------------------------------------------
    def ctr_args(self, *args: str) -> list[str]:
        """A ctr command line for our containerd, run inside its mount namespace."""
        if self.proc is None:
            raise ColdstartError("containerd is not running")
        return ["nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt", "--",
                "ctr", "--address", str(self.socket), "--namespace", self.namespace, *args]

    def ctr(self, *args: str, timeout: float = 600) -> str:
        return run_cmd(self.ctr_args(*args), f"ctr {' '.join(args[:2])}", timeout=timeout)

    def pull(self, ref: str, *, plain_http: bool = True, timeout: float = 3600) -> None:
        """Download every layer and unpack it into the overlayfs snapshotter (classic mode)."""
        self.ctr("images", "pull", *(["--plain-http"] if plain_http else []), ref, timeout=timeout)

    def new_id(self, prefix: str = "cs") -> str:
        self._ids += 1
        return f"{prefix}-{os.getpid()}-{self._ids}"

    def run(self, command: Sequence[str], *, image: str | None = None, rootfs: Path | None = None,
            container_id: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> RunResult:
        """`ctr run --rm` of `command` in `image` (pulled already) or in the directory `rootfs`,
        stdout read as it comes: the first line is timestamped on arrival. `env` is added to the
        container's environment (with `rootfs`, PATH defaults to DEFAULT_PATH)."""
        if (image is None) == (rootfs is None):
            raise ColdstartError("Containerd.run needs exactly one of image= and rootfs=")
        cid = container_id or self.new_id()
        env = dict(env or {})
        if rootfs is not None:
            env.setdefault("PATH", DEFAULT_PATH)
        flags = [f"--env={k}={v}" for k, v in env.items()]
        where = ["--rootfs", str(rootfs), cid] if rootfs is not None else [str(image), cid]
        args = self.ctr_args("run", "--rm", *flags, *where, *command)
        return stream_run(args, f"ctr run {cid}", timeout)

    @contextlib.contextmanager
    def overlay_rootfs(self, lower: Path, name: str | None = None) -> Iterator[Path]:
        """A writable overlay over the read-only `lower` (the lazily served EROFS mount), upper
        and work dirs under `workdir`; unmounted (and its upper removed) afterwards."""
        base = self.workdir / "overlays" / (name or self.new_id("rootfs"))
        upper, work, merged = base / "upper", base / "work", base / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True, exist_ok=True)
        run_cmd(["mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                f"overlay over {lower}")
        try:
            yield merged
        finally:
            unmount_under(merged)
            shutil.rmtree(base, ignore_errors=True)

    # -- teardown helpers -----------------------------------------------------------------------
    def _remove_all_containers(self) -> None:
        for line in self.ctr("tasks", "ls", "-q", timeout=30).split():
            subprocess.run(self.ctr_args("tasks", "kill", "-s", "SIGKILL", line), capture_output=True, timeout=30)
            subprocess.run(self.ctr_args("tasks", "delete", "-f", line), capture_output=True, timeout=30)
        for line in self.ctr("containers", "ls", "-q", timeout=30).split():
            subprocess.run(self.ctr_args("containers", "delete", line), capture_output=True, timeout=30)

    def shim_pids(self) -> list[int]:
        """containerd-shim processes serving our containerd (their -address is our socket)."""
        found = []
        needle = str(self.socket).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and b"containerd-shim" in cmdline[0] and needle in cmdline:
                found.append(int(entry.name))
        return found

    def _kill_shims(self) -> None:
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in self.shim_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _remove_cgroups(self) -> None:
        """The (empty) cgroups runc created for our namespace, in every hierarchy."""
        root = Path("/sys/fs/cgroup")
        for candidate in [root / self.namespace, *root.glob(f"*/{self.namespace}")]:
            if candidate.is_dir():
                for sub in sorted(candidate.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        sub.rmdir()


def stream_run(args: Sequence[str], what: str, timeout: float, env: dict[str, str] | None = None) -> RunResult:
    """Run `args` (a container's run: ctr run, nerdctl run) with its stdout read as it comes:
    the first line is timestamped on arrival. Killed after `timeout` s (a ColdstartError)."""
    started = time.monotonic()
    proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env)
    stderr: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(proc.stderr, stderr), daemon=True)
    reader.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines: list[str] = []
    first: float | None = None
    try:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            if first is None:
                first = time.monotonic()
            lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ended = time.monotonic()
    reader.join(5)
    err = b"".join(stderr).decode("utf-8", "replace")
    if ended - started >= timeout:
        raise ColdstartError(f"{what}: no exit within {timeout:g} s")
    return RunResult(started, first, ended, code, lines, err)


def _drain(stream: IO[bytes] | None, into: list[bytes]) -> None:
    if stream is not None:
        for chunk in iter(lambda: stream.read(65536), b""):
            into.append(chunk)


__all__ = ["NAMESPACE", "Containerd", "RunResult", "ensure_cgroups", "stream_run"]
