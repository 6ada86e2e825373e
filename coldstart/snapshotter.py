"""The real nydus-snapshotter (containerd-nydus-grpc) under the real containerd 1.6, driven by
nerdctl and crictl: what a node running fscached's `nydusd` looks like, for tests and benches.

    with RegistryRunner(workdir, access_log=True) as reg:
        image = push_nydus_image(rootfs_dir, out_dir, f"{reg.host}/t/app:nydus")   # fscached-image + skopeo
        cfg = SnapshotterConfig(daemon_mode="shared")            # fusedev, recover_policy none
        with SnapshotterStack(reg.host, cfg) as stack:           # containerd + snapshotter started
            stack.pull(image.ref)                                # nerdctl pull --snapshotter nydus
            r = stack.run(image.ref, ["cat", "/etc/hello"])      # nerdctl run --rm --net none
            r.stdout, r.stderr, r.returncode, r.seconds
            stack.mounts(), stack.nydusd_pids(), stack.snapshots()
            stack.rmi(image.ref)
            reader = stack.start_run(image.ref, ["sha256sum", "/data/big"])   # in the background
            stack.kill_nydusd()                                  # SIGKILL: the recover_policy's turn
            reader.wait(timeout=120)                             # -> CmdResult
            pod = stack.run_pod("p1")                            # crictl runp (busybox pause image)
            cid = stack.create_container(pod, "c1", image.ref, ["/bin/sh", "-c", "cat /etc/hello"])
            stack.start_container(cid); stack.logs(cid)
        stack.timings                                            # {"start": s, "stop": s}

Every command returns a `CmdResult` (args, returncode, stdout, stderr, seconds) and raises a
one-line `ColdstartError` when it fails (`check=False` returns the failure instead); a failed
nerdctl or crictl call also quotes the last error a nydusd logged (the snapshotter swallows mount
errors: nerdctl then only says that an API socket is missing). `reg.blob_bytes_served(digest,
since=reg.log_size())` counts what a daemon fetched of a blob (coldstart.registry).

Layout (`workdir`, default a fresh /var/tmp/fsn-XXXXXXXX, removed at stop): containerd's
root/state/sockets and its private /run (coldstart.containerd.Containerd), `nydus/` the
snapshotter's root (at most 70 bytes: the snapshotter refuses longer ones, its unix socket paths
live below it), `nsock/nydus.sock` the snapshotter's gRPC socket, `snapshotter.toml`,
`nydusd.json` (the nydusd config template), `certs.d/<registry>/hosts.toml` (plain http, for CRI
and nerdctl), `nerdctl/` nerdctl's data root, `cni/` (empty: host-network pods, `--net none`),
`podlogs/`, `crictl.yaml`, and the logs: `containerd.log`, `snapshotter.out` (the snapshotter's
and every nydusd's stdout/stderr), `nydus/logs/nydus-snapshotter.log`,
`nydus/logs/<daemon id>/nydusd.log`.

containerd runs in a mount namespace of its own (`unshare -m`, its /run replaced); the
snapshotter joins it (`nsenter -m`), so does every nydusd it starts (by fork) and every nerdctl
call: nerdctl mounts image views itself, the shims mount the overlays, and all of them must see
nydusd's mounts. crictl only talks to the socket. CRI is enabled and configured for nydus
(snapshotter "nydus", snapshot annotations passed, oom_score_adj restricted, the sandbox image
from the test registry: Debian's busybox-static, coldstart.busybox, pushed on first use).
nerdctl's containers live in the containerd namespace `namespace` (cgroups `/<namespace>/<id>`);
CRI pods in `k8s.io` with the cgroup parent `/<namespace>-cri`: no cgroup name is shared with
anything else on the machine. The machine's containerd (/run/containerd, /var/lib/containerd)
is never used.

Teardown (`stop()`, the context manager's exit, also after a failed start; idempotent): CRI
pods stopped and removed, every task killed and container removed in every containerd
namespace, every image removed (the snapshots go with them: a dedicated nydusd is stopped by the
snapshotter then), the snapshotter (SIGTERM, SIGKILL after 10 s), the nydusd processes it
started (found by an `--apisock` under the root: SIGTERM, SIGKILL after 5 s), then any other
process with an argument below the root (fscached's fanotify keepers), everything still
mounted under `workdir` in the namespace (lazily, deepest first), containerd and its shims, any
process left in the namespace (the namespace goes with the last one), the cgroups runc made,
then `workdir`. The orderly part has a budget (STOP_BUDGET): a hung snapshotter (an unanswered
sendfd hangs it for good) cannot hang the teardown. A stack whose owner was killed (SIGKILL of a
test run) is removed by the next stack's start (`reap_leftovers()`), found by the owner's pid and
start time recorded in `<workdir>/stack.json`.

The nydusd it runs is the project's own `nydusd` entry point beside the running interpreter
(`<venv>/bin/nydusd`: `nydusd fuse` for fusedev, `nydusd singleton` for fscache) unless
`SnapshotterConfig(nydusd_path=...)` names another. The real nydusd (nydus-rs, a peer make test
builds) runs as `nydusd_path=nydusd_rlimit_wrapper(nydus_rs_nydusd(), dir)`: a script written
at run time that adds `--rlimit-nofile 0`; `daemon_identity(pid)` tells which of the two a
running daemon is.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from coldstart import ColdstartError, mounts_under, one_line, pid_alive, run as run_cmd, unmount_under
from coldstart.busybox import TAG as PAUSE_TAG, pause_layout
from coldstart.containerd import Containerd, RunResult, stream_run
from fscached.util.mounts import MountEntry, parse_mountinfo

FS_DRIVERS = ("fusedev", "fscache")
DAEMON_MODES = ("dedicated", "shared")
RECOVER_POLICIES = ("none", "restart", "failover")
ROOT_MAX_BYTES = 70  # nydus-snapshotter refuses a longer root (config/config.go)
SNAPSHOTTER = "nydus"  # the proxy plugin's name: nerdctl's --snapshotter and CRI's snapshotter
CRI_NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace (fixed in containerd 1.6)
PAUSE_REPO = "fscached/pause"
STOP_BUDGET = 60.0  # s for the orderly part of a stop (CRI, containers, images); then force
MARKER = "stack.json"  # in the workdir: whose stack it is, for reap_leftovers()


def default_nydusd() -> Path:
    """The project's own `nydusd` entry point beside the running interpreter (<venv>/bin)."""
    return Path(sys.executable).parent / "nydusd"


