"""Fixtures for the tests of fscached's `nydusd` under the real nydus-snapshotter
(coldstart.snapshotter.SnapshotterStack), on the host kernel.

  snap_host      session: root, the tools, the peers (containerd-nydus-grpc, nerdctl, crictl:
                 built by coldstart.peers when missing), busybox-static (coldstart.busybox) and a
                 /var/tmp that takes fanotify pre-content marks; anything missing FAILS the test
  snap_registry  session: Debian's docker-registry with its access log (bytes served per blob)
  app_image      session: a busybox image with /etc/hello and a 24 MiB incompressible /data/big,
                 converted by fscached-image and pushed as <registry>/snap/app:nydus
  stacks         a factory: stacks(SnapshotterConfig(...)) -> a started SnapshotterStack (nerdctl
                 calls time out after COMMAND_TIMEOUT); after the test, pass or fail, each is
                 stopped and checked gone: no process left in its mount namespace, no nydusd or
                 keeper, no cgroup of its names, its workdir removed
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from coldstart import ColdstartError
from coldstart.snapshotter import SnapshotterConfig, SnapshotterStack, push_nydus_image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: registry_server
sys.path.insert(0, str(Path(__file__).resolve().parent))  # snaphelpers

from registry_server import RegistryServer
from snaphelpers import AppImage

TOOLS = ("containerd", "ctr", "runc", "unshare", "nsenter", "skopeo", "docker-registry", "apt-get", "dpkg-deb")
PEERS = ("containerd-nydus-grpc", "nerdctl", "crictl")
HELLO = b"hello from fscached under nydus-snapshotter\n"
BIG_BYTES = 24 << 20
COMMAND_TIMEOUT = 120  # s for one nerdctl call in a test (a daemon that never answers costs 5 min)
APPLETS = ("sh", "cat", "sleep", "sha256sum", "dd", "ls", "head", "echo", "true")


@pytest.fixture(scope="session")
def snap_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (mount namespaces, mounts, containerd): make test runs as root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (make deps installs them)")
    from coldstart.peers import PeerError, install

    for name in PEERS:
        try:
            install(name)  # cached after the first build
        except PeerError as exc:
            pytest.fail(f"peer {name}: {exc}")
    from fanotify.group import probe

    reason = probe(Path("/var/tmp"))
    if reason is not None:
        pytest.fail(f"fscached's nydusd fuse needs fanotify pre-content events on /var/tmp: {reason}")
    from coldstart.busybox import busybox_binary

    try:
        busybox_binary()
    except ColdstartError as exc:
        pytest.fail(f"busybox-static: {exc}")


@pytest.fixture(scope="session")
def snap_registry(snap_host: None) -> Iterator[RegistryServer]:
    work = Path(tempfile.mkdtemp(prefix="fsn-reg-", dir="/var/tmp"))
    try:
        with RegistryServer(work) as reg:
            yield reg
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def app_image(snap_registry: RegistryServer) -> Iterator[AppImage]:
    from coldstart.busybox import busybox_rootfs

    work = Path(tempfile.mkdtemp(prefix="fsn-img-", dir="/var/tmp"))
    try:
        big = random.Random(20261207).randbytes(BIG_BYTES)
        rootfs = busybox_rootfs(work / "rootfs", {"etc/hello": HELLO, "data/big": big}, applets=APPLETS)
        image = push_nydus_image(rootfs, work / "out", f"{snap_registry.host}/snap/app:nydus")
        if len(image.blobs) != 1:
            pytest.fail(f"fscached-image made {len(image.blobs)} data blobs of the test image, not one")
        yield AppImage(image, HELLO, hashlib.sha256(big).hexdigest(), len(big))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def stacks(snap_registry: RegistryServer) -> Iterator[Callable[..., SnapshotterStack]]:
    started: list[SnapshotterStack] = []

    def start(config: SnapshotterConfig | None = None, **kwargs: object) -> SnapshotterStack:
        kwargs.setdefault("command_timeout", COMMAND_TIMEOUT)
        stack = SnapshotterStack(snap_registry.host, config, **kwargs)  # type: ignore[arg-type]
        started.append(stack)
        return stack.start()

    yield start
    problems = []
    for stack in started:
        stack.stop()
        left = {
            "processes in its mount namespace": stack.namespace_pids(),
            "nydusd or its keepers": stack.root_pids(),
            "cgroups": [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{stack.namespace}*")],
            "workdir": [str(stack.workdir)] if stack.workdir.exists() else [],
        }
        problems += [f"{what}: {found}" for what, found in left.items() if found]
    assert not problems, f"teardown left: {'; '.join(problems)}"
