"""The snapshotter harness itself (coldstart.snapshotter), with a plain OCI image (the busybox
sandbox image: no nydusd involved): nerdctl and CRI containers start, the machine's containerd
is never touched, the stack starts and stops in seconds, and a stack whose owner was killed is
reaped by the next one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from coldstart.snapshotter import SnapshotterConfig, SnapshotterStack, reap_leftovers

from registry_server import RegistryServer

pytestmark = pytest.mark.root

MACHINE_PATHS = [Path("/run/containerd"), Path("/var/lib/containerd"), Path("/var/lib/nerdctl"),
                 Path("/etc/cni"), Path("/var/log/pods")]
START_SECONDS = 10
STOP_SECONDS = 15


def test_plain_image_through_nerdctl_and_cri_leaves_the_machine_alone(stacks: Callable[..., SnapshotterStack],
                                                                     snap_registry: RegistryServer) -> None:
    before = {p: p.exists() for p in MACHINE_PATHS}
    stack = stacks(SnapshotterConfig())
    assert stack.timings["start"] < START_SECONDS, stack.timings
    image = stack.push_sandbox_image()
    stack.pull(image)
    # its entrypoint is `/bin/sleep infinity`: a command replaces only the arguments
    assert stack.run(image, ["0"], extra=["--entrypoint", "/bin/sleep"], timeout=60).returncode == 0
    cid = stack.run(image, [], detach=True, name="idle", timeout=60).stdout.strip()
    assert stack.nerdctl("ps", "-q").stdout.split() == [cid[:12]]
    pod = stack.run_pod()
    assert pod in stack.crictl("pods", "-q").stdout.split()
    assert stack.cgroups(), "runc made no cgroup of our names: where did the containers go?"
    assert stack.nydusd_pids() == [], "a plain image needs no nydusd"
    stack.stop()
    assert stack.timings["stop"] < STOP_SECONDS, stack.timings
    assert {p: p.exists() for p in MACHINE_PATHS} == before


CHILD = """
import sys, time
from coldstart.snapshotter import SnapshotterStack
stack = SnapshotterStack(sys.argv[1]).start()
image = stack.push_sandbox_image()
stack.pull(image)
stack.run(image, [], detach=True)
print(stack.workdir, stack.namespace, flush=True)
time.sleep(1000)
"""


def test_a_killed_owners_stack_is_reaped(snap_host: None, snap_registry: RegistryServer) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, snap_registry.host], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    guard = threading.Timer(120, child.kill)  # a child that never says it started: EOF below
    guard.start()
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        guard.cancel()
        if len(line) != 2:
            child.kill()
            pytest.fail(f"the child's stack did not start: {child.communicate(timeout=30)[1][-800:]}")
        workdir, namespace = Path(line[0]), line[1]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        needle = os.fsencode(workdir) + b"/"
        left = [p for p in _pids() if needle in _cmdline(p)]
        assert left, "the killed owner's containerd is gone already: nothing to reap"
        assert list(Path("/sys/fs/cgroup").glob(f"*/{namespace}")), "no container cgroup to reap"
        assert workdir in reap_leftovers()
        time.sleep(0.2)
        assert [p for p in _pids() if needle in _cmdline(p)] == []
        assert list(Path("/sys/fs/cgroup").glob(f"*/{namespace}*")) == []
        assert not workdir.exists()
    finally:
        guard.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
        reap_leftovers()


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
