"""QEMU harness for the tests that need a real kernel with cachefiles on-demand mode.

Host side:  run_in_vm(kernel, guest_script, args, timeout, ...) -> VmResult
            run_scenario(kernel, "name", {json args}, timeout, ...) -> VmResult
            get_kernel("6.12") / find_kernel("6.1") -> Kernel(series, path, origin)
Guest side: vmharness.guest.write_result(dict), scratch_dir()
"""

from .kernels import SERIES, Kernel, find_kernel, get_kernel, selected_series
from .qemu import VmError, VmResult, VmTimeout, run_in_vm
from .scenarios import ScenarioError, run_scenario

__all__ = [
    "SERIES",
    "Kernel",
    "ScenarioError",
    "VmError",
    "VmResult",
    "VmTimeout",
    "find_kernel",
    "get_kernel",
    "run_in_vm",
    "run_scenario",
    "selected_series",
]
