"""An image pushed to a real registry, served on demand in a real kernel through the Dragonfly
stand-in peer, with the registry as the fallback when the peer dies mid-way.

The host builds the images and pushes them with skopeo into a registry whose storage directory
the guest then copies to its own disk; in the guest the registry and the stand-in dfdaemon run
on loopback, and fscached is given nothing but the image references.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ocilayout import layer_tar, write_layout
from trees import REPO, assert_verified, convert, make_real_tree, manifest, run, whole_second_mtimes

sys.path.insert(0, str(REPO))
from tests.registry_server import RegistryServer

pytestmark = pytest.mark.vm


def push(oci: Path, registry: RegistryServer, dest: str) -> None:
    index = json.loads((oci / "index.json").read_text())
    tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{oci}:{tag}",
                    f"docker://{registry.host}/{dest}"], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo missing: `make test` installs it (Debian package skopeo)")
    work = tmp_path_factory.mktemp("remote")
    tree = make_real_tree(work / "tree")
    lower = {"pip", "setuptools"}
    oci = write_layout(work / "oci-src", [layer_tar(tree, include=lower),
                                          layer_tar(tree, include={p.name for p in tree.iterdir()} - lower)])
    app = convert(oci, work / "app", "zstd")
    # 40 MiB of incompressible files: ten 4 MiB Dragonfly pieces, so reading half of it
    # leaves pieces the peer has not delivered yet
    big_tree = work / "big-tree"
    big_tree.mkdir()
    for i in range(40):
        (big_tree / f"part{i:02}.bin").write_bytes(os.urandom(1 << 20))
    whole_second_mtimes(big_tree)
    big = convert(big_tree, work / "big", "lz4")
    with RegistryServer(work / "registry") as registry:
        push(app / "oci", registry, "fscached/app:v1")
        push(big / "oci", registry, "fscached/big:v1")
    return {"work": work, "storage": str(work / "registry" / "storage"),
            "app": manifest(tree, work / "app.json"), "big": manifest(big_tree, work / "big.json")}


def image(fsid: str, repo: str) -> dict[str, Any]:
    return {"fsid": fsid, "ref": "{registry}/" + repo, "scheme": "http", "dragonfly": "{peer}"}


def test_registry_image_through_the_peer_then_peer_killed_halfway(vm_kernel: Any, pushed: dict[str, Any]) -> None:
    result = run(vm_kernel, pushed["work"], [image("app", "fscached/app:v1"), image("big", "fscached/big:v1")], [
        {"op": "mount", "fsid": "app", "at": "app"},
        {"op": "verify", "at": "app", "manifest": pushed["app"]},
        {"op": "stats"},
        {"op": "mount", "fsid": "big", "at": "big"},
        {"op": "verify", "at": "big", "manifest": pushed["big"], "part": [0, 2]},
        {"op": "kill_peer"},
        {"op": "verify", "at": "big", "manifest": pushed["big"], "part": [1, 2]},
        {"op": "stats"},
    ], timeout=1200, registry_storage=pushed["storage"], peer=True)
    steps = result["steps"]
    assert steps[0]["ok"], steps[0]
    assert_verified(steps[1], at_least=2000)
    peer_served = steps[2]["stats"]
    assert any(k.startswith("source:dragonfly") and k.endswith(":ok") for k in peer_served), peer_served
    assert not any(k.startswith("source:registry") and k.endswith(":ok") for k in peer_served), \
        "with a healthy peer every range comes through it"
    assert steps[3]["ok"], steps[3]
    assert_verified(steps[4], at_least=20)
    assert_verified(steps[6], at_least=20)
    final = steps[7]["stats"]
    assert any(k.startswith("source:registry") and k.endswith(":ok") for k in final), \
        f"after the peer died the registry served the rest: {final}"
    assert final.get("read_failed", 0) == 0 and final.get("verify_failures", 0) == 0, final