NYDUS_RS = "nydus-rs"  # coldstart.peers' name for the real nydusd (nydus-rs 2.2.0, crates.io)
WRAPPER = "nydusd-rlimit"


def nydus_rs_nydusd() -> Path:
    """The real nydusd (the nydus-rs peer's binary); a ColdstartError naming how to build it."""
    from coldstart.peers import PEERS, PeerError, binary, peer_dir

    try:
        return binary(NYDUS_RS, "nydusd")
    except PeerError:
        raise ColdstartError(f"the real nydusd is not built ({peer_dir(PEERS[NYDUS_RS]) / 'bin' / 'nydusd'} "
                             f"missing): run `python -m coldstart.peers install {NYDUS_RS}` (5 to 8 minutes on "
                             "2 cores; make test builds it too)") from None


def nydusd_rlimit_wrapper(nydusd: Path, directory: Path) -> Path:
    """A script in `directory` to give the snapshotter as `nydusd_path`: it execs the real
    `nydusd` with the snapshotter's arguments plus `--rlimit-nofile 0` for its daemons
    (`fuse`, `singleton`). nydusd raises RLIMIT_NOFILE to 1,000,000 by default and exits with a
    bare EPERM where the hard limit is lower (these machines), and the snapshotter has no way
    to pass the flag. Anything else (`--version`, which the snapshotter asks for the Git
    Commit) goes through unchanged. exec: the snapshotter's pid is nydusd's."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WRAPPER
    exe = shlex.quote(str(nydusd))
    path.write_text("#!/bin/sh\n"
                    "# written by coldstart.snapshotter.nydusd_rlimit_wrapper: the real nydusd for\n"
                    "# nydus-snapshotter, with --rlimit-nofile 0 (its default raise fails with EPERM here)\n"
                    'case "$1" in\n'
                    f'  fuse|singleton) exec {exe} "$@" --rlimit-nofile 0 ;;\n'
                    f'  *) exec {exe} "$@" ;;\n'
                    "esac\n")
    path.chmod(0o755)
    return path


def daemon_identity(pid: int, real_nydusd: Path | None = None) -> str:
    """Which program the process `pid` runs: "nydusd" (the real one: its executable is
    `real_nydusd`, default the nydus-rs peer's), "fscached" (the project's `nydusd` entry point:
    the interpreter running default_nydusd()), else "other: <executable> <argv[:2]>"."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        argv = [os.fsdecode(a) for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError as exc:
        return f"other: pid {pid} unreadable ({exc.strerror})"
    exe = exe.removesuffix(" (deleted)")
    real = real_nydusd
    if real is None:
        with contextlib.suppress(ColdstartError):
            real = nydus_rs_nydusd()
    if real is not None and os.path.realpath(real) == exe:
        return "nydusd"
    ours = os.path.realpath(default_nydusd())
    if len(argv) > 1 and os.path.realpath(argv[1]) == ours and "python" in os.path.basename(exe):
        return "fscached"
    return f"other: {exe} {' '.join(argv[:2])}"


def nydusd_config_template(fs_driver: str) -> dict[str, Any]:
    """The smallest nydusd config the snapshotter accepts for `fs_driver`, for a plain-http
    registry (the snapshotter fills in host, repo, auth and the cache dir per image)."""
    backend = {"scheme": "http", "timeout": 5, "connect_timeout": 5, "retry_limit": 2}
    if fs_driver == "fscache":
        return {"type": "bootstrap",
                "config": {"backend_type": "registry", "backend_config": backend, "cache_type": "fscache",
                           "prefetch_config": {"enable": False, "threads_count": 4, "merging_size": 1 << 20}}}
    return {"device": {"backend": {"type": "registry", "config": backend}, "cache": {"type": "blobcache"}},
            "mode": "direct", "digest_validate": False, "enable_xattr": True, "fs_prefetch": {"enable": False}}


# nerdctl's own log lines (logrus): `time="..." level=error msg="forward signal child exited"
# error="ttrpc: closed"` when the task's shim connection closes as the container exits
NERDCTL_LOG_LINE = re.compile(r'^time="[^"]*" level=\w+ msg=')


