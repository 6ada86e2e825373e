"""The README's nydus-snapshotter section, run as written: its snapshotter config.toml, nydusd
daemon config and containerd entries for the fusedev driver start the real snapshotter under
containerd, and its commands (nerdctl run, crictl pull) work with fscached's `nydusd`. Only
what names the machine moves: the paths (root, socket, nydusd_path, the daemon config's file)
go under the test's own stack, and the registry's scheme is http (the test registry)."""
from __future__ import annotations

import json
import tomllib
from typing import Callable

import pytest

from coldstart.readme import (CONTAINERD_TOML, FUSEDEV_JSON, FUSEDEV_TOML, MACHINE_DAEMON_KEYS, MACHINE_KEYS,
                              block_starting, flatten, snapshotter_setup)
from coldstart.snapshotter import SnapshotterConfig, SnapshotterStack

from snaphelpers import AppImage

pytestmark = pytest.mark.root


def test_the_readme_fusedev_setup_runs_containers(stacks: Callable[..., SnapshotterStack],
                                                  app_image: AppImage) -> None:
    containerd = tomllib.loads(block_starting(CONTAINERD_TOML))
    # the README's pieces fit each other: containerd talks to the socket the snapshotter serves
    assert containerd["proxy_plugins"]["nydus"]["address"] == tomllib.loads(block_starting(FUSEDEV_TOML))["address"]
    assert containerd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "nydus"
    setup = snapshotter_setup(FUSEDEV_TOML, FUSEDEV_JSON)
    nydusd_config = setup["nydusd_config"]
    config = SnapshotterConfig(**setup)
    assert config.fs_driver == "fusedev"
    stack = stacks(config)

    # what the snapshotter and containerd run with holds every setting the README gives
    written = flatten(tomllib.loads(stack.snapshotter_toml.read_text()))
    readme = flatten(tomllib.loads(block_starting(FUSEDEV_TOML)))
    for key, value in readme.items():
        if key.split(".")[-1] not in (*MACHINE_KEYS, *MACHINE_DAEMON_KEYS):
            assert written.get(key) == value, (key, written.get(key), value)
    assert json.loads(stack.nydusd_json.read_text()) == nydusd_config
    running = flatten(tomllib.loads(stack.containerd.config_text()))
    for key, value in flatten(containerd).items():
        if not key.endswith(".address"):
            assert running.get(key) == value, (key, running.get(key), value)
    assert running["proxy_plugins.nydus.address"] == str(stack.snapshotter_socket)

    # the README's commands: nerdctl run through the snapshotter, crictl pull for Kubernetes
    hello = stack.run(app_image.ref, ["cat", "/etc/hello"])
    assert hello.stdout.encode() == app_image.hello, hello.stderr
    assert "--snapshotter" in hello.args and "nydus" in hello.args
    erofs = [m for m in stack.mounts() if m.fstype == "erofs"]
    assert len(erofs) == 1 and erofs[0].mountpoint.startswith(f"{stack.root}/mnt/"), stack.mounts()
    pulled = stack.crictl("pull", app_image.ref)
    assert "Image is up to date" in pulled.stdout, pulled.stdout
    assert stack.nydusd_pids(), "the shared nydusd serves on"
