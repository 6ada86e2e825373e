"""The error paths of fscached's `nydusd singleton` that the real nydus-snapshotter cannot be made
to take, in a real kernel (6.12, 6.1), the snapshotter's calls replayed as it makes them
(scenarios/nydus_snapshotter.py): a second bind, an unbind of a missing entry, a bind whose
metadata_path is missing, sendfd with nobody on the supervisor socket, a mount after the unbind,
the cull of a layer's blob. What the snapshotter does on a working node is checked against the
real one: test_vm_snapshotter.py.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from trees import convert
from vmharness import run_scenario

pytestmark = pytest.mark.vm
NYDUSD = Path(sys.executable).parent / "nydusd"
CULL_AVAILABLE = importlib.util.find_spec("fscached.cache_gc") is not None


def test_nydus_snapshotter_error_paths(vm_kernel: Any, tmp_path: Path) -> None:
    assert NYDUSD.exists(), f"{NYDUSD}: the nydusd console script is not installed in this venv"
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('NAME="errors"\n')
    (tree / "big.so").write_bytes(os.urandom(1 << 20))
    built = convert(tree, tmp_path / "built", "zstd", chunk_size="256K")
    image = {"snapshot_id": "101", "bootstrap": str(built / "image.boot"), "blobs": str(built / "blobs")}
    res = run_scenario(vm_kernel, "nydus_snapshotter", {"nydusd": str(NYDUSD), "image": image},
                       timeout=600, share=[tmp_path], scratch_size="1G")
    out = res.result
    where = f"guest {res.duration:.0f}s; log: {out.get('log_file')}\nstderr: {out.get('stderr')}"

    assert out["bind"]["status"] == 204 and out["mount"]["ok"], (out["bind"], out["mount"], where)
    # a second bind of a bound image (none a takeover gave back): nydusd's error
    second = out["second_bind"]
    assert second["status"] == 400 and second["body"]["code"] == "ALREADY_EXISTS", second
    assert "already exists" in second["body"]["message"]
    # an unbind of a missing entry: the text the snapshotter matches
    missing = out["unbind_missing"]
    assert missing["status"] == 404 and "blob_cache: cache entry not found" in missing["body"]["message"], missing
    # a bind whose metadata_path is missing: refused, nothing served for its id
    assert out["missing_metadata"]["status"] == 400, out["missing_metadata"]
    assert "metadata_path" in out["missing_metadata"]["body"]["message"]
    assert not out["missing_metadata_mount"]["ok"], "a refused bind must serve nothing"
    # sendfd with nobody on the supervisor socket: an error naming it, at once (no hang)
    sendfd = out["sendfd_nobody_listening"]
    assert sendfd["status"] == 500 and "supervisor" in sendfd["body"]["message"], sendfd
    # after the snapshotter's unbind, umount and cull, the image is not served any more
    assert out["unbind"]["status"] == 204 and out["umount_ok"], out
    assert out["cull"]["status"] == (204 if CULL_AVAILABLE else 501), out["cull"]
    assert not out["remount_after_unbind"]["ok"], "an unbound image must not be served"
    assert out["cull_layer"]["status"] == (204 if CULL_AVAILABLE else 501), out["cull_layer"]
    info = out["info_after"]["body"]
    assert info["fscached"]["images"] == [], info
    counters = info["fscached"]["counters"]
    assert counters.get("read_failed", 0) == 0 and counters.get("verify_failures", 0) == 0, counters
    assert out["exit"]["status"] == 204 and out["exit_code"] == 0 and not out["socket_left"], where
    print(f"\n[{vm_kernel.series}] guest {res.duration:.0f} s (TCG)")
