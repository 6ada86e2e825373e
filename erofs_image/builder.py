"""Convert an OCI image layout, a `docker save` archive or a directory into an EROFS image.

Output (OUTDIR): ``image.boot`` (the bootstrap), ``blobs/<blob id>`` (one data blob per
source layer that brought new chunks) and ``oci/`` (an OCI image layout in the nydus
convention). Everything is built in a temporary directory beside OUTDIR and renamed at the
end, so a failed build leaves nothing behind.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .layers import BuildError, CountingReader, apply_layer
from .oci import SourceImage, open_source, write_nydus_layout
from .prefetch import PrefetchEntry, resolve
from .tree import BlobInfo, ChunkRef, Image, Inode

__all__ = ["BuildError", "BuildReport", "convert", "scan_directory"]


@dataclass
class BuildReport:
    outdir: Path
    bootstrap: Path
    source_kind: str  # "directory" | "oci-layout" | "docker-archive" | "oci-archive"
    layers: int
    blobs: list[BlobInfo] = field(default_factory=list)
    files: int = 0  # regular files in the merged tree (hard links counted once)
    input_bytes: int = 0  # bytes read from the source (compressed layer bytes for archives)
    chunks: int = 0  # non-hole chunks seen
    deduped: int = 0
    holes: int = 0
    stored_bytes: int = 0
    manifest_digest: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # one line each: input skipped, not refused


# --------------------------------------------------------------------------- progress


class _Progress:
    """Bytes-of-input progress on stderr (rich), batched so the hot path stays cheap."""

    def __init__(self, enabled: bool, total: int | None, label: str):
        self.pending = 0
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task(label, total=total)
        self.bar.start()

    def __call__(self, n: int) -> None:
        if self.bar is None:
            return
        self.pending += n
        if self.pending >= 1 << 20:
            self.bar.advance(self.task, self.pending)
            self.pending = 0

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, self.pending)
            self.pending = 0
            self.bar.stop()
            self.bar = None


# --------------------------------------------------------------------------- directories


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
class _FileJob:
    path: str
    inode: Inode
    size: int
    sparse: bool


def scan_directory(root: Path) -> tuple[Inode, list[_FileJob]]:
    """Metadata pass: the tree of Inodes and the regular files whose data is to be read."""
    root_s = os.fsdecode(os.path.abspath(root))
    try:
        st = os.lstat(root_s)
    except OSError as e:
        raise BuildError(f"{root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"{root}: not a directory")
    links: dict[tuple[int, int], Inode] = {}
    jobs: list[_FileJob] = []
    top = _meta(st, root_s)
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
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in links:
                        dnode.children[name] = links[key]
                        continue
                node = _meta(st, path)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((path, node))
                elif stat.S_ISREG(st.st_mode):
                    node.size = st.st_size
                    jobs.append(_FileJob(path, node, st.st_size,
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
    return top, jobs


def _add_file(store, job: _FileJob, chunk_size: int, on_bytes: Callable[[int], None]) -> int:
    """Chunk one file's data into `store`; returns the number of holes skipped unread."""
    try:
        fd = os.open(job.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise BuildError(f"{job.path}: cannot open: {e.strerror}") from None
    try:
        def reader(start: int):
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


# --------------------------------------------------------------------------- convert


def _check_outdir(outdir: Path) -> None:
    if outdir.is_symlink() or (outdir.exists() and not outdir.is_dir()):
        raise BuildError(f"{outdir}: output exists and is not a directory")
    if outdir.is_dir() and any(outdir.iterdir()):
        raise BuildError(f"{outdir}: output directory exists and is not empty")
    parent = outdir.absolute().parent
    if not parent.is_dir():
        raise BuildError(f"{outdir}: parent directory {parent} does not exist")


def convert(source: Path, outdir: Path, compressor: str = "zstd", chunk_size: int = 1 << 20,
            progress: bool | None = None,
            prefetch: Sequence[PrefetchEntry | str | bytes] | None = None) -> BuildReport:
    """Build OUTDIR from SOURCE; raises BuildError (and leaves no OUTDIR) on failure.

    prefetch: what the daemon should fetch first when a blob is opened (the bootstrap's
    prefetch table): entries of a list file (prefetch.read_prefetch_list) or plain paths, taken
    by the rules of erofs_image.prefetch (entries it skips become report.warnings)."""
    from .chunks import ChunkStore
    from .writer import write_bootstrap

    t0 = time.monotonic()
    source, outdir = Path(source), Path(outdir)
    _check_outdir(outdir)
    if progress is None:
        progress = sys.stderr.isatty()
    src: SourceImage | None = open_source(source)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", suffix=".tmp",
                                dir=outdir.absolute().parent))
    store = None
    bar = None
    skipped_holes = 0
    try:
        try:
            store = ChunkStore(tmp / "blobs", chunk_size=chunk_size, compressor=compressor)
        except ValueError as e:
            raise BuildError(f"{source}: {e}") from None
        image = Image(root=Inode(mode=stat.S_IFDIR | 0o755), chunk_size=chunk_size)
        report = BuildReport(outdir=outdir, bootstrap=outdir / "image.boot",
                             source_kind=src.kind if src else "directory",
                             layers=len(src.layers) if src else 1)
        if src is None:
            root, jobs = scan_directory(source)
            image.root = root
            bar = _Progress(progress, sum(j.size for j in jobs), f"{source.name or source}")
            store.start_blob()
            for job in jobs:
                skipped_holes += _add_file(store, job, chunk_size, bar)
                report.input_bytes += job.size
            store.finish_blob()
        else:
            total = sum(layer.size or 0 for layer in src.layers) or None
            bar = _Progress(progress, total, "layers")
            for i, layer in enumerate(src.layers):
                bar.describe(f"layer {i + 1}/{len(src.layers)}")
                store.start_blob()
                try:
                    raw = layer.open()
                except OSError as e:
                    raise BuildError(f"{layer.name}: cannot open: {e}") from None
                with raw:
                    counting = CountingReader(raw, layer.name, layer.digest, bar)
                    try:
                        apply_layer(image, counting, store, layer.name)
                        counting.drain_and_verify()
                    except ValueError as e:  # ChunkStore limits
                        raise BuildError(f"{layer.name}: {e}") from None
                    except OSError as e:
                        raise BuildError(f"{layer.name}: read error: {e}") from None
                report.input_bytes += counting.count
                store.finish_blob()
        bar.close()
        image.blobs = list(store.blobs)
        image.prefetch, skipped = resolve(image.root, prefetch or [])
        report.warnings += skipped
        try:
            write_bootstrap(image, tmp / "image.boot")
        except ValueError as e:  # something the format cannot hold (name length, mtime ...)
            raise BuildError(f"{source}: cannot write the bootstrap: {e}") from None
        report.blobs = list(store.blobs)
        report.manifest_digest = write_nydus_layout(
            tmp / "oci", tmp / "image.boot", tmp / "blobs", [b.blob_id for b in store.blobs],
            src.config if src else None)
        seen: set[int] = set()
        from .tree import walk

        for _, node in walk(image.root):
            if node.is_reg and id(node) not in seen:
                seen.add(id(node))
                report.files += 1
        st = store.stats
        report.chunks, report.deduped = st.chunks, st.deduped
        report.holes, report.stored_bytes = st.holes + skipped_holes, st.stored_bytes
        os.chmod(tmp, 0o755)
        if outdir.is_dir():
            outdir.rmdir()  # checked empty above
        os.rename(tmp, outdir)
        report.seconds = time.monotonic() - t0
        return report
    except BaseException:
        if bar is not None:
            bar.close()
        if store is not None:
            store.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if src is not None:
            src.close()
