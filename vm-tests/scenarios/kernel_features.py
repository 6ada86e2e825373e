"""Prove the harness and the kernel: no daemon, just the raw device.

Reports the kernel release, whether EROFS is registered, and what /dev/cachefiles does with
`dir` + `bind ondemand` on the scratch ext4 disk, a second open while bound, a read with
nothing queued, `restore`, and `bind ondemand` on a tmpfs directory (must be refused).

Then what a user whose setup does not fit this kernel (no fanotify pre-content events) is told:
`nydusd fuse` (nydus-snapshotter's fusedev driver) and `fscached --kernel-path auto` with no
usable /dev/cachefiles (a kernel with neither path); each command's exit code and stderr.
"""

from __future__ import annotations

import errno
import os
import platform
import select
import subprocess
import sys

from vmharness.guest import scratch_dir

DEVICE = "/dev/cachefiles"


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


def _cmd(fd: int, text: str) -> str | None:
    """Write one device command; None on success, the errno name otherwise."""
    try:
        os.write(fd, text.encode())
        return None
    except OSError as e:
        return _err(e)


def run(args: dict) -> dict:
    out: dict = {"release": platform.release(), "machine": platform.machine()}
    with open("/proc/filesystems") as f:
        fss = [line.split()[-1] for line in f if line.strip()]
    out["filesystems"] = fss
    out["erofs_registered"] = "erofs" in fss
    out["device_exists"] = os.path.exists(DEVICE)

    cache = scratch_dir() / args.get("cache_subdir", "cache")
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(DEVICE, os.O_RDWR)
    try:
        out["dir"] = _cmd(fd, f"dir {cache}")
        out["tag"] = _cmd(fd, "tag vmharness")
        out["bind"] = _cmd(fd, "bind ondemand")

        # Only one holder at a time.
        try:
            os.close(os.open(DEVICE, os.O_RDWR))
            out["second_open"] = None
        except OSError as e:
            out["second_open"] = _err(e)

        # Nothing queued: no POLLIN, and read() returns 0 bytes rather than EAGAIN.
        p = select.poll()
        p.register(fd, select.POLLIN)
        out["poll_events_idle"] = [ev for _, ev in p.poll(100)]
        try:
            out["idle_read_len"] = len(os.read(fd, 1024))
        except OSError as e:
            out["idle_read_len"] = _err(e)

        out["restore"] = _cmd(fd, "restore")
    finally:
        os.close(fd)
    out["cache_dir_entries"] = sorted(os.listdir(cache))

    # tmpfs has no sync_fs: cachefiles must refuse it.
    tmp_cache = "/tmp/cache-on-tmpfs"
    os.makedirs(tmp_cache, exist_ok=True)
    fd = os.open(DEVICE, os.O_RDWR)
    try:
        out["tmpfs_dir"] = _cmd(fd, f"dir {tmp_cache}")
        out["tmpfs_bind"] = _cmd(fd, "bind ondemand")
    finally:
        os.close(fd)
    out["user_errors"] = _user_errors(scratch_dir() / "user-errors")
    return out


def _user_errors(work: os.PathLike[str] | str) -> dict[str, dict[str, object]]:
    """Exit code and stderr of the two commands a wrong setup runs on this kernel."""
    root = os.fspath(work)
    os.makedirs(root, exist_ok=True)
    commands = {
        "nydusd_fuse": [sys.executable, "-m", "fscached.nydusd_cli", "fuse", "--mountpoint", f"{root}/mnt",
                        "--apisock", f"{root}/socket/d1/api.sock", "--id", "d1"],
        "neither_path": [sys.executable, "-m", "fscached.cli", "--kernel-path", "auto", "--device",
                         f"{root}/no-such-device", "--cache-dir", f"{root}/cache"],
    }
    found: dict[str, dict[str, object]] = {}
    for name, argv in commands.items():
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        found[name] = {"returncode": r.returncode, "stderr": r.stderr, "left": sorted(os.listdir(root))}
    return found
