"""Guest side of test_vm_systemd.py: fscached on the real cachefiles path run by the systemd
stand-in (tests/standins/systemd.py): the bound /dev/cachefiles fd and the state in its fd store,
started again with LISTEN_FDS after each death, `restore` written by the new process.

  kill      4 readers stream the cold file `files.kill`; kill -9 the daemon once they are into it
  again     4 readers on `files.again`: kill -9, then kill the next process during its start-up,
            then once more after it serves; the fourth converges
  restart   4 readers on `files.restart`: `systemctl restart` (SIGTERM: the mount is busy, the
            device stays in the store, READs in flight are left for the next process)
  stop      readers done: SIGTERM unmounts, nothing is open any more: the store is emptied
Per event: seconds from the event to the new process, its READY=1, every reader reading again.

args: bootstrap, blobs, files: {"kill", "again", "restart": name}, readers (4), into (0.1)
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from vmharness.guest import scratch_dir

REPO = Path(__file__).resolve().parent.parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from scenarios.readers import Reader, start_readers, wait_into  # noqa: E402
from standins.systemd import SystemdStandin  # noqa: E402

FSID = "sdfailover"
OPEN_LINE = re.compile(r"OPEN req=msg:\d+ blob=(?P<blob>\S+) object=(?P<object>\d+) size=")


def moving_again(readers: list[Reader], after: float) -> list[float | None]:
    """Per reader: its first read completed at or after `after` (None: it had finished)."""
    return [next((t for t in r.times if t >= after), None) for r in readers]


def run(args: dict[str, Any]) -> dict[str, Any]:
    root = scratch_dir() / "systemd"
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    mnt = Path("/tmp/sdmnt")
    count = int(args.get("readers", 4))
    into = float(args.get("into", 0.1))
    log = root / "fscached.log"
    argv = [sys.executable, "-m", "fscached.cli", "--backend", "cachefiles", "--cache-dir", str(cache),
            "--work-dir", str(root / "work"), "--read-window", "256K",
            "--image", f"fsid={FSID},bootstrap={args['bootstrap']},blobs={args['blobs']},mountpoint={mnt}"]
    sd = SystemdStandin(argv, cwd=REPO, log=log, watchdog_sec=60.0, stop_timeout=120.0)
    out: dict[str, Any] = {"events": []}
    t0 = time.monotonic()
    try:
        sd.start()
        first = sd.wait_ready(timeout=600)
        out["start_seconds"] = round(first.ready - first.spawned, 2)  # type: ignore[operator]
        out["store_at_start"] = sd.store_names
        for key in ("kill", "again", "restart"):
            readers = start_readers(mnt / args["files"][key], count)
            wait_into(readers, into)
            n = len(sd.starts)
            at = time.monotonic()
            if key == "restart":
                sd.restart()
            else:
                sd.kill()
            nxt = sd.wait_starts(n + 1, timeout=120)
            event: dict[str, Any] = {"what": key}
            if key == "again":
                time.sleep(0.3)  # during its start-up (Python's imports take seconds under TCG)
                event["second_ready_before_kill"] = nxt.ready is not None
                os.kill(nxt.pid, signal.SIGKILL)
                sd.wait_starts(n + 2, timeout=120)
                sd.wait_ready(timeout=600)
                time.sleep(1.0)
                sd.kill()
                nxt = sd.wait_starts(n + 3, timeout=120)
            sd.wait_ready(timeout=600)
            for r in readers:
                r.join(1800)
            moving = moving_again(readers, nxt.spawned)
            event.update({
                "new_process": round(nxt.spawned - at, 3), "ready": round(nxt.ready - at, 3),  # type: ignore[operator]
                "moving": [None if m is None else round(m - at, 3) for m in moving],
                "listen_names": nxt.listen_names,
                "readers": [{"digest": r.digest, "error": r.error, "bytes": r.done} for r in readers]})
            out["events"].append(event)
        # the readers are done: a stop unmounts, nothing is open, the store is emptied
        last = sd.current
        sd.kill(signal.SIGTERM)
        out["stop_status"] = last.status if last is not None else None
        out["store_after_stop"] = sd.store_names
        out["mounted_after_stop"] = str(mnt) in Path("/proc/self/mountinfo").read_text()
        out["starts"] = [(s.reason, s.status) for s in sd.starts]
        out["standin_errors"] = sd.errors
        out["rejected"] = sd.rejected
    finally:
        sd.close()
        if str(mnt) in Path("/proc/self/mountinfo").read_text():
            os.system(f"umount -l {mnt}")
        text = log.read_text(errors="replace") if log.exists() else ""
        out["seconds"] = round(time.monotonic() - t0, 1)
        out["log_counts"] = {
            "kept_device": text.count("took /dev/cachefiles back from systemd's fd store"),
            "left_for_next": text.count("left to the next fscached") + text.count("left mounted for the next"),
            "served_again": text.count("still mounted on"),
            "read_failed": len(re.findall(r"READ req=msg:\d+ .* failed: ", text)),
            "errors": len(re.findall(r" ERROR ", text)),
        }
        out["object_ids"] = [int(m.group("object")) for m in OPEN_LINE.finditer(text)]
        out["log_errors"] = [line for line in text.splitlines() if " ERROR " in line][:40]
        out["log_tail"] = text[-6000:]
    return out
