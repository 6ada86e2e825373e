"""pytest set-up for the VM tests: vm-tests/ on sys.path, kernels, QEMU, the scenario runner.

Fixtures:
  vm_kernels   list[Kernel] of every selected series (builds missing ones: slow)
  vm_kernel    one Kernel; tests using it are parametrized over the series (ids "6.12", "6.1")
  vm_scenario  callable(kernel, name, args=None, timeout=300, **run_in_vm kwargs) -> VmResult
Environment: FSCACHED_KERNELS=6.12 limits the series; FSCACHED_KERNEL_DIR points at bzImages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VM_TESTS = Path(__file__).resolve().parent
if str(VM_TESTS) not in sys.path:
    sys.path.insert(0, str(VM_TESTS))

from vmharness import get_kernel, run_scenario, selected_series  # noqa: E402
from vmharness.qemu import QEMU, qemu_binary  # noqa: E402

_qemu_state: dict = {}


def _ensure_qemu() -> str | None:
    """None when QEMU and e2fsprogs are usable (installing them if we can), else why not."""
    if "reason" in _qemu_state:
        return _qemu_state["reason"]
    reason = None
    missing = [t for t in (QEMU, "mkfs.ext4", "debugfs") if shutil.which(t) is None]
    if missing:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], env=env)
            subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86", "e2fsprogs"], env=env)
        missing = [t for t in (QEMU, "mkfs.ext4", "debugfs") if shutil.which(t) is None]
        if missing:
            reason = f"{', '.join(missing)} missing and could not be installed (apt-get install qemu-system-x86 e2fsprogs)"
    _qemu_state["reason"] = reason
    return reason


def pytest_generate_tests(metafunc):
    if "vm_kernel" in metafunc.fixturenames:
        series = selected_series()
        metafunc.parametrize("vm_kernel", series, ids=series, indirect=True, scope="session")


@pytest.fixture(scope="session")
def vm_qemu():
    reason = _ensure_qemu()
    if reason:
        pytest.skip(reason)
    return qemu_binary()


@pytest.fixture(scope="session")
def vm_kernel(request, vm_qemu):
    return get_kernel(request.param)


@pytest.fixture(scope="session")
def vm_kernels(vm_qemu):
    return [get_kernel(s) for s in selected_series()]


@pytest.fixture
def vm_scenario(vm_qemu):
    def run(kernel, name, args=None, timeout=300.0, **kwargs):
        return run_scenario(kernel, name, args, timeout=timeout, **kwargs)

    return run

