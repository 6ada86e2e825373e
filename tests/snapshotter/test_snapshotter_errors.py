"""What the snapshotter harness and fscached's `nydusd` say when a node is set up wrong: one
clear line, and nothing left behind."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from coldstart import ColdstartError
from coldstart.snapshotter import SnapshotterConfig, SnapshotterStack

from registry_server import RegistryServer
from snaphelpers import AppImage

pytestmark = pytest.mark.root


def test_fscache_driver_without_cachefiles_on_demand(stacks: Callable[..., SnapshotterStack],
                                                     app_image: AppImage) -> None:
    """fs_driver = "fscache" on a kernel without cachefiles on-demand (this project's host: the
    fanotify path): the snapshotter checks nothing and swallows the failure, so nerdctl only
    says the API socket is missing; nydusd must have said why, and the harness's one-line
    error carries it."""
    if Path("/dev/cachefiles").exists():
        pytest.fail("this test needs a kernel without /dev/cachefiles (the project's host kernel: "
                    "no CONFIG_CACHEFILES_ONDEMAND); here the fscache driver could be served")
    stack = stacks(SnapshotterConfig(fs_driver="fscache"))
    stack.pull(app_image.ref)
    with pytest.raises(ColdstartError) as failed:
        stack.run(app_image.ref, ["cat", "/etc/hello"])
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"nerdctl run {app_image.ref}"), message
    assert "/dev/cachefiles" in message, f"the error does not carry nydusd's reason: {message}"


def test_unknown_backend_type_is_named(stacks: Callable[..., SnapshotterStack], app_image: AppImage) -> None:
    """A nydusd config whose backend fscached has no source for (nydusd's "oss"): the daemon
    refuses to start and names it; the run fails in one line."""
    config = {"device": {"backend": {"type": "oss", "config": {"endpoint": "127.0.0.1:9", "bucket_name": "b"}},
                         "cache": {"type": "blobcache"}},
              "mode": "direct", "digest_validate": False, "enable_xattr": True, "fs_prefetch": {"enable": False}}
    stack = stacks(SnapshotterConfig(nydusd_config=config))
    stack.pull(app_image.ref)
    with pytest.raises(ColdstartError) as failed:
        stack.run(app_image.ref, ["cat", "/etc/hello"])
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"nerdctl run {app_image.ref}"), message
    assert "oss" in message, f"the error does not carry nydusd's reason (the backend type): {message}"


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("fs_driver", "virtiofs", "fusedev, fscache"),
    ("daemon_mode", "multiple", "dedicated, shared"),
    ("recover_policy", "always", "none, restart, failover"),
])
def test_config_checked_before_anything_starts(name: str, value: str, allowed: str) -> None:
    with pytest.raises(ColdstartError) as failed:
        SnapshotterStack("127.0.0.1:1", SnapshotterConfig(**{name: value}))  # type: ignore[arg-type]
    assert str(failed.value) == f"snapshotter config: {name} {value!r} is not one of {allowed}"


def test_a_config_the_snapshotter_refuses_fails_the_start(snap_registry: RegistryServer) -> None:
    """A nydusd config without `device`: containerd-nydus-grpc exits at start; the stack says so
    in one line with the snapshotter's own reason, and leaves nothing behind."""
    stack = SnapshotterStack(snap_registry.host, SnapshotterConfig(nydusd_config={"mode": "direct"}))
    with pytest.raises(ColdstartError) as failed:
        stack.start()
    message = str(failed.value)
    assert "\n" not in message and message.startswith("containerd-nydus-grpc exited 1 at start"), message
    assert "invalid fuse daemon configuration" in message, message
    assert not stack.workdir.exists() and stack.namespace_pids() == [] and stack.cgroups() == []