def container_stderr(stderr: str) -> str:
    """What the container's process wrote to stderr: nerdctl's log lines about its own plumbing
    taken out (the exit code tells whether nerdctl itself failed)."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not NERDCTL_LOG_LINE.match(line))


@dataclass(frozen=True)
class SnapshotterConfig:
    """What the snapshotter is asked to run. nydusd_path None: the project's `nydusd`
    (default_nydusd()); nydusd_config None: nydusd_config_template(fs_driver)."""

    fs_driver: str = "fusedev"
    daemon_mode: str = "dedicated"
    recover_policy: str = "none"
    nydusd_path: Path | None = None
    nydusd_config: dict[str, Any] | None = None
    log_level: str = "debug"
    # more of the snapshotter's config.toml, merged over what the stack writes (a table into a
    # table): a user's config, as the README's is run by tests/snapshotter/test_readme_configs.py
    settings: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        for name, value, allowed in (("fs_driver", self.fs_driver, FS_DRIVERS),
                                     ("daemon_mode", self.daemon_mode, DAEMON_MODES),
                                     ("recover_policy", self.recover_policy, RECOVER_POLICIES)):
            if value not in allowed:
                raise ColdstartError(f"snapshotter config: {name} {value!r} is not one of {', '.join(allowed)}")

    @property
    def nydusd(self) -> Path:
        return Path(self.nydusd_path) if self.nydusd_path is not None else default_nydusd()


@dataclass
class CmdResult:
    """One command the stack ran."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Running:
    """A command started in the background (SnapshotterStack.start_run): `wait()` gives its
    CmdResult; its output goes to files, so nothing blocks on a full pipe."""

    def __init__(self, args: list[str], what: str, env: dict[str, str], scratch: Path) -> None:
        self.args, self.what = args, what
        self._out, self._err = scratch.with_suffix(".out"), scratch.with_suffix(".err")
        self.started = time.monotonic()
        with open(self._out, "wb") as out, open(self._err, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stdout_so_far(self) -> str:
        return _read(self._out)

    def wait(self, timeout: float = 300, *, check: bool = True) -> CmdResult:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise ColdstartError(f"{self.what}: no exit within {timeout:g} s "
                                 f"({one_line(_read(self._err) or 'no output', 200)})") from None
        result = CmdResult(self.args, code, _read(self._out), _read(self._err), time.monotonic() - self.started)
        if check and not result.ok:
            said = one_line(result.stderr or result.stdout or "no output")
            raise ColdstartError(f"{self.what}: exited {code}: {said}")
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class NydusImage:
    """A nydus image converted by fscached-image and pushed: its reference, the converter's
    output directory (image.boot, blobs/, oci/) and its data blobs (digest -> size)."""

    ref: str
    out: Path
    blobs: dict[str, int] = field(default_factory=dict)

    @property
    def blob_bytes(self) -> int:
        return sum(self.blobs.values())


def push_layout(layout: Path, ref: str, *, tag: str = "latest", timeout: float = 600) -> str:
    """skopeo copy of the OCI layout `layout` (tag `tag`) to `ref` on a plain-http registry."""
    run_cmd(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{ref}"],
            f"skopeo copy {layout} to {ref}", timeout=timeout)
    return ref


def _nydus_blobs(layout: Path) -> dict[str, int]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_text())
    return {layer["digest"]: int(layer["size"]) for layer in manifest.get("layers", [])
            if (layer.get("annotations") or {}).get("containerd.io/snapshot/nydus-blob") == "true"}


def push_nydus_image(source: Path, out: Path, ref: str, *, convert_args: Sequence[str] = (),
                     timeout: float = 600) -> NydusImage:
    """`fscached-image convert source out` (a directory, an OCI layout or a docker save
    archive), then its OCI layout (out/oci) pushed to `ref` with skopeo."""
    run_cmd([sys.executable, "-m", "erofs_image.cli", "convert", "-q", *convert_args, str(source), str(out)],
            f"fscached-image convert {source}", timeout=timeout)
    push_layout(out / "oci", ref, timeout=timeout)
    return NydusImage(ref, out, _nydus_blobs(out / "oci"))


def _q(value: object) -> str:
    """A TOML basic string (JSON's escaping is TOML's for what paths contain)."""
    return json.dumps(str(value))


