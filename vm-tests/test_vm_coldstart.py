"""Issue 10 on the cachefiles path: a real container's cold start in a real 6.12 kernel.

One boot (scenarios/coldstart.py): the `small` workload (Debian bookworm + python3 + numpy,
built on the host and cached) is pushed into a docker-registry in a network namespace of the
guest, then started with Debian's containerd and runc three ways: classic (`ctr images pull`,
`ctr run`), lazy (fscached `--backend cachefiles` binds the image through its API and mounts it
with `-o fsid=`; `ctr run --rootfs` on an overlay over it) and lazy with a start-up profile
recorded by one daemon, pushed with `fscached-image profile push`, found in the registry and
replayed by a fresh daemon with an empty cache. Guest times are emulated (TCG): only the bytes
and the order of the modes are asserted; the table is printed for the record.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from vmharness import get_kernel, run_scenario, selected_series

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from coldstart import report  # noqa: E402
from erofs_image.profile import StartupProfile, bootstrap_digest  # noqa: E402

pytestmark = pytest.mark.vm
SERIES = "6.12"  # the kernel for this path; 6.1 serves the same protocol (test_vm_daemon)


@pytest.fixture(scope="module")
def workload() -> Any:
    from coldstart.workload import build_workload

    return build_workload("small")


def test_container_cold_start_through_cachefiles(vm_qemu: Any, workload: Any) -> None:
    if SERIES not in selected_series():
        pytest.skip(f"kernel {SERIES} not selected (FSCACHED_KERNELS)")
    # numpy's wheels need x86-64-v2 (SSE4.2, POPCNT): TCG's default CPU model lacks it
    res = run_scenario(get_kernel(SERIES), "coldstart", {"workload_dir": str(workload.path)},
                       timeout=1800, memory_mb=3072, scratch_size="6G", share=[workload.path],
                       extra_qemu_args=["-cpu", "max"])
    out = res.result
    runs = {r["mode"]: r for r in out["results"]}
    assert set(runs) == {"classic", "lazy", "lazy_profile"}, out["results"]
    for mode, run in runs.items():
        assert run["available"], (mode, run["note"])
        assert run["kernel_path"] == "cachefiles"
        assert run["output"][:1] == [workload.expected_line], (mode, run["output"])
    classic, lazy, prof = runs["classic"], runs["lazy"], runs["lazy_profile"]
    assert classic["bytes_fetched"] >= classic["image_bytes"] * 0.99  # every layer came over the link
    assert lazy["bytes_fetched"] < classic["bytes_fetched"] / 2, (lazy, classic)
    # the replay fetched what start-up reads and nothing the read-ahead guessed
    assert prof["bytes_fetched"] < lazy["bytes_fetched"], (prof, lazy)

    # the profile the recording daemon wrote on this path: this image's, with real ranges
    profile = StartupProfile.from_json(__import__("json").dumps(out["profile"]).encode())
    blob_sizes = {}
    from erofs_image.reader import Bootstrap

    for info in Bootstrap.open(workload.bootstrap).blobs:
        blob_sizes[info.blob_id] = info.uncompressed_size
    profile.check_against(bootstrap_digest(workload.bootstrap), blob_sizes)
    working_set = report.working_set_bytes(profile, workload.bootstrap)
    assert 0 < working_set <= prof["bytes_fetched"], (working_set, prof["bytes_fetched"])

    rows = [report.run_record(r) for r in out["results"]]
    print("\n" + report.markdown(rows, working_set + report.bootstrap_layer_bytes(workload.nydus / "oci"),
                                 title=f"Cold start in the {SERIES} guest (cachefiles, TCG)", with_goals=False))
