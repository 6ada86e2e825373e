"""Guest side of test_vm_snapshotter.py: the real nydus-snapshotter (containerd-nydus-grpc,
`fs_driver = "fscache"`, `recover_policy = "failover"`) under the real containerd 1.6, driving
fscached's `nydusd singleton` on the cachefiles path, with nerdctl (coldstart.snapshotter).

The registry is Debian's docker-registry on the guest's loopback (access log on: the bytes it
served of the data blob are counted), its storage a copy of what the host pushed (the image was
converted by fscached-image and pushed with skopeo there: the guest only serves it). All state
(the registry's, containerd's, the snapshotter's root, fscached's cache) is on the scratch disk.

Phases, in order (args "phases" picks some, for debugging), each timed; the first one that
raises ends the run (its error is recorded, the later ones are not run), then the stack is torn
down:
  start     the stack; the one nydusd the snapshotter started, its argv, its API's view
  run       nerdctl pull (bytes of the data blob fetched by then), `nerdctl images`,
            `ctr snapshots ls`, containers reading /etc/hello and /data/small, the EROFS mount
            the snapshotter made itself (fsid=), the daemon's own view (GET /api/v1/daemon)
  failover  a container streams the cold /data/big (MiB by MiB into sha256sum); 2 MiB into it,
            kill -9 of nydusd: the snapshotter restarts it (same argv, `--supervisor`), which
            takes over through the supervisor; the container's output and stderr, the bytes
            fetched before and after the kill
  again     the same on the cold /data/again, and the restarted nydusd is killed too, right
            after the supervisor gave it the state (the snapshotter logs "sends states"): in
            the middle of its takeover; the snapshotter fails over once more
  restart   a detached container reads 2 MiB of the cold /data/slow, then waits on a flag (a
            directory of the scratch disk bound into it); the snapshotter is stopped (SIGTERM)
            and started again (same nydusd: it reconnects); the flag is set, the container reads
            the rest: its sha256, its exit code, whether it ran across the restart; a new
            container
  upgrade   the same on the cold /data/upgrade, the snapshotter started again with another
            nydusd_path: a script that runs the same nydusd but whose `--version` names another
            Git Commit (a new build installed): the snapshotter hot-upgrades the live daemon
            (`--upgrade`, the next API socket, takeover, the old one told to exit, start, the
            images bound again)
  domain    the snapshotter started again with the real nydusd and `domain_id` in the nydusd
            config: a second image is pulled, run (bound in that domain, `domain_id=,fsid=`)
            and removed; the first one stays
  rmi       nerdctl rmi: images, snapshots, the EROFS mounts, the daemon's bound images after
The nydusd logs (the snapshotter deletes them with the daemon) are read before the stop: counts,
and every PUT/DELETE /api/v2/blobs fscached answered (its API's debug lines), in order. The
streaming readers write their progress (MiB read) to a file a thread samples: `times` has, in
seconds from the kill, the new process, its takeover done (its log line) and the reader moving
again.

args: registry_storage (a docker-registry storage directory), repo ("fsn/app:nydus"), blob (the
data blob's digest), files: {"hello", "small", "big", "again", "slow", "upgrade"} -> path in
the image, sizes_mib: {"big", "again", "slow", "upgrade"}, domain: {"repo", "domain_id",
"files": {"hello", "data"}}, phases, command_timeout.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from coldstart.registry import RegistryRunner
from coldstart.snapshotter import SnapshotterConfig, SnapshotterStack, nydusd_config_template
from scenarios.unix_http import UnixHTTPConnection
from vmharness.guest import scratch_dir

MIB = 1 << 20
PHASES = ("start", "run", "failover", "again", "restart", "upgrade", "domain", "rmi")
NEXT_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # what the "new build" says it is
NEXT_NYDUSD = """#!/bin/sh
# the same nydusd, presented as another build: the snapshotter hot-upgrades live daemons to it
case "$1" in
  --version|-V) {real} --version | sed 's/^Git Commit:.*/Git Commit: \\t{commit}/'; exit 0 ;;
