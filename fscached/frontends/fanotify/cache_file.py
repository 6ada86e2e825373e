"""One blob's sparse cache file on the fanotify path, and what a clean stop records of it.

Per data blob (a domain's blob once) one sparse file of the blob's uncompressed size lives in
`<cache_dir>/blobs/<volume>/<blob id>`, marked FAN_PRE_ACCESS before anything can mount it.
Writes go through a non-notifying fd of it: one opened before the file was marked (checked on
6.18: such an fd raises no events, even with other files of the filesystem marked), or a
duplicate of an event's fd (opened by the kernel without notification).

Whether anything but this daemon reads the file (a mount, mounted or detached, in any mount
namespace; a reader) is asked of the file itself: fscached.util.leases.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fscached.core.catalog import BlobObject
from fscached.core.fill import FillTarget
from fscached.util.files import write_atomic
from fscached.util.leases import held_elsewhere, path_held_elsewhere
from fscached.util.shared_fd import SharedFd

log = logging.getLogger("fscached.fanotify")


class CacheFile:
    """One blob's sparse cache file and its fill state."""

    def __init__(self, volume: str, blob: BlobObject, path: Path) -> None:
        self.volume = volume
        self.blob = blob
        self.path = path
        self.name = f"{volume}/{blob.info.blob_id}"
        self.write_fd: SharedFd | None = None
        self.target: FillTarget | None = None
        self.marked = False
        self.reverify = False  # the file held bytes before this process: check before trusting
        self.fast_id = -1  # its id in the group's fast path (-1: none)

    def adopt(self, fd: int, on_complete: Callable[[CacheFile], None]) -> FillTarget:
        """Take `fd` (non-notifying, read-write) as the file's write fd. `on_complete` runs
        once every chunk of the blob holds verified bytes, whichever job wrote the last one."""
        self.write_fd = SharedFd(fd)
        self.target = FillTarget(fd, self.write_fd.hold, holes_read_as_zeros=True, buffered=True,
                                 reverify=self.reverify)
        self.target.chunk_count = len(self.blob.chunk_map)
        self.target.on_complete = lambda: on_complete(self)
        return self.target

    def held_elsewhere(self) -> bool:
        """Whether anything but this daemon has the file open: an EROFS superblock (mounted, or
        detached with `umount -l`) or a reader. Asked with our own write fd when we have one;
        a file that is gone is read by nobody."""
        if self.write_fd is not None and not self.write_fd.closing:
            with self.write_fd.hold() as alive:
                if alive:
                    return held_elsewhere(self.write_fd.fd)
        return bool(path_held_elsewhere(self.path, write=True))

    def close(self) -> None:
        """Stop its fetches; its write fd closes once the last write into it is done."""
        if self.target is not None:
            self.target.close()
        if self.write_fd is not None:
            self.write_fd.close()


def create_or_open(path: Path, size: int, handed_fd: int | None, fresh_group: bool) -> tuple[int | None, bool]:
    """The file's write fd (None: none can be had without an event, the first event brings
    one) and whether it held bytes before (then they are re-verified before they count).

    A file of another size is started afresh. A new file is sparse: every byte a hole."""
    try:
        existing = os.stat(path).st_size
    except FileNotFoundError:
        existing = -1
    if existing not in (-1, size):
        log.warning("cache file %s has %d bytes, not %d: starting it afresh", path, existing, size)
        path.unlink()
        existing = -1
    if existing < 0:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
        if handed_fd is not None:
            os.close(handed_fd)
        return fd, False  # opened before its mark: raises no events
    if handed_fd is not None:
        return handed_fd, True
    if fresh_group:  # no mark of ours can be on the file yet
        return os.open(path, os.O_RDWR | os.O_CLOEXEC), True
    return None, True  # marked by the group we took over, its write fd lost


# -- what a clean stop verified -------------------------------------------------------------------
# A clean stop fsyncs every cache file, then records which chunks each held verified bytes and
# the file's identity. The next start consumes the record (deletes it before serving: after a
# crash there is none) and trusts it only for a file still the same (inode, size, mtime);
# everything else is re-verified against the digests before it counts as filled.
def take_clean_stop_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # a record that cannot be consumed must not be trusted twice
        log.warning("cannot remove %s (%s): not trusting it", path, exc.strerror)
        return {}
    return record if isinstance(record, dict) else {}


def trust_clean_stop_record(cf: CacheFile, record: Mapping[str, Any]) -> int:
    """Mark what the record says the file holds (when it is the same file); chunks trusted."""
    entry = record.get(cf.name)
    if cf.target is None or not cf.reverify or not isinstance(entry, dict):
        return 0
    st = os.stat(cf.path)
    if [entry.get("ino"), entry.get("size"), entry.get("mtime_ns")] != [st.st_ino, st.st_size, st.st_mtime_ns]:
        return 0
    offsets = set(entry.get("chunks", []))
    trusted = [c for c in cf.blob.chunk_map.chunks if c.uncompressed_offset in offsets]
    cf.target.mark_written(trusted)
    return len(trusted)


def write_clean_stop_record(path: Path, files: list[CacheFile]) -> None:
    record: dict[str, Any] = {}
    for cf in files:
        if cf.target is None or cf.write_fd is None or not cf.target.written:
            continue
        os.fsync(cf.write_fd.fd)  # the bytes are on disk before the record says so
        st = os.fstat(cf.write_fd.fd)
        record[cf.name] = {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "chunks": sorted(cf.target.written)}
    write_atomic(path, json.dumps(record), fsync=True)
