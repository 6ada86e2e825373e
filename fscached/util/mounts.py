"""mount(2) / umount(2) of the images the daemon serves, and what is mounted now."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import native

MS_RDONLY = 0x1
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def erofs_mount_table() -> dict[str, tuple[str, int]]:
    """Mount point -> (source, mount id) of every EROFS mount this process can see."""
    found: dict[str, tuple[str, int]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 2 and tail[0] == "erofs":
                found[_unescape(fields[4])] = (_unescape(tail[1]), int(fields[0]))
    return found


def erofs_mounts() -> dict[str, str]:
    """Mount point -> source of every EROFS mount this process can see."""
    return {mountpoint: source for mountpoint, (source, _) in erofs_mount_table().items()}


def mount_erofs(source: str | Path, target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    native.mount(source, target, "erofs", MS_RDONLY, options)


def unmount(target: Path) -> bool:
    """True when unmounted (or not mounted); False while it is busy."""
    try:
        native.umount(target)
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        if exc.errno == errno.EINVAL and str(target) not in erofs_mounts():
            return True
        raise


def check_mount_path(path: Path) -> None:
    """A path inside `device=`/`fsid=` options: no separator the kernel would split on."""
    if "," in str(path) or "\n" in str(path):
        raise ValueError(f"{path}: a path in mount options cannot contain ',' or a newline")


def is_mountpoint(path: Path) -> bool:
    return os.path.ismount(path)