esac
exec {real} "$@"
"""


def api_get(sock: Path | None, path: str) -> Any:
    if sock is None:
        return None
    conn = UnixHTTPConnection(sock, 60)
    try:
        conn.request("GET", path)
        body = conn.getresponse().read()
        return json.loads(body) if body else None
    finally:
        conn.close()


def wait_for(what: str, check: Callable[[], bool], timeout: float, step: float = 0.1) -> float:
    """Poll `check`; seconds it took; RuntimeError naming `what` when it is not true in time."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(step)
    return round(time.monotonic() - t0, 2)


def read_in_steps(path: str, steps: list[tuple[int, str]], pace: float = 0.0, progress: str | None = None) -> list[str]:
    """A busybox shell command reading `path` through one open fd, MiB by MiB, into sha256sum.
    `steps`: (up to MiB, shell run after that span); `progress`: a file the count of MiB read
    is written to after each one. A failed read says so on stderr and ends the reading (the
    digest is then wrong too)."""
    parts = ["exec 3<" + path, "{ i=0"]
    for end, after in steps:
        parts.append(f"while [ $i -lt {end} ]; do dd bs={MIB} count=1 <&3 2>/tmp/dd.err "
                     "|| { echo \"read failed at MiB $i: $(cat /tmp/dd.err)\" >&2; exit 1; }; "
                     f"i=$((i+1)); {f'echo $i > {progress}; ' if progress else ''}"
                     f"{'sleep ' + str(pace) + '; ' if pace else ''}done")
        if after:
            parts.append(after)
    return ["/bin/sh", "-c", "; ".join(parts) + "; } | sha256sum"]


def erofs_mounts(stack: SnapshotterStack) -> list[dict[str, Any]]:
    return [{"mountpoint": m.mountpoint, "source": m.source, "options": list(m.super_options)}
            for m in stack.mounts() if m.fstype == "erofs"]


