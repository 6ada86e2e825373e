"""fscached's `nydusd fuse` killed with -9 under the real nydus-snapshotter: with
recover_policy = "failover" a container streaming a cold file reads on through the takeover (no
EIO, the right sha256); with "restart" the restarted daemon serves new containers, and in shared
mode the snapshotter's replayed mount is not stacked on the one still there."""
from __future__ import annotations

from typing import Callable

import pytest

from coldstart.snapshotter import SnapshotterConfig, SnapshotterStack, container_stderr

from registry_server import RegistryServer
from snaphelpers import AppImage, wait_for

pytestmark = pytest.mark.root

MIB = 1 << 20
PACE = 0.2  # s between two MiB read by the streaming reader: the file takes ~5 s to read


def streaming_reader(mib: int) -> list[str]:
    """A busybox shell command: /data/big one MiB at a time, PACE s apart, piped into sha256sum;
    a failed read is reported on stderr (and spoils the digest)."""
    loop = (f"i=0; while [ $i -lt {mib} ]; do "
            f"dd if=/data/big bs={MIB} skip=$i count=1 2>/tmp/dd.err || {{ cat /tmp/dd.err >&2; exit 1; }}; "
            f"i=$((i+1)); sleep {PACE}; done | sha256sum")
    return ["/bin/sh", "-c", loop]


@pytest.mark.parametrize("daemon_mode", ["shared", "dedicated"])
def test_failover_under_a_streaming_reader(stacks: Callable[..., SnapshotterStack], app_image: AppImage,
                                           snap_registry: RegistryServer, daemon_mode: str) -> None:
    stack = stacks(SnapshotterConfig(daemon_mode=daemon_mode, recover_policy="failover"))
    stack.pull(app_image.ref)
    assert stack.run(app_image.ref, ["cat", "/etc/hello"]).stdout.encode() == app_image.hello
    mark = snap_registry.log_size()

    def fetched() -> int:
        return snap_registry.blob_bytes_served(app_image.blob, since=mark)

    reader = stack.start_run(app_image.ref, streaming_reader(app_image.big_bytes // MIB))
    wait_for("the reader in the cold file (2 MiB fetched)", lambda: fetched() >= 2 * MIB or reader.poll() is not None,
             60)
    assert reader.poll() is None, f"the reader ended before the kill: {reader.wait(check=False)}"
    killed = stack.kill_nydusd()
    assert len(killed) == 1, f"one nydusd to kill: {killed}"
    at_kill = fetched()
    assert at_kill < app_image.big_bytes - 4 * MIB, f"the file was (nearly) all fetched before the kill: {at_kill}"
    wait_for("a new nydusd taking over", lambda: bool(set(stack.nydusd_pids()) - set(killed)), 30)
    result = reader.wait(timeout=120, check=False)
    assert result.returncode == 0 and container_stderr(result.stderr) == "", f"the reader failed: {result.stderr[-500:]}"
    assert result.stdout.split()[0] == app_image.big_sha256, "wrong bytes read across the failover"
    after = fetched()
    assert after > at_kill, "the new daemon fetched nothing: where did the rest of the file come from?"
    # and the node goes on: a new container of the image
    assert stack.run(app_image.ref, ["cat", "/etc/hello"]).stdout.encode() == app_image.hello


@pytest.mark.parametrize("daemon_mode", ["shared", "dedicated"])
def test_restart_serves_new_containers(stacks: Callable[..., SnapshotterStack], app_image: AppImage,
                                       daemon_mode: str) -> None:
    stack = stacks(SnapshotterConfig(daemon_mode=daemon_mode, recover_policy="restart"))
    stack.pull(app_image.ref)
    assert stack.run(app_image.ref, ["cat", "/etc/hello"]).stdout.encode() == app_image.hello
    killed = stack.kill_nydusd()
    assert len(killed) == 1, f"one nydusd to kill: {killed}"
    wait_for("a restarted nydusd", lambda: bool(set(stack.nydusd_pids()) - set(killed)), 30)
    digest = stack.run(app_image.ref, ["sha256sum", "/data/big"])
    assert digest.stdout.split()[0] == app_image.big_sha256, digest.stderr
    assert stack.run(app_image.ref, ["cat", "/etc/hello"]).stdout.encode() == app_image.hello
    erofs = [m.mountpoint for m in stack.mounts() if m.fstype == "erofs"]
    assert len(erofs) == len(set(erofs)) == 1, f"one image, one EROFS mount (none stacked): {erofs}"


def test_snapshotter_restart_keeps_the_daemon(stacks: Callable[..., SnapshotterStack], app_image: AppImage) -> None:
    """The snapshotter restarted under a live shared daemon (with failover): it reconnects to it
    (same `Git Commit` from `nydusd --version`: no hot upgrade), a running container reads on and
    a new one starts."""
    stack = stacks(SnapshotterConfig(daemon_mode="shared", recover_policy="failover"))
    stack.pull(app_image.ref)
    stack.run(app_image.ref, ["sleep", "1000"], detach=True, name="idle")
    daemons = stack.nydusd_pids()
    assert len(daemons) == 1, daemons
    stack.restart_snapshotter()
    assert stack.nydusd_pids() == daemons, "the live daemon was replaced (an upgrade?) or lost"
    read = stack.nerdctl("exec", "idle", "sha256sum", "/data/big")
    assert read.stdout.split()[0] == app_image.big_sha256, read.stderr
    assert stack.run(app_image.ref, ["cat", "/etc/hello"]).stdout.encode() == app_image.hello
    assert stack.nydusd_pids() == daemons
