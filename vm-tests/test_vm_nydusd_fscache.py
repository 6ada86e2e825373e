"""The real nydusd (nydus-rs 2.2.0 from crates.io, the `nydus-rs` peer) in fscache mode serves an
image fscached-image built, in a real kernel (6.12, 6.1): every file's bytes and metadata as the
source tree has them (scenarios/nydusd_fscache.py). This is the wiring bench/nydusd_guest.py
times (its FscacheNydusd), checked so it cannot rot, and the one place where nydus's own reader
fetches and decompresses fscached-image's chunks for the kernel. No timing is asserted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trees import convert, make_real_tree, manifest
from vmharness import run_scenario

pytestmark = pytest.mark.vm


def test_real_nydusd_serves_our_image_in_fscache_mode(vm_kernel: Any, tmp_path: Path) -> None:
    from coldstart.peers import PeerError, binary

    try:
        nydusd = binary("nydus-rs", "nydusd")  # make test builds it (coldstart.peers.FOR_TEST)
    except PeerError as exc:
        pytest.fail(str(exc))
    tree = make_real_tree(tmp_path / "tree")
    want = manifest(tree, tmp_path / "manifest.json")
    built = convert(tree, tmp_path / "built", "zstd", chunk_size="256K")
    res = run_scenario(vm_kernel, "nydusd_fscache",
                       {"nydusd": str(nydusd), "bootstrap": str(built / "image.boot"),
                        "blobs": str(built / "blobs"), "manifest": want},
                       timeout=900, share=[tmp_path], scratch_size="1G")
    out = res.result
    step = out["verify"]
    assert not step["missing"] and not step["extra"] and not step["mismatches"], step
    assert step["hardlinks_ok"], step
    assert step["checked"] > 1000, step
    assert out["stop"] is None, out  # umount, unbind (204) and exit 0 on SIGTERM
    assert out["errors"] == [], out["log_tail"]
    print(f"\n[{vm_kernel.series}] guest {res.duration:.0f} s (TCG), {step['checked']} entries checked")
