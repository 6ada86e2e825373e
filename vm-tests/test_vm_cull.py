"""Culling in a real kernel (6.12 and 6.1), one boot each (scenarios/cull.py).

What the kernel linked under `<cache>/cache/` is compared with cachefiles.naming (fscache_hash,
the cooked key): the paths must be exactly the ones the module computes. Then
`DELETE /api/v2/blobs?blob_id=` through fscached's API: busy while bound or mounted (the file
stays), culled once unmounted (the file is gone), the kernel's own `inuse` answer for an object
it holds, 404 / 400; and the cache budget with brun/bcull/bstop set before `bind ondemand`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from cachefiles import naming
from ocilayout import layer_tar, write_layout
from trees import convert
from vmharness import run_scenario

pytestmark = pytest.mark.vm
CACHE = Path("/cull-cache")  # only the relative part is compared


def rel(volume: str, key: str) -> str:
    return str(naming.object_path(CACHE, "erofs," + volume, key.encode()).relative_to(CACHE))


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cull_and_budget(vm_kernel: Any, tmp_path: Path) -> None:
    base, extra = tmp_path / "base", tmp_path / "extra"
    (base / "dir").mkdir(parents=True)
    (base / "dir" / "data.bin").write_bytes(os.urandom(600 << 10))
    (base / "note.txt").write_text("shared layer\n" * 2000)
    extra.mkdir()
    (extra / "more.bin").write_bytes(os.urandom(300 << 10))
    first_layer = layer_tar(base)
    one = convert(write_layout(tmp_path / "oci-1", [first_layer]), tmp_path / "one", "zstd")
    two = convert(write_layout(tmp_path / "oci-2", [first_layer, layer_tar(extra)]), tmp_path / "two", "zstd")
    blobs1 = {p.name for p in (one / "blobs").iterdir()}
    blobs2 = {p.name for p in (two / "blobs").iterdir()}
    assert len(blobs1) == 1 and len(blobs2) == 2 and blobs1 < blobs2, (blobs1, blobs2)
    shared = blobs1.pop()
    only2 = (blobs2 - {shared}).pop()
    merged = tmp_path / "merged"
    for src in (base, extra):
        for path in digests(src):
            (merged / path).parent.mkdir(parents=True, exist_ok=True)
            (merged / path).write_bytes((src / path).read_bytes())
    h = hashlib.sha256(b"nydus-snapshot-42").hexdigest()  # a snapshotter fscache_id
    images = {
        "img1": {"fsid": h, "bootstrap": str(one / "image.boot"), "blobs": str(one / "blobs"), "digests": digests(base)},
        "img2": {"fsid": "img2", "domain": "dom", "bootstrap": str(two / "image.boot"), "blobs": str(two / "blobs"),
                 "digests": digests(merged)},
    }
    res = run_scenario(vm_kernel, "cull", {"images": images, "shared": shared, "only2": only2},
                       timeout=900, share=[tmp_path], scratch_size="1G")
    out = res.result
    # shown with -s / -rP: what the kernel linked and what it answered
    print(f"[{vm_kernel}] linked at umount: {out.get('linked1')} {out.get('linked2')}")
    for line in (out.get("cull_log", "") + out.get("budget_log", "")).splitlines():
        if "kernel: `" in line or "culled" in line or "over its limit" in line:
            print(f"[{vm_kernel}] {line}")
    where = f"\n--- cull log ---\n{out.get('cull_log', '')[-6000:]}\n--- budget log ---\n{out.get('budget_log', '')[-4000:]}"

    # mounted and read; while mounted the objects are unnamed tmpfiles: nothing linked yet
    for key in ("mount1", "mount2"):
        assert out[key]["ok"] and out[key]["wrong"] == [], (key, out[key])
    assert out["files_while_mounted"] == [], out["files_while_mounted"]
    assert {f"Ierofs,{h}", "Ierofs,dom"} <= set(out["volumes_while_mounted"]), out["volumes_while_mounted"]
    for key in ("cull_shared_mounted", "cull_fsid_mounted"):
        assert out[key]["status"] == 409 and out[key]["body"]["code"] == "BUSY", (key, out[key], where)
        assert "bound" in out[key]["body"]["message"], out[key]

    # what the kernel linked at umount is exactly what cachefiles.naming computes
    assert out["unbind1"]["status"] == 204 and out["umount1"]["ok"], (out["unbind1"], out["umount1"])
    assert sorted(out["linked1"]) == sorted([rel(h, h), rel(h, shared)]), (out["linked1"], where)
    assert sorted(out["linked2"]) == sorted([rel("dom", "img2"), rel("dom", shared), rel("dom", only2)]), \
        (out["linked2"], where)

    # the snapshotter's cull of the fsid: its bootstrap object goes, the blob in its volume stays
    assert out["cull_fsid"]["status"] == 204, (out["cull_fsid"], where)
    assert rel(h, h) not in out["cull_fsid"]["files"] and rel(h, shared) in out["cull_fsid"]["files"]
    # the shared blob: culled in erofs,<h>, kept in erofs,dom where img2 is bound (409, partly done)
    partly = out["cull_shared_partly"]
    assert partly["status"] == 409 and "removed" in partly["body"]["message"], (partly, where)
    assert "erofs,dom: bound (image img2)" in partly["body"]["message"], partly
    assert rel(h, shared) not in partly["files"]

    # an object the kernel holds (img2 remounted from its linked files, then unbound while
    # mounted): the kernel's `inuse` says EBUSY, the file stays
    assert out["remount2"]["ok"] and out["remount2"]["wrong"] == [], out["remount2"]
    assert out["unbind2_mounted"]["status"] == 204, out["unbind2_mounted"]
    busy = out["cull_kernel_busy"]
    assert busy["status"] == 409 and "in use by the kernel" in busy["body"]["message"], (busy, where)
    assert rel("dom", only2) in busy["files"]
    assert "inuse" in out["cull_log"] and "EBUSY" in out["cull_log"], where

    # unmounted: culled at once after the umount (the kernel lets go in a worker: cull waits)
    assert out["umount2b"]["ok"]
    for key, gone in (("cull_only2", rel("dom", only2)), ("cull_fsid2", rel("dom", "img2")),
                      ("cull_shared", rel("dom", shared))):
        assert out[key]["status"] == 204, (key, out[key], where)
        assert gone not in out[key]["files"], (key, out[key]["files"])
    assert out["cull_shared"]["files"] == []
    assert out["cull_shared_again"]["status"] == 404, out["cull_shared_again"]
    assert "blob_cache: cache entry not found" in out["cull_shared_again"]["body"]["message"]
    # the image's own volume, empty now, goes too (through the graveyard, emptied)
    assert f"Ierofs,{h}" in out["volumes_before_cull_h"]
    assert out["cull_h_volume"]["status"] == 204, (out["cull_h_volume"], where)
    assert f"Ierofs,{h}" not in out["volumes_after_cull_h"] and out["graveyard_after_cull_h"] == []
    assert out["cull_h_again"]["status"] == 404
    for key in ("cull_invalid", "cull_prefixed"):
        assert out[key]["status"] == 400 and out[key]["body"]["code"] == "BAD_REQUEST", (key, out[key])
    assert out["cull_exit"] == 0, where

    # budget: brun/bcull/bstop accepted by the kernel before bind; after img1's unbind the pass
    # culls its objects and its volume, img2's (bound) stay and are read back from the cache
    assert sorted(out["b_linked"]) == sorted([rel(h, h), rel(h, shared), rel("dom", "img2"), rel("dom", shared),
                                              rel("dom", only2)]), (out["b_linked"], where)
    assert out["b_unbind1"]["status"] == 204
    assert sorted(out["b_files_after"]) == sorted([rel("dom", "img2"), rel("dom", shared), rel("dom", only2)]), \
        (out["b_files_after"], where)
    assert f"Ierofs,{h}" not in out["b_volumes_after"], out["b_volumes_after"]
    assert out["b_remount2"]["ok"] and out["b_remount2"]["wrong"] == [], out["b_remount2"]
    assert "over its limit" in out["budget_log"], where
    assert out["budget_exit"] == 0, where