def merge_settings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`: a table into a table, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    raise ColdstartError(f"snapshotter config: {where}: a {type(value).__name__} cannot be written as TOML here")


def toml_text(doc: dict[str, Any], prefix: str = "") -> str:
    """A TOML document of scalars, lists of scalars and tables (what tomllib reads back)."""
    lines = [f"{key} = {_toml_value(value, prefix + key)}" for key, value in doc.items() if not isinstance(value, dict)]
    for key, value in doc.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            lines += ["", f"[{name}]", toml_text(value, name + ".").rstrip("\n")]
    return "\n".join(line for line in lines) + "\n"


class _CriContainerd(Containerd):
    """coldstart.containerd.Containerd with the CRI plugin on, for nydus, and the snapshotter as
    a proxy plugin; teardown over every containerd namespace and our cgroup names."""

    def __init__(self, stack: SnapshotterStack) -> None:
        super().__init__(stack.workdir, namespace=stack.namespace)
        self.stack = stack

    def config_text(self) -> str:
        s, w = self.stack, self.workdir
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        return "\n".join([
            "version = 2",
            f"root = {_q(w / 'root')}",
            f"state = {_q(w / 'state')}",
            "[grpc]",
            f"  address = {_q(self.socket)}",
            "[ttrpc]",
            f"  address = {_q(str(self.socket) + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            '  level = "info"',
            "[metrics]",
            '  address = ""',
            "[plugins]",
            '  [plugins."io.containerd.internal.v1.opt"]',
            f"    path = {_q(w / 'opt')}",
            '  [plugins."io.containerd.runtime.v1.linux"]',
            f"    state = {_q(w / 'state' / 'v1')}",
            f"  {cri}]",
            f"    sandbox_image = {_q(s.sandbox_image)}",
            "    restrict_oom_score_adj = true",  # this sandbox cannot lower it to -998
            f"    {cri}.containerd]",
            f"      snapshotter = {_q(SNAPSHOTTER)}",
            "      disable_snapshot_annotations = false",  # the nydus layer labels reach the snapshotter
            '      default_runtime_name = "runc"',
            f"      {cri}.containerd.runtimes.runc]",
            '        runtime_type = "io.containerd.runc.v2"',
            f"    {cri}.cni]",
            f"      bin_dir = {_q(s.cni_bin)}",
            f"      conf_dir = {_q(s.cni_conf)}",
            f"    {cri}.registry]",
            f"      config_path = {_q(s.hosts_dir)}",
            "[proxy_plugins]",
            f"  [proxy_plugins.{SNAPSHOTTER}]",
            '    type = "snapshot"',
            f"    address = {_q(s.snapshotter_socket)}",
            "",
        ])

    def ctr_in(self, namespace: str, *args: str) -> list[str]:
        if self.proc is None:
            raise ColdstartError("containerd is not running")
        return ["nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt", "--",
                "ctr", "--address", str(self.socket), "--namespace", namespace, *args]

    def namespaces(self) -> list[str]:
        return self.ctr("namespaces", "ls", "-q", timeout=30).split()

    def remove_containers(self, deadline: float) -> None:
        """Every task killed and deleted, every container removed, in every namespace."""
        for ns in self.namespaces():
            for task in _quiet(self.ctr_in(ns, "tasks", "ls", "-q"), deadline).split():
                _quiet(self.ctr_in(ns, "tasks", "kill", "-s", "SIGKILL", task), deadline)
                _quiet(self.ctr_in(ns, "tasks", "delete", "-f", task), deadline)
            for ctr in _quiet(self.ctr_in(ns, "containers", "ls", "-q"), deadline).split():
                _quiet(self.ctr_in(ns, "containers", "delete", ctr), deadline)

    def _remove_all_containers(self) -> None:
        self.remove_containers(time.monotonic() + 15)

    def _remove_cgroups(self) -> None:
        _remove_cgroups([self.stack.namespace, self.stack.cri_cgroup_parent.strip("/")])


class SnapshotterStack:
    """containerd 1.6 (CRI on) + containerd-nydus-grpc + nerdctl/crictl, with state of its own;
    see the module docstring. `registry` is the plain-http registry's host:port (127.0.0.1)."""

    def __init__(self, registry: str, config: SnapshotterConfig | None = None, *, workdir: Path | None = None,
                 sandbox_image: str | None = None, start_timeout: float = 30, command_timeout: float = 300,
                 keep: bool = False) -> None:
        self.registry = registry
        self.config = config or SnapshotterConfig()
        self.config.check()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fsn-", dir="/var/tmp"))
        self.workdir = self.workdir.resolve()
        self.namespace = "fsn-" + secrets.token_hex(4)
        self.cri_cgroup_parent = f"/{self.namespace}-cri"
        self.sandbox_image = sandbox_image or f"{registry}/{PAUSE_REPO}:{PAUSE_TAG}"
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout  # nerdctl's default: a pull or a container's whole run
        self.stop_budget = STOP_BUDGET
        self.keep = keep
        self.root = self.workdir / "nydus"
        self.snapshotter_socket = self.workdir / "nsock" / "nydus.sock"
        self.snapshotter_toml = self.workdir / "snapshotter.toml"
        self.nydusd_json = self.workdir / "nydusd.json"
        self.hosts_dir = self.workdir / "certs.d"
        self.cni_bin = self.workdir / "cni" / "bin"
        self.cni_conf = self.workdir / "cni" / "net.d"
        self.nerdctl_root = self.workdir / "nerdctl"
        self.pod_logs = self.workdir / "podlogs"
        self.crictl_yaml = self.workdir / "crictl.yaml"
        self.snapshotter_out = self.workdir / "snapshotter.out"
        self.containerd = _CriContainerd(self)
        self.snapshotter: subprocess.Popen[bytes] | None = None
        self.mount_ns: str | None = None  # "mnt:[inode]" of containerd's namespace
        self.timings: dict[str, float] = {}
        self._sandbox_pushed = False
        self._pods: dict[str, Path] = {}
        self._running: list[Running] = []
        self._serial = 0
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> SnapshotterStack:
        t0 = time.monotonic()
        try:
            self._check_host()
            if self._own_workdir:
                reap_leftovers(self.workdir.parent)
            self._write_configs()
            self.containerd.start()
            assert self.containerd.proc is not None
            self.mount_ns = os.readlink(f"/proc/{self.containerd.proc.pid}/ns/mnt")
            self._start_snapshotter()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def __enter__(self) -> SnapshotterStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _check_host(self) -> None:
        if os.geteuid() != 0:
            raise ColdstartError("snapshotter stack: needs root (mount namespaces, mounts, containerd)")
        for tool in ("containerd", "ctr", "runc", "unshare", "nsenter", "skopeo", "umount"):
            if shutil.which(tool) is None:
                raise ColdstartError(f"snapshotter stack: {tool} is not installed (make deps)")
        if len(os.fsencode(self.root)) > ROOT_MAX_BYTES:
            raise ColdstartError(f"snapshotter stack: root {self.root} is longer than {ROOT_MAX_BYTES} bytes "
                                 "(nydus-snapshotter refuses it): use a shorter workdir")
        nydusd = self.config.nydusd
        if not os.access(nydusd, os.X_OK):
            raise ColdstartError(f"snapshotter stack: nydusd {nydusd} is not an executable file "
                                 "(make venv installs the project's)")
        self.snapshotter_bin = _peer("containerd-nydus-grpc")
        self.nerdctl_bin = _peer("nerdctl")
        self.crictl_bin = _peer("crictl")

    def _write_configs(self) -> None:
        c = self.config
        for d in (self.root, self.snapshotter_socket.parent, self.cni_bin, self.cni_conf, self.nerdctl_root,
                  self.pod_logs, self.hosts_dir / self.registry):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.snapshotter_socket.parent, 0o700)
        url = f"http://{self.registry}"
        (self.hosts_dir / self.registry / "hosts.toml").write_text(
            f"server = {_q(url)}\n[host.{_q(url)}]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n")
        self.nydusd_json.write_text(json.dumps(c.nydusd_config or nydusd_config_template(c.fs_driver), indent=1))
        self.snapshotter_toml.write_text(toml_text(merge_settings(self.snapshotter_settings(), c.settings)))
        self.crictl_yaml.write_text(f"runtime-endpoint: unix://{self.containerd.socket}\n"
                                    f"image-endpoint: unix://{self.containerd.socket}\n"
                                    "timeout: 60\n")
        (self.workdir / "nerdctl.toml").write_text("")  # not the machine's /etc/nerdctl/nerdctl.toml
        (self.workdir / MARKER).write_text(json.dumps({
            "owner": os.getpid(), "owner_started": _start_time(os.getpid()),
            "cgroups": [self.namespace, self.cri_cgroup_parent.strip("/")]}))

    def snapshotter_settings(self) -> dict[str, Any]:
        """The snapshotter's config.toml as the stack writes it (before `config.settings`)."""
        c = self.config
        return {
            "version": 1,
            "root": str(self.root),
            "address": str(self.snapshotter_socket),
            "daemon_mode": c.daemon_mode,
            "cleanup_on_close": False,
            "system": {"enable": False},
            "daemon": {"nydusd_config": str(self.nydusd_json), "nydusd_path": str(c.nydusd),
                       "fs_driver": c.fs_driver, "recover_policy": c.recover_policy, "failover_policy": "resend"},
            "cgroup": {"enable": False},
            # the snapshotter's log: <root>/logs/nydus-snapshotter.log
            "log": {"log_to_stdout": False, "level": c.log_level},
            "metrics": {"address": ""},
            # Remove stops a dedicated nydusd at once, not at a later GC
            "snapshot": {"sync_remove": True},
        }

    def _start_snapshotter(self) -> None:
        assert self.containerd.proc is not None
        with open(self.snapshotter_out, "ab") as out:
            self.snapshotter = subprocess.Popen(
                ["nsenter", f"--mount=/proc/{self.containerd.proc.pid}/ns/mnt", "--",
                 str(self.snapshotter_bin), "--config", str(self.snapshotter_toml)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        error = "its socket never appeared"
        while time.monotonic() < deadline:
            if self.snapshotter.poll() is not None:
                raise ColdstartError(f"containerd-nydus-grpc exited {self.snapshotter.returncode} at start: "
                                     f"{self.snapshotter_error()}")
            if self.snapshotter_socket.exists():
                r = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False, timeout=10)
                if r.ok:
                    return
                error = one_line(r.stderr, 200)
            time.sleep(0.05)
        raise ColdstartError(f"containerd-nydus-grpc did not serve containerd within {self.start_timeout:g} s "
                             f"({error}): {self.snapshotter_error()}")

    def restart_snapshotter(self, config: SnapshotterConfig | None = None) -> None:
        """Stop the snapshotter (SIGTERM) and start it again, with the same config or `config`
        (e.g. another nydusd_path: a new nydusd installed, which the snapshotter hot-upgrades
        live daemons to when its `--version` names another Git Commit): nydusd daemons it left
        running are reconnected (or recovered, or upgraded) by the new one."""
        self._stop_snapshotter()
        if config is not None:
            config.check()
            self.config = config
            self._write_configs()
        self._start_snapshotter()

    def _stop_snapshotter(self) -> None:
        proc, self.snapshotter = self.snapshotter, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """Tear everything down (see the module docstring). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        deadline = t0 + self.stop_budget
        ctd = self.containerd
        for running in self._running:
            running.kill()  # the nerdctl client; its container goes with the others below
        for step in (self._remove_pods, ctd.remove_containers, self._remove_images_and_snapshots):
            if ctd.proc is None or ctd.proc.poll() is not None or time.monotonic() >= deadline:
                break
            with contextlib.suppress(ColdstartError, subprocess.SubprocessError, OSError):
                step(deadline)
        self._stop_snapshotter()
        self._stop_processes(self.nydusd_pids(), 5)  # SIGTERM: each unmounts and exits
        self._stop_processes(self.root_pids(), 5)  # what they left (fscached's fanotify keepers)
        if ctd.proc is not None and ctd.proc.poll() is None:
            self._unmount_in_namespace()
        ctd.stop()  # containers (briefly: the orderly part is done), containerd, shims, host mounts, cgroups
        self._stop_processes(self.namespace_pids(), 5)
        _remove_cgroups([self.namespace, self.cri_cgroup_parent.strip("/")])
        if self.keep:
            with contextlib.suppress(OSError):
                (self.workdir / MARKER).unlink()  # stopped: nothing in it for reap_leftovers()
        elif self._own_workdir and not mounts_under(self.workdir):  # never rmtree into a mount
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["stop"] = time.monotonic() - t0

    def _remove_pods(self, deadline: float) -> None:
        for pod in self.crictl("pods", "-q", check=False, timeout=_left(deadline, 30)).stdout.split():
            self.crictl("stopp", pod, check=False, timeout=_left(deadline, 60))
            self.crictl("rmp", "-f", pod, check=False, timeout=_left(deadline, 60))

    def _remove_images_and_snapshots(self, deadline: float) -> None:
        """Every image in every namespace (a synchronous GC: the snapshots go, and a dedicated
        nydusd with its image's), then what GC left, a leaf at a time."""
        ctd = self.containerd
        namespaces = ctd.namespaces()
        for ns in namespaces:
            refs = _quiet(ctd.ctr_in(ns, "images", "ls", "-q"), deadline).split()
            if refs:
                _quiet(ctd.ctr_in(ns, "images", "rm", "--sync", *refs), deadline)
        while time.monotonic() < deadline:
            left = {ns: self.snapshots(ns, timeout=_left(deadline, 30)) for ns in namespaces}
            if not any(left.values()):
                return
            for ns, keys in left.items():
                for key in keys:
                    _quiet(ctd.ctr_in(ns, "snapshots", "--snapshotter", SNAPSHOTTER, "rm", key), deadline)
            time.sleep(0.2)

    def _stop_processes(self, pids: list[int], grace: float) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(pid_alive(p) and not _zombie(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _unmount_in_namespace(self) -> None:
        for _round in range(5):
            left = self.mounts(under=self.workdir, referencing=True)
            if not left:
                return
            targets = [m.mountpoint for m in sorted(left, key=lambda m: (m.mountpoint.count("/"), m.mount_id),
                                                    reverse=True)]
            self.in_namespace(["umount", "-l", "--", *targets], check=False, timeout=60)

    def cgroups(self) -> list[Path]:
        """The cgroup directories of our names that exist now, in every hierarchy."""
        return _cgroup_dirs([self.namespace, self.cri_cgroup_parent.strip("/")])

    # -- what is there --------------------------------------------------------------------------
    def _ctd_pid(self) -> int:
        proc = self.containerd.proc
        if proc is None or proc.poll() is not None:
            raise ColdstartError("snapshotter stack: containerd is not running")
        return proc.pid

    def mounts(self, under: Path | None = None, *, referencing: bool = False) -> list[MountEntry]:
        """What containerd's mount namespace has mounted at or below `under` (default: the
        snapshotter's root); referencing: also mounts elsewhere whose source or options name a
        path below it (an overlay with a lowerdir there). [] once the namespace is gone."""
        base = str(Path(under) if under is not None else self.root)
        proc = self.containerd.proc
        if proc is None or proc.poll() is not None:
            return []
        try:
            text = Path(f"/proc/{proc.pid}/mountinfo").read_text()
        except OSError:
            return []

        def below(p: str) -> bool:
            return p == base or p.startswith(base + "/")

        return [m for m in parse_mountinfo(text)
                if below(m.mountpoint) or (referencing and (base + "/" in m.source
                                                            or any(base + "/" in o for o in m.super_options)))]

    def _nydusd_processes(self) -> list[tuple[int, Path]]:
        """(pid, `--apisock`) of every process whose `--apisock` is below the snapshotter's root."""
        found = []
        prefix = os.fsencode(self.root) + b"/"
        for pid, argv in _processes():
            for i, arg in enumerate(argv[:-1]):
                if arg == b"--apisock" and argv[i + 1].startswith(prefix):
                    found.append((pid, Path(os.fsdecode(argv[i + 1]))))
                    break
        return found

    def nydusd_pids(self) -> list[int]:
        """The nydusd daemons: processes whose `--apisock` is below the snapshotter's root."""
        return [pid for pid, _ in self._nydusd_processes()]

    def nydusd_sockets(self) -> list[Path]:
        """The `--apisock` of every running nydusd of the stack."""
        return [sock for _, sock in self._nydusd_processes()]

    def wait_shared_daemon(self, timeout: float = 60) -> Path:
        """Wait until the shared-mode nydusd the snapshotter starts at its own start answers
        GET /api/v1/daemon with state RUNNING; its API socket."""
        deadline = time.monotonic() + timeout
        said = "no nydusd started"
        while time.monotonic() < deadline:
            for sock in self.nydusd_sockets():
                said = _daemon_state(sock)
                if said == "RUNNING":
                    return sock
            time.sleep(0.05)
        raise ColdstartError(f"the shared nydusd was not RUNNING within {timeout:g} s ({said}): "
                             f"{self.nydusd_error() or self.snapshotter_error()}")

    def root_pids(self) -> list[int]:
        """Processes with an argument below the snapshotter's root: the nydusd daemons and
        anything they started there (fscached's keepers, whose sockets live in its cache)."""
        prefix = os.fsencode(self.root) + b"/"
        return [pid for pid, argv in _processes() if any(arg.startswith(prefix) for arg in argv)]

    def namespace_pids(self) -> list[int]:
        """Every process in containerd's mount namespace (containerd, shims, snapshotter, nydusd)."""
        if self.mount_ns is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/mnt") == self.mount_ns:
                        found.append(int(entry))
        return found

    def snapshots(self, namespace: str | None = None, *, timeout: float = 30) -> list[str]:
        """Keys of the nydus snapshots in a containerd namespace (default: nerdctl's)."""
        r = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", namespace=namespace, timeout=timeout)
        return [line.split()[0] for line in r.stdout.splitlines()[1:] if line.split()]

    def snapshotter_log(self) -> str:
        return _read(self.root / "logs" / "nydus-snapshotter.log")

    def nydusd_logs(self) -> str:
        """Every nydusd log file under the root, then the snapshotter's stdout/stderr (which the
        nydusd daemons inherit)."""
        parts = [f"== {p}\n{_read(p)}" for p in sorted((self.root / "logs").glob("*/nydusd.log*"))]
        return "\n".join([*parts, f"== {self.snapshotter_out}\n{_read(self.snapshotter_out)}"])

    def snapshotter_error(self) -> str:
        """The last error the snapshotter logged, in one line (else the tail of its output)."""
        for line in reversed(self.snapshotter_log().splitlines()):
            if "level=error" in line or "level=fatal" in line:
                return one_line(line, 300)
        return one_line(_read(self.snapshotter_out)[-600:], 300) or "no output"

    # -- commands -----------------------------------------------------------------------------
    def nydusd_error(self) -> str | None:
        """The last error line a nydusd logged (its log files, then its inherited stderr)."""
        logs = sorted((self.root / "logs").glob("*/nydusd.log"), key=lambda p: p.stat().st_mtime)
        for path in [self.snapshotter_out, *logs]:
            for line in reversed(_read(path).splitlines()):
                if " ERROR " in line or line.startswith("nydusd: error:"):
                    return one_line(line, 300)
        return None

    def _call(self, args: list[str], what: str, *, check: bool, timeout: float,
              env: dict[str, str] | None = None, explain: bool = False) -> CmdResult:
        t0 = time.monotonic()
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                               env=env, errors="replace")
        except subprocess.TimeoutExpired as exc:
            raise ColdstartError(f"{what}: no exit within {timeout:g} s "
                                 f"({one_line(_text(exc.stderr) or _text(exc.stdout) or 'no output', 200)})") from None
        result = CmdResult(args, r.returncode, r.stdout, r.stderr, time.monotonic() - t0)
        if check and not result.ok:
            said = self.nydusd_error() if explain else None
            gone = self._snapshotter_gone() if explain else None
            raise ColdstartError(f"{what}: exited {r.returncode}: {one_line(r.stderr or r.stdout or 'no output')}"
                                 + (f" (nydusd logged: {said})" if said else "") + (f" ({gone})" if gone else ""))
        return result

    def _snapshotter_gone(self) -> str | None:
        """Why a command that went through the snapshotter failed, when it is because the
        snapshotter itself exited (its exit code and last error), else None."""
        proc = self.snapshotter
        if proc is None or proc.poll() is None:
            return None
        return f"containerd-nydus-grpc had exited {proc.returncode}: {self.snapshotter_error()}"

    def in_namespace(self, command: Sequence[str], *, check: bool = True, timeout: float = 120) -> CmdResult:
        """Run `command` in containerd's mount namespace."""
        args = ["nsenter", f"--mount=/proc/{self._ctd_pid()}/ns/mnt", "--", *command]
        return self._call(args, " ".join(command[:2]), check=check, timeout=timeout)

    def ctr(self, *args: str, namespace: str | None = None, check: bool = True, timeout: float = 120) -> CmdResult:
        cmd = self.containerd.ctr_in(namespace or self.namespace, *args)
        return self._call(cmd, f"ctr {' '.join(args[:3])}", check=check, timeout=timeout)

    def nerdctl_args(self, *args: str) -> list[str]:
        return ["nsenter", f"--mount=/proc/{self._ctd_pid()}/ns/mnt", "--",
                str(self.nerdctl_bin), "--address", str(self.containerd.socket), "--namespace", self.namespace,
                "--data-root", str(self.nerdctl_root), "--snapshotter", SNAPSHOTTER,
                "--hosts-dir", str(self.hosts_dir), "--cni-path", str(self.cni_bin),
                "--cni-netconfpath", str(self.cni_conf), "--insecure-registry", *args]

    def _nerdctl_env(self) -> dict[str, str]:
        env = {**os.environ, "NERDCTL_TOML": str(self.workdir / "nerdctl.toml")}
        for var in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER"):
            env.pop(var, None)
        return env

    def nerdctl(self, *args: str, check: bool = True, timeout: float | None = None,
                what: str | None = None) -> CmdResult:
        return self._call(self.nerdctl_args(*args), what or f"nerdctl {' '.join(args[:4])}", check=check,
                          timeout=timeout or self.command_timeout, env=self._nerdctl_env(), explain=True)

    def pull(self, ref: str, *, check: bool = True, timeout: float | None = None) -> CmdResult:
        return self.nerdctl("pull", "--quiet", ref, check=check, timeout=timeout, what=f"nerdctl pull {ref}")

    def run(self, ref: str, command: Sequence[str], *, name: str | None = None, detach: bool = False,
            extra: Sequence[str] = (), check: bool = True, timeout: float | None = None) -> CmdResult:
        """nerdctl run of `command` in the image `ref`, no network; removed when it exits unless
        `detach` (then stdout is the container's id)."""
        args = ["run", "--net", "none", *(["-d"] if detach else ["--rm"]), *(["--name", name] if name else []),
                *extra, ref, *command]
        return self.nerdctl(*args, check=check, timeout=timeout,
                            what=f"nerdctl run {ref} {one_line(' '.join(command), 80)}")

    def run_streamed(self, ref: str, command: Sequence[str], *, timeout: float | None = None) -> RunResult:
        """`run()` with the container's stdout read as it comes (the first line timestamped on
        arrival, coldstart.containerd.stream_run): a cold start measured as a user sees it,
        pull included when the image is not there yet."""
        args = self.nerdctl_args("run", "--net", "none", "--rm", ref, *command)
        return stream_run(args, f"nerdctl run {ref}", timeout or self.command_timeout, env=self._nerdctl_env())

    def start_run(self, ref: str, command: Sequence[str], *, name: str | None = None,
                  extra: Sequence[str] = ()) -> Running:
        """`run()` in the background: the test does something while the container reads."""
        args = ["run", "--net", "none", "--rm", *(["--name", name] if name else []), *extra, ref, *command]
        self._serial += 1
        running = Running(self.nerdctl_args(*args), f"nerdctl run {ref} {one_line(' '.join(command), 80)}",
                          self._nerdctl_env(), self.workdir / f"run-{self._serial}")
        self._running.append(running)
        return running

    def kill_nydusd(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to every nydusd of the stack; their pids."""
        pids = self.nydusd_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def rmi(self, ref: str, *, check: bool = True, timeout: float = 120) -> CmdResult:
        return self.nerdctl("rmi", ref, check=check, timeout=timeout, what=f"nerdctl rmi {ref}")

    def images(self) -> list[str]:
        out = self.nerdctl("images", "--format", "{{.Repository}}:{{.Tag}}", timeout=60).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    # -- CRI ----------------------------------------------------------------------------------
    def crictl(self, *args: str, check: bool = True, timeout: float = 120) -> CmdResult:
        return self._call([str(self.crictl_bin), "--config", str(self.crictl_yaml), *args],
                          f"crictl {' '.join(args[:2])}", check=check, timeout=timeout, explain=True)

    def push_sandbox_image(self) -> str:
        """The busybox pause image (coldstart.busybox) at `sandbox_image`, pushed once."""
        if not self._sandbox_pushed:
            push_layout(pause_layout(), self.sandbox_image, tag=PAUSE_TAG)
            self._sandbox_pushed = True
        return self.sandbox_image

    def _new_name(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}{self._serial}"

    def run_pod(self, name: str | None = None, *, timeout: float = 120) -> str:
        """crictl runp of a host-network pod (no CNI), its cgroups under our parent; its id."""
        self.push_sandbox_image()
        name = name or self._new_name("pod")
        config = self.workdir / f"pod-{name}.json"
        config.write_text(json.dumps({
            "metadata": {"name": name, "namespace": "default", "uid": f"{self.namespace}-{name}", "attempt": 0},
            "log_directory": str(self.pod_logs / name),
            "linux": {"cgroup_parent": self.cri_cgroup_parent,
                      "security_context": {"namespace_options": {"network": 2}}},  # 2: NODE
        }))
        pod = self.crictl("runp", str(config), timeout=timeout).stdout.strip()
        self._pods[pod] = config
        return pod

    def create_container(self, pod: str, name: str, image: str, command: Sequence[str], *,
                         timeout: float = 120) -> str:
        """crictl create of `command` in `image` (pulled already: crictl pull) in `pod`; its id."""
        config = self.workdir / f"ctr-{pod[:12]}-{name}.json"
        config.write_text(json.dumps({"metadata": {"name": name}, "image": {"image": image},
                                      "command": list(command), "log_path": f"{name}.log", "linux": {}}))
        return self.crictl("create", pod, str(config), str(self._pods[pod]), timeout=timeout).stdout.strip()

    def start_container(self, cid: str, *, timeout: float = 120) -> CmdResult:
        return self.crictl("start", cid, timeout=timeout)

    def logs(self, cid: str) -> str:
        return self.crictl("logs", cid, timeout=60).stdout

    def stop_pod(self, pod: str) -> None:
        self.crictl("stopp", pod, timeout=120)

    def remove_pod(self, pod: str) -> None:
        self.crictl("rmp", pod, timeout=120)
        self._pods.pop(pod, None)


def _left(deadline: float, cap: float) -> float:
    """A subprocess timeout: what is left until `deadline`, at most `cap`, at least 1 s."""
    return max(1.0, min(cap, deadline - time.monotonic()))


def _quiet(args: list[str], deadline: float, cap: float = 60) -> str:
    """Run a teardown command: its stdout, "" when it fails or runs out of time."""
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=_left(deadline, cap),
                           stdin=subprocess.DEVNULL, errors="replace")
    except (subprocess.SubprocessError, OSError):
        return ""
    return r.stdout if r.returncode == 0 else ""


def _cgroup_dirs(names: Sequence[str]) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [top for name in names for top in [root / name, *root.glob(f"*/{name}")] if top.is_dir()]


def _remove_cgroups(names: Sequence[str]) -> None:
    """The cgroups `names` (top-level, in every hierarchy) and everything below: processes
    still in them are killed first (a container whose shim is gone)."""
    for top in _cgroup_dirs(names):
        dirs = sorted(top.glob("**/"), key=lambda p: len(p.parts), reverse=True)
        for d in dirs:
            with contextlib.suppress(OSError, ValueError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        for d in dirs:
            while time.monotonic() < deadline:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY until the killed processes are gone
                    time.sleep(0.05)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: no such process)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def reap_leftovers(parent: Path = Path("/var/tmp")) -> list[Path]:
    """Stacks whose owner died without stopping them (a killed test run): every process whose
    command line names the stack's workdir is killed (containerd, its shims, the snapshotter,
    nydusd; the mount namespace goes with them), then the processes in its cgroups, its
    cgroups, the host's mounts under it and the workdir. Returns the workdirs removed."""
    reaped = []
    for marker in sorted(parent.glob(f"fsn-*/{MARKER}")):
        try:
            info = json.loads(marker.read_text())
            owner, started, names = int(info["owner"]), info.get("owner_started"), list(info["cgroups"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid_alive(owner) and _start_time(owner) == started:
            continue
        work = marker.parent
        needle = os.fsencode(work) + b"/"
        victims = [pid for pid, argv in _processes() if any(needle in arg for arg in argv) and pid != os.getpid()]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(pid_alive(p) and not _zombie(p) for p in victims) and time.monotonic() < deadline:
            time.sleep(0.05)
        _remove_cgroups(names)
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
        reaped.append(work)
    return reaped


def _peer(name: str) -> Path:
    from coldstart.peers import PeerError, binary

    try:
        return binary(name)
    except PeerError as exc:
        raise ColdstartError(str(exc)) from None


def _processes() -> list[tuple[int, list[bytes]]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found.append((int(entry), Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")))
            except OSError:
                continue
    return found


def _daemon_state(sock: Path) -> str:
    """nydusd's GET /api/v1/daemon `state` at `sock`, or what went wrong asking. The body is
    read by its Content-Length: the real nydusd keeps the connection open after an HTTP/1.0
    request (reading to EOF waits for the timeout)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(b"GET /api/v1/daemon HTTP/1.0\r\nHost: nydusd\r\n\r\n")
            data = b""
            while True:
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                    if length is not None and len(body) >= int(length.group(1)):
                        break
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return str(json.loads(data.split(b"\r\n\r\n", 1)[1]).get("state", "no state"))
    except (OSError, IndexError, ValueError, AttributeError) as exc:
        return f"{sock}: {exc}"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


__all__ = ["CRI_NAMESPACE", "DAEMON_MODES", "FS_DRIVERS", "NYDUS_RS", "RECOVER_POLICIES", "CmdResult", "NydusImage",
           "Running", "SnapshotterConfig", "SnapshotterStack", "daemon_identity", "default_nydusd", "merge_settings",
           "nydus_rs_nydusd", "nydusd_config_template", "nydusd_rlimit_wrapper", "push_layout", "push_nydus_image",
           "reap_leftovers", "toml_text"]
