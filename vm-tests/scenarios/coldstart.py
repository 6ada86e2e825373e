"""Guest side of test_vm_coldstart: the three cold-start modes through cachefiles on-demand.

The workload (built on the host, cached in its /var/cache, seen here read-only over 9p) is
pushed by skopeo into a docker-registry in a network namespace of the guest's own, behind a
veth pair (netem and tbf are in the test kernels); containerd and runc run with state on the
scratch disk; fscached runs with `--backend cachefiles` and its cache on the scratch disk (ext4:
cachefiles refuses tmpfs). args: workload_dir, network ("unshaped"), modes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coldstart.scenario import DIRECT_MODES, Scenario
from coldstart.workload import MARKER, Workload


def run(args: dict[str, Any]) -> dict[str, Any]:
    entry = Path(args["workload_dir"])
    workload = Workload.from_json((entry / MARKER).read_text(), entry)
    work = Path(args.get("scratch", "/mnt")) / "coldstart"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    with Scenario(workload, args.get("network", "unshaped"), workdir=work, kernel_path="cachefiles") as sc:
        delay_mode = sc.net.delay_mode if sc.net is not None else "?"
        for mode in args.get("modes", DIRECT_MODES):
            result = getattr(sc, mode)()
            print(result.summary(), flush=True)
            results.append(result.to_json())
        profile = sc.profile_path.read_text() if sc.profile_path is not None else None
    return {"results": results, "delay_mode": delay_mode,
            "profile": json.loads(profile) if profile else None,
            "expected_line": workload.expected_line}