def argv_of(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def api_socket(stack: SnapshotterStack) -> Path | None:
    """The live daemon's API socket (the newest: a hot upgrade moves to api1.sock), once it
    is there."""
    for pid in sorted(stack.nydusd_pids(), reverse=True):
        argv = argv_of(pid)
        if "--apisock" in argv and Path(argv[argv.index("--apisock") + 1]).exists():
            return Path(argv[argv.index("--apisock") + 1])
    return None


def tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Progress(threading.Thread):
    """Samples a reader's progress file (MiB read) every 20 ms: (time.monotonic(), value)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                value = int(self.path.read_text().strip() or -1)
            except (OSError, ValueError):
                continue
            if not self.samples or value != self.samples[-1][1]:
                self.samples.append((time.monotonic(), value))

    def moved_after(self, at: float) -> float | None:
        """Seconds from `at` to the first MiB completed after it (None: it never moved)."""
        before = max([v for t, v in self.samples if t <= at], default=-1)
        return next((round(t - at, 3) for t, v in self.samples if t > at and v > before), None)


def log_time(line: str) -> float:
    """A log line's timestamp (asctime, local time, ms) as time.time()."""
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000


def nydusd_log_lines(stack: SnapshotterStack) -> list[str]:
    return [line for p in sorted((stack.root / "logs").glob("*/nydusd.log*"), reverse=True)
            for line in p.read_text(errors="replace").splitlines()]


def blob_api_calls(stack: SnapshotterStack) -> list[str]:
    """Every PUT/DELETE /api/v2/blobs fscached answered, in order: "<method> <path> -> <status>"."""
    return [m.group(1) for line in nydusd_log_lines(stack)
            if (m := re.search(r" API ((?:PUT|DELETE) /api/v2/blobs\S* -> \d+)$", line))]


def takeover_done_after(stack: SnapshotterStack, wall: float) -> float | None:
    """Seconds from `wall` (time.time()) to the first takeover a daemon logged done after it."""
    times = [log_time(line) for line in nydusd_log_lines(stack) if "served again from the state" in line]
    return next((round(t - wall, 3) for t in sorted(times) if t >= wall), None)


def nydusd_log_counts(stack: SnapshotterStack) -> dict[str, int]:
    text = "\n".join(p.read_text(errors="replace") for p in sorted((stack.root / "logs").glob("*/nydusd.log*")))
    return {
        "lines": text.count("\n"),
        "took_state_at_start": len(re.findall(r"at start: took the state \(", text)),
        "takeovers": text.count("served again from the state"),
        "read_failed": len(re.findall(r"READ req=msg:\d+ .* failed: ", text)),
        "errors": len(re.findall(r" ERROR ", text)),
    }


def nydusd_errors(stack: SnapshotterStack) -> list[str]:
    lines = []
    for p in sorted((stack.root / "logs").glob("*/nydusd.log*")):
        lines += [line for line in p.read_text(errors="replace").splitlines() if " ERROR " in line]
    return lines[:40]


def run(args: dict[str, Any]) -> dict[str, Any]:
    scratch = scratch_dir()
    out: dict[str, Any] = {"phases": {}, "seconds": {}}
    t_all = time.monotonic()
    reg_dir = scratch / "reg"
    shutil.copytree(args["registry_storage"], reg_dir / "storage", symlinks=True)
    out["seconds"]["registry_copy"] = round(time.monotonic() - t_all, 2)
    files, sizes, blob = args["files"], args["sizes_mib"], args["blob"]
    flags = scratch / "flags"
    flags.mkdir()
    with RegistryRunner(reg_dir, access_log=True) as reg:
        ref = f"{reg.host}/{args['repo']}"
        out["ref"] = ref
        # the README's fscache setup as written (coldstart.readme.snapshotter_setup on the host):
        # its config.toml settings and nydusd config; the fscache driver runs one shared daemon
        config = SnapshotterConfig(**{"daemon_mode": "shared", **args["snapshotter"]})
        stack = SnapshotterStack(reg.host, config, workdir=scratch / "s", start_timeout=180,
                                 command_timeout=float(args.get("command_timeout", 600)))

        def fetched(since: int) -> int:
            return reg.blob_bytes_served(blob, since=since)

        def snapshotter_log_count(text: str) -> int:
            return stack.snapshotter_log().count(text)

        def streaming_kill(key: str, kill_again: bool) -> dict[str, Any]:
            """A container streams the cold file `key`; 2 MiB into it nydusd is killed (and its
            successor too, once the supervisor gave it the state, with kill_again)."""
            res: dict[str, Any] = {}
            mark = reg.log_size()
            started = flags / f"{key}-started"
            # 2 MiB in, the reader waits for the kill (else the read-ahead, ramping up to 64 MiB
            # ahead of a sequential reader, may have fetched the whole file first); its next
            # reads are then made while no daemon serves
            cmd = read_in_steps(files[key], [(2, f"touch /flag/{key}-started; "
                                              f"while [ ! -e /flag/{key}-go ]; do sleep 0.05; done"),
                                             (sizes[key], "")], pace=0.05, progress=f"/flag/{key}.progress")
            progress = Progress(flags / f"{key}.progress")
            progress.start()
            reader = stack.start_run(ref, cmd, extra=["-v", f"{flags}:/flag"])
            res["reader_in_after"] = wait_for("the reader 2 MiB into the cold file",
                                              lambda: started.exists() or reader.poll() is not None, 600)
            if reader.poll() is not None:
                r = reader.wait(check=False)
                raise RuntimeError(f"the reader ended before the kill: {r.returncode} {r.stderr[-500:]}")
            sends = snapshotter_log_count("sends states")
            killed = stack.kill_nydusd()
            t_kill, wall_kill = time.monotonic(), time.time()
            res["killed"] = killed
            res["fetched_at_kill"] = fetched(mark)
            (flags / f"{key}-go").touch()
            res["new_pid_after"] = wait_for("a new nydusd", lambda: bool(set(stack.nydusd_pids()) - set(killed)), 120)
            if kill_again:
                # the snapshotter's supervisor gave the new process the state: kill it now
                res["state_sent_after"] = wait_for("the supervisor sending the state",
                                                   lambda: snapshotter_log_count("sends states") > sends, 60, 0.02)
                second = sorted(set(stack.nydusd_pids()) - set(killed))
                res["api_answered_before_second_kill"] = _answers(stack)
                for pid in second:
                    os.kill(pid, signal.SIGKILL)
                res["killed_in_takeover"] = second
                killed = killed + second
                res["third_pid_after"] = wait_for("another nydusd",
                                                  lambda: bool(set(stack.nydusd_pids()) - set(killed)), 120)
            new_process = round(time.monotonic() - t_kill, 3)  # the (last) new process was there
            res["new_argv"] = argv_of(sorted(set(stack.nydusd_pids()) - set(killed))[0])
            result = reader.wait(timeout=1200, check=False)
            progress.done.set()
            res["reader_done_after_kill"] = round(time.monotonic() - t_kill, 2)
            # seconds from the (first) kill: the (last) new process seen, its takeover done, the reader's
            # next MiB
            res["times"] = {"new_process": new_process, "takeover": takeover_done_after(stack, wall_kill),
                            "moving": progress.moved_after(t_kill)}
            res["reader"] = {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr[-2000:]}
            res["fetched_after"] = fetched(mark)
            res["failovers_logged"] = snapshotter_log_count("Do failover for daemon")
            res["daemon"] = api_get(api_socket(stack), "/api/v1/daemon")
            res["hello_after"] = stack.run(ref, ["cat", files["hello"]]).stdout
            return res

        def restart_under_reader(key: str, new_config: SnapshotterConfig | None) -> dict[str, Any]:
            """A detached container reads 2 MiB of the cold file `key`, the snapshotter restarts
            (with `new_config`), the container reads the rest."""
            res: dict[str, Any] = {}
            result = flags / f"{key}.sha256"
            # 2 MiB in: what the read-ahead fetched around them is far from the file's end
            cmd = read_in_steps(files[key], [(2, f"touch /flag/{key}-in; "
                                              f"while [ ! -e /flag/{key}-go ]; do sleep 0.2; done"), (sizes[key], "")])
            cmd[-1] += f" > /flag/{key}.sha256"
            cid = stack.run(ref, cmd, detach=True, name=key, extra=["-v", f"{flags}:/flag"]).stdout.strip()
            res["in_after"] = wait_for("the detached reader 2 MiB into the file",
                                         lambda: (flags / f"{key}-in").exists(), 600)
            mark = reg.log_size()
            res["nydusd_before"] = {pid: argv_of(pid) for pid in stack.nydusd_pids()}
            res["blob_calls_before"] = len(blob_api_calls(stack))
            upgrades = snapshotter_log_count("Upgraded daemon success")
            t0, wall0 = time.monotonic(), time.time()
            stack.restart_snapshotter(new_config)
            res["restart_seconds"] = round(time.monotonic() - t0, 2)
            res["upgrade_logged"] = snapshotter_log_count("Upgraded daemon success") - upgrades
            res["takeover_after"] = takeover_done_after(stack, wall0)
            # a hot upgrade: the old process exits once the new one took over (not at once)
            res["one_nydusd_after"] = wait_for("one nydusd after the restart", lambda: len(stack.nydusd_pids()) == 1, 60)
            res["nydusd_after"] = {pid: argv_of(pid) for pid in stack.nydusd_pids()}
            tasks = stack.ctr("tasks", "ls").stdout
            res["running_after_restart"] = any(line.split()[:1] == [cid] and "RUNNING" in line
                                               for line in tasks.splitlines())
            res["tasks"] = tasks
            (flags / f"{key}-go").touch()
            res["exit_code"] = stack.nerdctl("wait", key, timeout=1200).stdout.strip()
            res["sha256"] = result.read_text().split()[0] if result.exists() and result.read_text().split() else None
            res["fetched_after_restart"] = fetched(mark)
            stack.nerdctl("rm", key)
            res["hello_after"] = stack.run(ref, ["cat", files["hello"]]).stdout
            res["daemon"] = api_get(api_socket(stack), "/api/v1/daemon")
            res["blob_calls_after"] = len(blob_api_calls(stack))
            return res

        def p_start() -> dict[str, Any]:
            stack.start()
            res: dict[str, Any] = {"stack_start": round(stack.timings["start"], 2)}
            res["socket_after"] = wait_for("nydusd's API socket", lambda: api_socket(stack) is not None, 120)
            pids = stack.nydusd_pids()
            res["nydusd_pids"] = pids
            res["argv"] = argv_of(pids[0]) if pids else []
            res["root"] = str(stack.root)
            sock = api_socket(stack)
            res["socket_mode"] = oct(os.stat(sock).st_mode & 0o777) if sock is not None else None
            res["daemon"] = api_get(sock, "/api/v1/daemon")
            res["snapshotter_toml"] = stack.snapshotter_toml.read_text()
            res["nydusd_json"] = stack.nydusd_json.read_text()
            return res

        def p_run() -> dict[str, Any]:
            res: dict[str, Any] = {}
            mark = reg.log_size()
            res["pull_seconds"] = round(stack.pull(ref).seconds, 2)
            res["fetched_by_pull"] = fetched(mark)
            res["images"] = stack.images()
            res["snapshots"] = stack.snapshots()
            hello = stack.run(ref, ["cat", files["hello"]])
            res["hello"] = hello.stdout
            res["hello_seconds"] = round(hello.seconds, 2)
            res["fetched_after_hello"] = fetched(mark)
            small = stack.run(ref, ["sha256sum", files["small"]])
            res["small_sha256"] = small.stdout.split()[0] if small.stdout.split() else small.stdout
            res["erofs"] = erofs_mounts(stack)
            res["snapshot_dirs"] = sorted(p.name for p in (stack.root / "snapshots").iterdir())
            res["daemon"] = api_get(api_socket(stack), "/api/v1/daemon")
            return res

        def p_upgrade() -> dict[str, Any]:
            real = stack.config.nydusd
            script = scratch / "nydusd-next"
            script.write_text(NEXT_NYDUSD.format(real=real, commit=NEXT_COMMIT))
            script.chmod(0o755)
            new = dataclasses.replace(config, nydusd_path=script)
            res = restart_under_reader("upgrade", new)
            res["upgrade_failed"] = [line[-400:] for line in stack.snapshotter_log().splitlines()
                                     if "hot upgrade failed" in line]
            return res

        def p_domain() -> dict[str, Any]:
            dom = args["domain"]
            template = {**(config.nydusd_config or nydusd_config_template("fscache")), "domain_id": dom["domain_id"]}
            new = dataclasses.replace(config, nydusd_config=template)  # the real nydusd again: no upgrade
            res: dict[str, Any] = {"nydusd_before": {pid: argv_of(pid) for pid in stack.nydusd_pids()}}
            stack.restart_snapshotter(new)
            res["nydusd_after"] = {pid: argv_of(pid) for pid in stack.nydusd_pids()}
            res["blob_calls_before"] = len(blob_api_calls(stack))
            other = f"{reg.host}/{dom['repo']}"
            stack.pull(other)
            res["hello"] = stack.run(other, ["cat", dom["files"]["hello"]]).stdout
            data = stack.run(other, ["sha256sum", dom["files"]["data"]]).stdout.split()
            res["data_sha256"] = data[0] if data else None
            res["erofs"] = erofs_mounts(stack)
            res["daemon"] = api_get(api_socket(stack), "/api/v1/daemon")
            stack.rmi(other)
            res["images_after_rmi"] = stack.images()
            res["erofs_after_rmi"] = erofs_mounts(stack)
            res["daemon_after_rmi"] = api_get(api_socket(stack), "/api/v1/daemon")
            res["blob_calls_after"] = len(blob_api_calls(stack))
            return res

        def p_rmi() -> dict[str, Any]:
            res: dict[str, Any] = {"erofs_before": erofs_mounts(stack), "blob_calls_before": len(blob_api_calls(stack))}
            stack.rmi(ref)
            res["images"] = stack.images()
            try:
                res["snapshots_gone_after"] = wait_for("the snapshots removed", lambda: stack.snapshots() == [], 60, 0.5)
            except RuntimeError as exc:
                res["snapshots_error"] = str(exc)
            res["snapshots"] = stack.snapshots()
            res["erofs_after"] = erofs_mounts(stack)
            res["mounts_after"] = [m.mountpoint for m in stack.mounts(referencing=True)]
            res["nydusd_pids"] = stack.nydusd_pids()
            res["daemon"] = api_get(api_socket(stack), "/api/v1/daemon")
            return res

        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "start": p_start, "run": p_run,
            "failover": lambda: streaming_kill("big", kill_again=False),
            "again": lambda: streaming_kill("again", kill_again=True),
            "restart": lambda: restart_under_reader("slow", None),
            "upgrade": p_upgrade, "domain": p_domain, "rmi": p_rmi}
        phase = "start"
        try:
            for phase in args.get("phases", PHASES):
                t0 = time.monotonic()
                try:
                    out["phases"][phase] = steps[phase]()
                finally:
                    out["seconds"][phase] = round(time.monotonic() - t0, 2)
                print(f"snapshotter_fscache: phase {phase} done in {out['seconds'][phase]} s", flush=True)
        except Exception as exc:  # recorded for the host, which fails naming the phase
            out["error"] = {"phase": phase, "message": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()}
            print(out["error"]["traceback"], flush=True)
        finally:
            out["api_blob_calls"] = blob_api_calls(stack)
            out["nydusd_log_counts"] = nydusd_log_counts(stack)
            out["nydusd_errors"] = nydusd_errors(stack)
            out["logs"] = collect_logs(stack)
            t0 = time.monotonic()
            stack.stop()
            out["seconds"]["stop"] = round(time.monotonic() - t0, 2)
            out["left_after_stop"] = {"namespace_pids": stack.namespace_pids(), "root_pids": stack.root_pids(),
                                      "mounts": [m for m in _mountpoints() if m.startswith(str(scratch / "s"))],
                                      "api_sockets": [str(p) for p in (stack.root / "socket").glob("*/api*.sock")]}
    out["seconds"]["total"] = round(time.monotonic() - t_all, 2)
    return out


def _answers(stack: SnapshotterStack) -> bool:
    """Whether a nydusd answers on its API socket within 0.2 s (a restarted one in its
    imports does not: the request waits in the backlog)."""
    sock = api_socket(stack)
    if sock is None:
        return False
    conn = UnixHTTPConnection(sock, 60)
    conn.timeout = 0.2
    try:
        conn.request("GET", "/api/v1/daemon")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _mountpoints() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def collect_logs(stack: SnapshotterStack) -> dict[str, str]:
    logs = {"snapshotter": stack.snapshotter_log()[-16000:], "nydusd": stack.nydusd_logs()[-16000:],
            "containerd": tail(stack.containerd.log_path)}
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, errors="replace")
    logs["dmesg"] = dmesg.stdout[-4000:]
    return logs
