"""The README's configuration blocks, read as a user copies them: the tests run the README's
nydus-snapshotter setups as written (tests/snapshotter/test_readme_configs.py on the host's
fusedev driver, vm-tests/test_vm_snapshotter.py with the fscache driver in the guests). Only what
names the machine moves: the snapshotter's paths go under the test's stack and the registry is
plain http (the test registry)."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"
# the first lines (or the line before) of the blocks, as the README writes them
FUSEDEV_TOML = "# /etc/nydus/config.toml (nydus-snapshotter, fusedev over fanotify)"
FUSEDEV_JSON = "`/etc/nydus/nydusd-config.fusedev.json`"
FSCACHE_TOML = "# /etc/nydus/config.toml (nydus-snapshotter, fscache)"
FSCACHE_JSON = "`/etc/nydus/nydusd-config.fscache.json`"
CONTAINERD_TOML = "# /etc/containerd/config.toml"
MACHINE_KEYS = ("root", "address")  # the snapshotter's paths on a node
MACHINE_DAEMON_KEYS = ("nydusd_path", "nydusd_config")


class ReadmeError(Exception):
    """The README does not hold the block a test runs (one line: which and why)."""


def readme_blocks() -> list[tuple[str, str]]:
    """(the line before the block, the block's text) for every fenced block of the README."""
    text = README.read_text()
    return [(m.group(1), m.group(2)) for m in re.finditer(r"([^\n]*)\n\n?```[a-z]*\n(.*?)```", text, re.S)]


def block_starting(first_line: str) -> str:
    found = [body for _, body in readme_blocks() if body.startswith(first_line)]
    if len(found) != 1:
        raise ReadmeError(f"the README has {len(found)} blocks starting {first_line!r}, not one")
    return found[0]


def block_after(said: str) -> str:
    text = README.read_text()
    at = text.find(said)
    match = re.compile(r"```[a-z]*\n(.*?)```", re.S).search(text, at) if at >= 0 else None
    if match is None:
        raise ReadmeError(f"no block after {said!r} in the README")
    return match.group(1)


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def snapshotter_setup(toml_marker: str, json_marker: str) -> dict[str, Any]:
    """The README's snapshotter config.toml and nydusd config as SnapshotterConfig's fields
    (fs_driver, daemon_mode when given, recover_policy, nydusd_config, settings): the machine's
    paths taken out, the registry scheme http. A plain dict, so it travels into a guest as JSON."""
    settings = tomllib.loads(block_starting(toml_marker))
    nydusd_config = json.loads(block_after(json_marker))
    for key in MACHINE_KEYS:
        settings.pop(key, None)
    daemon = settings.get("daemon", {})
    for key in MACHINE_DAEMON_KEYS:
        daemon.pop(key, None)
    if "device" in nydusd_config:  # fusedev: {"device": {"backend": {"config": ...}}}
        nydusd_config["device"]["backend"]["config"]["scheme"] = "http"
    else:  # fscache: {"config": {"backend_config": ...}}
        nydusd_config["config"]["backend_config"]["scheme"] = "http"
    fields: dict[str, Any] = {"fs_driver": daemon.pop("fs_driver"), "recover_policy": daemon.pop("recover_policy"),
                              "nydusd_config": nydusd_config}
    if "daemon_mode" in settings:
        fields["daemon_mode"] = settings.pop("daemon_mode")
    fields["settings"] = settings
    return fields
