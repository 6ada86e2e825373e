"""fscached's `nydusd fuse` under the real nydus-snapshotter and containerd, through nerdctl:
a nydus image converted by fscached-image runs with the right output in both daemon modes, its
data is fetched lazily, and removing the image unmounts everything it mounted."""
from __future__ import annotations

from typing import Callable

import pytest

from coldstart.snapshotter import SnapshotterConfig, SnapshotterStack

from registry_server import RegistryServer
from snaphelpers import AppImage, wait_for

pytestmark = pytest.mark.root


@pytest.mark.parametrize("daemon_mode", ["dedicated", "shared"])
def test_nerdctl_run_reads_the_image(stacks: Callable[..., SnapshotterStack], app_image: AppImage,
                                     daemon_mode: str) -> None:
    stack = stacks(SnapshotterConfig(daemon_mode=daemon_mode))
    stack.pull(app_image.ref)
    hello = stack.run(app_image.ref, ["cat", "/etc/hello"])
    assert hello.stdout.encode() == app_image.hello, hello.stderr
    digest = stack.run(app_image.ref, ["sha256sum", "/data/big"])
    assert digest.stdout.split()[0] == app_image.big_sha256, digest.stderr
    erofs = [m for m in stack.mounts() if m.fstype == "erofs"]
    assert len(erofs) == 1, f"one image, one EROFS mount under the root: {stack.mounts()}"
    where = "mnt/" if daemon_mode == "shared" else "snapshots/"
    assert erofs[0].mountpoint.startswith(f"{stack.root}/{where}"), erofs[0]


def test_reads_are_lazy(stacks: Callable[..., SnapshotterStack], app_image: AppImage,
                        snap_registry: RegistryServer) -> None:
    """A small file costs a small part of the blob (its chunks, busybox's and the read-ahead
    around them); the big file then comes through the same registry (the count is real), and no
    byte is fetched twice."""
    stack = stacks(SnapshotterConfig(daemon_mode="shared"))
    mark = snap_registry.log_size()
    stack.pull(app_image.ref)
    assert snap_registry.blob_bytes_served(app_image.blob, since=mark) == 0, "the pull fetched the data blob"
    hello = stack.run(app_image.ref, ["cat", "/etc/hello"])
    assert hello.stdout.encode() == app_image.hello, hello.stderr
    small = snap_registry.blob_bytes_served(app_image.blob, since=mark)
    assert 0 < small < app_image.blob_size // 2, \
        f"cat /etc/hello fetched {small} of the blob's {app_image.blob_size} bytes"
    digest = stack.run(app_image.ref, ["sha256sum", "/data/big"])
    assert digest.stdout.split()[0] == app_image.big_sha256, digest.stderr
    total = snap_registry.blob_bytes_served(app_image.blob, since=mark)
    assert total >= app_image.big_bytes, f"all of /data/big was read, {total} bytes of the blob fetched"
    assert total <= app_image.blob_size * 1.05, f"{total} bytes fetched of a {app_image.blob_size}-byte blob"


@pytest.mark.parametrize("daemon_mode", ["dedicated", "shared"])
def test_rmi_unmounts_cleanly(stacks: Callable[..., SnapshotterStack], app_image: AppImage,
                              daemon_mode: str) -> None:
    stack = stacks(SnapshotterConfig(daemon_mode=daemon_mode))
    stack.pull(app_image.ref)
    assert stack.run(app_image.ref, ["cat", "/etc/hello"]).stdout.encode() == app_image.hello
    daemons = stack.nydusd_pids()
    assert len(daemons) == 1, f"one nydusd: {daemons}"
    assert any(m.fstype == "erofs" for m in stack.mounts()), stack.mounts()
    stack.rmi(app_image.ref)
    assert stack.images() == []
    wait_for("the nydus snapshots removed", lambda: stack.snapshots() == [])
    wait_for("every mount under the snapshotter's root gone", lambda: stack.mounts(referencing=True) == [])
    if daemon_mode == "dedicated":
        wait_for("the image's nydusd (and anything it started) exited", lambda: stack.root_pids() == [])
    else:
        assert stack.nydusd_pids() == daemons, "the shared nydusd serves on with no image"
    # the node can take the image again
    stack.pull(app_image.ref)
    assert stack.run(app_image.ref, ["cat", "/etc/hello"]).stdout.encode() == app_image.hello
