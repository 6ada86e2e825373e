"""fscached as a systemd service on the real cachefiles path (6.12, 6.1: both have `restore`),
through the systemd stand-in (tests/standins/systemd.py) in the guest (scenarios/systemd_failover.py):
the bound /dev/cachefiles fd lives in the stand-in's fd store; kill -9 under 4 readers of a cold
file, a kill during start-up and another, and `systemctl restart` with the mount busy; every
reader must end with the right sha256 and no EIO, the objects re-opened with new ids.

Debian's systemd itself is not run as the guest's PID 1: the harness's PID 1 is its own
guest-init.sh (it runs the scenario, writes the result, reboots); see the README.
The file size is FSCACHED_SYSTEMD_MIB (default 64: three cold files per boot under TCG).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from trees import convert
from vmharness import run_scenario

pytestmark = pytest.mark.vm
READERS = 4
FILES = {"kill": "kill.bin", "again": "again.bin", "restart": "restart.bin"}


def rotated_digests(data: bytes, readers: int = READERS) -> list[str]:
    quarter = len(data) // readers // (1 << 20) * (1 << 20)
    return [hashlib.sha256(data[i * quarter:] + data[:i * quarter]).hexdigest() for i in range(readers)]


def test_systemd_fd_store_failover_on_cachefiles(vm_kernel: Any, tmp_path: Path) -> None:
    mib = int(os.environ.get("FSCACHED_SYSTEMD_MIB", "64"))
    tree = tmp_path / "tree"
    tree.mkdir()
    want = {}
    for key, name in FILES.items():
        data = os.urandom(mib << 20)
        (tree / name).write_bytes(data)
        want[key] = rotated_digests(data)
    built = convert(tree, tmp_path / "built", "none")
    res = run_scenario(vm_kernel, "systemd_failover",
                       {"bootstrap": str(built / "image.boot"), "blobs": str(built / "blobs"), "files": FILES,
                        "readers": READERS},
                       timeout=3000, share=[tmp_path], scratch_size=f"{max(2, (3 * mib) // 1024 + 2)}G",
                       memory_mb=2048)
    out = res.result
    if os.environ.get("FSCACHED_SYSTEMD_RESULT"):
        Path(os.environ["FSCACHED_SYSTEMD_RESULT"]).write_text(json.dumps(out, indent=1))
    where = f"log errors: {out.get('log_errors')}\nlog tail: {out.get('log_tail')}"
    lines = [f"[{vm_kernel.series}] {mib} MiB, {READERS} readers, guest times under TCG (boot {res.duration:.0f} s)"]
    for event in out["events"]:
        moving = [m for m in event["moving"] if m is not None]
        lines.append(f"  {event['what']}: new process {event['new_process']:.2f} s, READY {event['ready']:.2f} s, "
                     f"readers moving {min(moving, default=0):.2f}-{max(moving, default=0):.2f} s after the event")
    print("\n" + "\n".join(lines))

    assert out["store_at_start"][:1] == ["cachefiles"] and "state" in out["store_at_start"], out["store_at_start"]
    assert [e["what"] for e in out["events"]] == list(FILES)
    for event in out["events"]:
        assert [r["error"] for r in event["readers"]] == [None] * READERS, (event, where)
        assert [r["digest"] for r in event["readers"]] == want[event["what"]], event
        assert event["listen_names"][:1] == ["cachefiles"], event
        assert all(m is not None for m in event["moving"]), ("a reader had finished before the event", event)
    assert out["log_counts"]["kept_device"] >= 4, out["log_counts"]  # every restart that got going took it back
    assert out["log_counts"]["read_failed"] == 0, where
    assert out["log_counts"]["left_for_next"] >= 1, out["log_counts"]  # the restart left its busy mount
    ids = out["object_ids"]
    assert len(ids) == len(set(ids)), ("an object kept its id across a restart", ids)
    assert out["stop_status"] == 0 and out["store_after_stop"] == [], (out["store_after_stop"], where)
    assert not out["mounted_after_stop"]
    assert out["standin_errors"] == [] and out["rejected"] == [], out


REAL_FILES = {"kill": "kill.bin", "restart": "restart.bin", "watchdog": "watchdog.bin"}


def test_under_debians_systemd(vm_kernel: Any, tmp_path: Path) -> None:
    """Debian's own systemd (as `systemd --user` run by root in the guest: the harness's PID 1 is
    its own script) runs contrib/fscached.service: READY, the fd store across a kill -9, a
    `systemctl restart` and a watchdog kill under 4 readers, and an empty store after stop."""
    import shutil

    if shutil.which("systemctl") is None or not Path("/lib/systemd/systemd").exists():
        pytest.skip("systemd is not installed on this machine (the guest runs the host's root)")
    mib = int(os.environ.get("FSCACHED_SYSTEMD_MIB", "64"))
    tree = tmp_path / "tree"
    tree.mkdir()
    want = {}
    for key, name in REAL_FILES.items():
        data = os.urandom(mib << 20)
        (tree / name).write_bytes(data)
        want[key] = rotated_digests(data)
    built = convert(tree, tmp_path / "built", "none")
    unit = Path(__file__).resolve().parent.parent / "contrib" / "fscached.service"
    res = run_scenario(vm_kernel, "systemd_real",
                       {"bootstrap": str(built / "image.boot"), "blobs": str(built / "blobs"), "files": REAL_FILES,
                        "readers": READERS, "unit": str(unit), "watchdog_sec": 20},
                       timeout=3000, share=[tmp_path], scratch_size=f"{max(2, (3 * mib) // 1024 + 2)}G",
                       memory_mb=2048)
    out = res.result
    if os.environ.get("FSCACHED_SYSTEMD_RESULT"):
        Path(os.environ["FSCACHED_SYSTEMD_RESULT"]).write_text(json.dumps(out, indent=1))
    where = (f"status: {out.get('status')}\nlog errors: {out.get('log_errors')}\n"
             f"daemon log: {out.get('daemon_log', '')[-3000:]}\nmanager: {out.get('manager_log', '')[-3000:]}")
    lines = [f"[{vm_kernel.series}] {out.get('systemd')}, {mib} MiB, guest times under TCG"]
    for event in out.get("events", []):
        stalls = [s for s in event["stalls"] if s is not None]
        lines.append(f"  {event['what']}: a new process running {event['running_again']:.2f} s after the event; "
                     f"readers stalled {min(stalls, default=0):.2f}-{max(stalls, default=0):.2f} s at most")
    print("\n" + "\n".join(lines))
    assert int(out["after_start"]["NFileDescriptorStore"]) >= 2, (out["after_start"], where)  # device + state
    assert [e["what"] for e in out["events"]] == list(REAL_FILES), where
    for event in out["events"]:
        assert [r["error"] for r in event["readers"]] == [None] * READERS, (event, where)
        assert [r["digest"] for r in event["readers"]] == want[event["what"]], event
        assert int(event["after"]["NFileDescriptorStore"]) >= 2, (event, where)
        assert event["after"]["MainPID"] != event["before"]["MainPID"], event
    kill, _, watchdog = out["events"]
    assert kill["after"]["NRestarts"] == "1" and watchdog["after"]["NRestarts"] == "1", out["events"]  # Restart=
    assert out["log_counts"]["kept_device"] == 3, (out["log_counts"], where)  # each new process took it back
    assert out["log_counts"]["read_failed"] == 0, where
    assert out["after_stop"]["NFileDescriptorStore"] == "0" and not out["mounted_after_stop"], (out["after_stop"], where)
