"""mount(2) / umount(2) of the images the daemon serves, and the one reader of the mount table.

`mount_table()` parses /proc/self/mountinfo once per call into `MountEntry` rows (the fields
unescaped as the kernel escapes them: space, tab, newline, backslash as \\ooo); every question
about what is mounted (EROFS mounts of a bootstrap, fscache mounts of an fsid, mounts below a
directory, is a path a mount point) is answered from those rows.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

import native

MS_RDONLY = 0x1
MNT_DETACH = 0x2
_ESCAPE = re.compile(r"\\([0-7]{3})")
MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor" of the superblock
    root: str  # the mount's root within its filesystem
    mountpoint: str
    fstype: str
    source: str
    super_options: tuple[str, ...]

    def option(self, name: str) -> str | None:
        """The value of a `name=value` super option (None when absent)."""
        prefix = name + "="
        for opt in self.super_options:
            if opt.startswith(prefix):
                return opt[len(prefix):]
        return None


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        try:
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError:
            continue
        options = tuple(_unescape(tail[2]).split(",")) if len(tail) >= 3 else ()
        entries.append(MountEntry(mount_id, parent_id, fields[2], _unescape(fields[3]), _unescape(fields[4]),
                                  tail[0], _unescape(tail[1]), options))
    return entries


def mount_table() -> list[MountEntry]:
    """What this process's mount namespace has mounted now ([] when it cannot be read)."""
    try:
        with open(MOUNTINFO) as f:
            return parse_mountinfo(f.read())
    except OSError:
        return []


def erofs_mount_table() -> dict[str, tuple[str, int]]:
    """Mount point -> (source, mount id) of every EROFS mount this process can see."""
    return {m.mountpoint: (m.source, m.mount_id) for m in mount_table() if m.fstype == "erofs"}


def erofs_mounts() -> dict[str, str]:
    """Mount point -> source of every EROFS mount this process can see."""
    return {mountpoint: source for mountpoint, (source, _) in erofs_mount_table().items()}


def fscache_mounts() -> list[MountEntry]:
    """EROFS mounts in fscache mode (`fsid=` in their options): the holder of /dev/cachefiles
    (one per machine) serves them all."""
    return [m for m in mount_table() if m.fstype == "erofs" and m.option("fsid")]


def fscache_mount_of(mountpoint: Path, fsid: str, domain: str | None) -> bool:
    """Whether `mountpoint` holds an EROFS fscache mount of this fsid (and domain)."""
    for m in fscache_mounts():
        if m.mountpoint == str(mountpoint) and m.option("fsid") == fsid \
                and (domain is None or m.option("domain_id") == domain):
            return True
    return False


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    root = str(Path(path).resolve())
    found = {m.mountpoint for m in mount_table()
             if m.mountpoint == root or m.mountpoint.startswith(root.rstrip("/") + "/")}
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


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
        if exc.errno in (errno.EINVAL, errno.ENOENT) and str(target) not in erofs_mounts():
            return True  # not a mount point (or not there at all): nothing to unmount
        raise


def check_mount_path(path: Path) -> None:
    """A path inside `device=`/`fsid=` options: no separator the kernel would split on."""
    if "," in str(path) or "\n" in str(path):
        raise ValueError(f"{path}: a path in mount options cannot contain ',' or a newline")


def is_mountpoint(path: Path) -> bool:
    """Whether something is mounted exactly at `path` (any filesystem)."""
    if os.path.ismount(path):
        return True
    try:
        resolved = str(Path(path).resolve())
    except OSError:
        return False
    return any(m.mountpoint == resolved for m in mount_table())
