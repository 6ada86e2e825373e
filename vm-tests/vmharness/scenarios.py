"""Host side of the scenario runner: boot a kernel and run vm-tests/scenarios/<name>.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .kernels import Kernel
from .qemu import HARNESS_DIR, VM_TESTS_DIR, VmError, VmResult, run_in_vm

SCENARIO_MAIN = HARNESS_DIR / "scenario_main.py"
SCENARIOS_DIR = VM_TESTS_DIR / "scenarios"


class ScenarioError(VmError):
    """The scenario raised in the guest or exited non-zero."""


def run_scenario(
    kernel: Kernel | Path,
    name: str,
    args: dict[str, Any] | None = None,
    timeout: float = 300.0,
    check: bool = True,
    **vm_kwargs: Any,
) -> VmResult:
    """Run `scenarios.<name>.run(args)` as root in a fresh guest; return its VmResult.

    VmResult.result is the dict the scenario returned (plus "_guest_seconds"). With check=True
    a scenario exception or a non-zero exit raises ScenarioError with the guest traceback and
    the console tail. vm_kwargs go to run_in_vm (scratch_size, share, env, memory_mb, ...).
    """
    if not (SCENARIOS_DIR / f"{name}.py").is_file():
        raise ValueError(f"no scenario {name!r} in {SCENARIOS_DIR}")
    path = kernel.path if isinstance(kernel, Kernel) else Path(kernel)
    res = run_in_vm(path, SCENARIO_MAIN, [name, json.dumps(args or {})], timeout=timeout, **vm_kwargs)
    res.extra["scenario"] = name
    if check and (res.returncode != 0 or "_error" in res.result):
        detail = res.result.get("_traceback") or res.result.get("_error") or "(no result written)"
        raise ScenarioError(
            f"scenario {name} failed in the guest (exit status {res.returncode}):\n{detail}", res.console
        )
    return res
