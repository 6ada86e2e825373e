"""The README's nydus-snapshotter section, run as written: its snapshotter config.toml, nydusd
daemon config and containerd entries for the fusedev driver start the real snapshotter under
containerd, and its commands (nerdctl run, crictl pull) work with fscached's `nydusd`. Only
what names the machine moves: the paths (root, socket, nydusd_path, the daemon config's file)
go under the test's own stack, and the registry's scheme is http (the test registry)."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

import pytest

from coldstart.snapshotter import SnapshotterConfig, SnapshotterStack

from snaphelpers import AppImage

pytestmark = pytest.mark.root

README = Path(__file__).resolve().parents[2] / "README.md"
FUSEDEV_TOML = "# /etc/nydus/config.toml (nydus-snapshotter, fusedev over fanotify)"
FUSEDEV_JSON = "`/etc/nydus/nydusd-config.fusedev.json`"
CONTAINERD_TOML = "# /etc/containerd/config.toml"
MACHINE_KEYS = ("root", "address")  # the snapshotter's paths on a node
MACHINE_DAEMON_KEYS = ("nydusd_path", "nydusd_config")


def readme_blocks() -> list[tuple[str, str]]:
    """(the line before the block, the block's text) for every fenced block of the README."""
    text = README.read_text()
    return [(m.group(1), m.group(2)) for m in re.finditer(r"([^\n]*)\n\n?```[a-z]*\n(.*?)```", text, re.S)]


def block_starting(first_line: str) -> str:
    found = [body for _, body in readme_blocks() if body.startswith(first_line)]
    assert len(found) == 1, f"the README has {len(found)} blocks starting {first_line!r}"
    return found[0]


def block_after(said: str) -> str:
    text = README.read_text()
    at = text.index(said)
    match = re.compile(r"```[a-z]*\n(.*?)```", re.S).search(text, at)
    assert match is not None, f"no block after {said!r} in the README"
    return match.group(1)


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_readme_fusedev_setup_runs_containers(stacks: Callable[..., SnapshotterStack],
                                                  app_image: AppImage) -> None:
    settings = tomllib.loads(block_starting(FUSEDEV_TOML))
    nydusd_config = json.loads(block_after(FUSEDEV_JSON))
    containerd = tomllib.loads(block_starting(CONTAINERD_TOML))
    # the README's pieces fit each other: containerd talks to the socket the snapshotter serves
    assert containerd["proxy_plugins"]["nydus"]["address"] == settings["address"]
    assert containerd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "nydus"

    for key in MACHINE_KEYS:
        settings.pop(key)
    daemon = settings["daemon"]
    for key in MACHINE_DAEMON_KEYS:
        daemon.pop(key)
    nydusd_config["device"]["backend"]["config"]["scheme"] = "http"
    config = SnapshotterConfig(fs_driver=daemon.pop("fs_driver"), daemon_mode=settings.pop("daemon_mode"),
                               recover_policy=daemon.pop("recover_policy"), nydusd_config=nydusd_config,
                               settings=settings)
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
