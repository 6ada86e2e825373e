"""Convert an OCI image layout, a `docker save` archive or a directory into an EROFS image.

Output (OUTDIR): ``image.boot`` (the bootstrap), ``blobs/<blob id>`` (one data blob per
source layer that brought new chunks) and ``oci/`` (an OCI image layout in the nydus
convention). Everything is built in a temporary directory beside OUTDIR and renamed at the
end, so a failed build leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .directory import add_file, scan_directory
from .layers import BuildError, CountingReader, apply_layer
from .oci import SourceImage, open_source, write_nydus_layout
from .prefetch import PrefetchEntry, resolve
from fscached.util.ids import BLOB_ID

from .tree import BlobInfo, Image, Inode
from .whiteout import check_spec

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
    whiteouts: int = 0  # whiteout markers of a directory source left out of the image


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


# --------------------------------------------------------------------------- convert


def _check_outdir(outdir: Path) -> None:
    if outdir.is_symlink() or (outdir.exists() and not outdir.is_dir()):
        raise BuildError(f"{outdir}: output exists and is not a directory")
    if outdir.is_dir() and any(outdir.iterdir()):
        raise BuildError(f"{outdir}: output directory exists and is not empty")
    parent = outdir.absolute().parent
    if not parent.is_dir():
        raise BuildError(f"{outdir}: parent directory {parent} does not exist")


def _check_blob_id(wanted: str, blobs: list[BlobInfo]) -> None:
    if len(blobs) != 1:
        wrote = "no data blob (no file holds data)" if not blobs else \
            f"{len(blobs)} blobs (one per layer that brought data)"
        raise BuildError(f"--blob-id {wanted}: the build wrote {wrote}, and a blob id names one blob")
    if blobs[0].blob_id != wanted:
        raise BuildError(f"--blob-id {wanted}: the blob built is {blobs[0].blob_id} (a blob id is the "
                         "sha256 of the blob file: registries, the OCI layout and the daemon's cache "
                         "find the blob by it)")


def convert(source: Path, outdir: Path, compressor: str = "zstd", chunk_size: int = 1 << 20,
            progress: bool | None = None,
            prefetch: Sequence[PrefetchEntry | str | bytes] | None = None,
            whiteout_spec: str = "oci", blob_id: str | None = None) -> BuildReport:
    """Build OUTDIR from SOURCE; raises BuildError (and leaves no OUTDIR) on failure.

    prefetch: what the daemon should fetch first when a blob is opened (the bootstrap's
    prefetch table): entries of a list file (prefetch.read_prefetch_list) or plain paths, taken
    by the rules of erofs_image.prefetch (entries it skips become report.warnings).
    whiteout_spec: which whiteout markers a directory source has (erofs_image.whiteout); an
    image's layers always use OCI whiteouts.
    blob_id: the id the build's one blob must have (its sha256, 64 lowercase hex digits): a
    blob id is the blob's content address, so this checks the build rather than renames it."""
    from .chunks import ChunkStore
    from .writer import write_bootstrap

    t0 = time.monotonic()
    source, outdir = Path(source), Path(outdir)
    try:
        check_spec(whiteout_spec)
    except ValueError as e:
        raise BuildError(str(e)) from None
    if blob_id is not None and not BLOB_ID.fullmatch(blob_id):
        raise BuildError(f"blob id {blob_id[:80]!r} is not 64 lowercase hex digits (a sha256)")
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
        if src is not None and whiteout_spec != "oci":
            raise BuildError(f"{source}: --whiteout-spec {whiteout_spec} is for a directory source: "
                             "the layers of an image use OCI whiteouts")
        try:
            store = ChunkStore(tmp / "blobs", chunk_size=chunk_size, compressor=compressor)
        except ValueError as e:
            raise BuildError(f"{source}: {e}") from None
        image = Image(root=Inode(mode=stat.S_IFDIR | 0o755), chunk_size=chunk_size)
        report = BuildReport(outdir=outdir, bootstrap=outdir / "image.boot",
                             source_kind=src.kind if src else "directory",
                             layers=len(src.layers) if src else 1)
        if src is None:
            scan = scan_directory(source, whiteout_spec)
            image.root, jobs, report.whiteouts = scan.root, scan.jobs, scan.whiteouts
            bar = _Progress(progress, sum(j.size for j in jobs), f"{source.name or source}")
            store.start_blob()
            for job in jobs:
                skipped_holes += add_file(store, job, chunk_size, bar)
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
        if blob_id is not None:
            _check_blob_id(blob_id, image.blobs)
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
