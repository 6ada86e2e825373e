"""The test kernels boot under QEMU and have what the daemon needs (no daemon involved)."""

from __future__ import annotations

import errno

import pytest

pytestmark = pytest.mark.vm


def test_kernel_features(vm_kernel, vm_scenario):
    res = vm_scenario(vm_kernel, "kernel_features", {"cache_subdir": "cache"}, timeout=180)
    r = res.result
    print(f"{vm_kernel}: boot-to-result {res.duration:.1f} s, guest script {r['_guest_seconds']} s")

    assert r["release"].startswith(vm_kernel.series + "."), r["release"]
    assert r["machine"] == "x86_64"
    assert r["erofs_registered"], r["filesystems"]
    assert r["device_exists"]
    # dir + bind ondemand on an ext4 cache directory succeed.
    assert r["dir"] is None and r["tag"] is None
    assert r["bind"] is None, f"bind ondemand failed: {r['bind']} (kernel without CACHEFILES_ONDEMAND?)"
    # Only one holder; an idle device reads 0 bytes and does not poll readable.
    assert r["second_open"] == "EBUSY"
    assert r["poll_events_idle"] == []
    assert r["idle_read_len"] == 0
    # Both test kernels have failover (6.12, 6.1.95+).
    assert r["restore"] is None
    # Binding created the cache layout on the scratch disk.
    assert "cache" in r["cache_dir_entries"] and "graveyard" in r["cache_dir_entries"]
    # tmpfs lacks sync_fs: bind is refused with EOPNOTSUPP.
    assert r["tmpfs_dir"] is None
    assert r["tmpfs_bind"] == errno.errorcode[errno.EOPNOTSUPP]  # "ENOTSUP": same number (95)

    # a setup this kernel cannot serve is told so in one line, with what to do instead
    fuse = r["user_errors"]["nydusd_fuse"]
    lines = fuse["stderr"].strip().splitlines()
    assert fuse["returncode"] != 0 and len(lines) == 1, fuse
    assert "fanotify pre-content events (Linux 6.14+)" in lines[0] and 'fs_driver = "fscache"' in lines[0], fuse
    neither = r["user_errors"]["neither_path"]
    lines = neither["stderr"].strip().splitlines()
    assert neither["returncode"] != 0 and len(lines) == 1, neither
    assert "no kernel path can serve images here" in lines[0] and "no-such-device does not exist" in lines[0], neither
    assert "CONFIG_CACHEFILES_ONDEMAND" in lines[0], neither


def test_scenario_failure_is_reported(vm_kernels, vm_scenario):
    """A scenario that raises in the guest surfaces as ScenarioError carrying the traceback."""
    from vmharness import ScenarioError

    with pytest.raises(ScenarioError, match="deliberate failure"):
        vm_scenario(vm_kernels[0], "selftest_fail", {"message": "deliberate failure"}, timeout=120)


def test_timeout_kills_qemu_and_shows_console(vm_kernels, vm_scenario):
    from vmharness import VmTimeout

    with pytest.raises(VmTimeout) as info:
        vm_scenario(vm_kernels[0], "selftest_sleep", {"marker": "still-asleep-marker"}, timeout=25)
    assert "still-asleep-marker" in str(info.value)
