"""A plain directory as the source of an image: its tree, then its files' data.

`scan_directory` is the metadata pass: the tree of Inodes (hard links are one Inode, xattrs
read where the filesystem has them) and the regular files whose data is to be read; whiteout
markers are left out by the rules of erofs_image.whiteout.
`add_file` chunks one file's data into the chunk store, skipping unread the chunks that are
holes of a sparse file.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .layers import BuildError, ChunkSink
from .tree import ChunkRef, Inode
from .whiteout import check_spec, drop_opaque_mark, is_marker


def _xattrs(path: str) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
            return {}
        raise
    out = {}
    for name in names:
        try:
            out[name.encode("utf-8", "surrogateescape")] = os.getxattr(
                path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise
    return out


def _meta(st: os.stat_result, path: str) -> Inode:
    return Inode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                 mtime=st.st_mtime_ns // 1_000_000_000, mtime_nsec=st.st_mtime_ns % 1_000_000_000,
                 xattrs=_xattrs(path))


@dataclass
class FileJob:
    path: str
    inode: Inode
    size: int
    sparse: bool


@dataclass
class DirectoryScan:
    root: Inode
    jobs: list[FileJob]  # the regular files whose data is to be read, in scan order
    whiteouts: int = 0  # markers left out of the tree (entries, opaque marks)


def scan_directory(root: Path, whiteout_spec: str = "oci") -> DirectoryScan:
    """Metadata pass: the tree of Inodes and the regular files whose data is to be read, in
    the order the filesystem lists them. `whiteout_spec`: see erofs_image.whiteout."""
    check_spec(whiteout_spec)
    root_s = os.fsdecode(os.path.abspath(root))
    try:
        st = os.lstat(root_s)
    except OSError as e:
        raise BuildError(f"{root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"{root}: not a directory")
    links: dict[tuple[int, int], Inode] = {}
    top = _meta(st, root_s)
    scan = DirectoryScan(top, [])
    scan.whiteouts += drop_opaque_mark(whiteout_spec, top)
    stack = [(root_s, top)]
    while stack:
        dpath, dnode = stack.pop()
        try:
            with os.scandir(dpath) as it:
                entries = list(it)
        except OSError as e:
            raise BuildError(f"{dpath}: cannot list directory: {e.strerror}") from None
        for ent in entries:
            path = ent.path
            try:
                st = ent.stat(follow_symlinks=False)
                name = os.fsencode(ent.name)
                if is_marker(whiteout_spec, name, st):
                    scan.whiteouts += 1
                    continue
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in links:
                        dnode.children[name] = links[key]
                        continue
                node = _meta(st, path)
                if stat.S_ISDIR(st.st_mode):
                    scan.whiteouts += drop_opaque_mark(whiteout_spec, node)
                    stack.append((path, node))
                elif stat.S_ISREG(st.st_mode):
                    node.size = st.st_size
                    scan.jobs.append(FileJob(path, node, st.st_size,
                                              st.st_blocks * 512 < st.st_size))
                elif stat.S_ISLNK(st.st_mode):
                    node.target = os.readlink(os.fsencode(path))
                    node.size = len(node.target)
                elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    node.rdev = st.st_rdev
                elif not (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
                    raise BuildError(f"{path}: unsupported file type {stat.S_IFMT(st.st_mode):o}")
            except OSError as e:
                raise BuildError(f"{path}: {e.strerror or e}") from None
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                links[(st.st_dev, st.st_ino)] = node
            dnode.children[name] = node
    return scan


def add_file(store: ChunkSink, job: FileJob, chunk_size: int, on_bytes: Callable[[int], None]) -> int:
    """Chunk one file's data into `store`; returns the number of holes skipped unread."""
    try:
        fd = os.open(job.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise BuildError(f"{job.path}: cannot open: {e.strerror}") from None
    try:
        def reader(start: int) -> Callable[[int], bytes]:
            pos = [start]

            def read(n: int) -> bytes:
                data = os.pread(fd, n, pos[0])
                if len(data) < n:
                    more = [data]
                    got = len(data)
                    while got < n:
                        d = os.pread(fd, n - got, pos[0] + got)
                        if not d:
                            raise BuildError(f"{job.path}: file shrank while being read "
                                             f"(expected {job.size} bytes)")
                        more.append(d)
                        got += len(d)
                    data = b"".join(more)
                pos[0] += n
                on_bytes(n)
                return data
            return read

        if not job.sparse:
            job.inode.chunks = store.add_stream(reader(0), job.size)
            return 0
        refs: list[ChunkRef | None] = []
        off = 0
        skipped = 0
        while off < job.size:
            n = min(chunk_size, job.size - off)
            try:
                data_at = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                data_at = job.size if e.errno == errno.ENXIO else off
            if data_at >= off + n:  # the whole chunk is a hole: nothing to read
                refs.append(None)
                skipped += 1
                on_bytes(n)
            else:
                refs.extend(store.add_stream(reader(off), n))
            off += n
        job.inode.chunks = refs
        return skipped
    except OSError as e:
        raise BuildError(f"{job.path}: read error: {e.strerror or e}") from None
    finally:
        os.close(fd)
