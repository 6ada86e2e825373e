"""fscached-image: build and look at EROFS (RAFS v6) images.

    fscached-image convert SOURCE OUTDIR [--compressor zstd|lz4|none] [--chunk-size SIZE]
        [--prefetch-list FILE] [--whiteout-spec oci|overlayfs|none] [--blob-id ID]
    fscached-image inspect BOOTSTRAP [--json]
    fscached-image cat BOOTSTRAP PATH --blobs DIR
    fscached-image profile push PROFILE REF [--plain-http] [--creds USER:PASS | --auth-file FILE]
    fscached-image profile attach PROFILE OUTDIR
    fscached-image profile show PROFILE [--json]

Every failure prints one line, ``fscached-image: error: <what>: <why>``, and exits 1
(2 for command line mistakes). Set FSCACHED_DEBUG=1 to get tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import traceback
from pathlib import Path

from .whiteout import WHITEOUT_SPECS

PROG = "fscached-image"
COMPRESSOR_NAMES = {"zstd": "zstd", "lz4": "lz4_block", "lz4_block": "lz4_block", "none": "none"}


class UsageError(Exception):
    pass


class CommandError(Exception):
    """An expected failure of a command: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise UsageError(f"{message} (see {self.prog} --help)")


def parse_size(text: str) -> int:
    """'4K', '1M', '1MiB', '1048576' -> bytes; a power of two >= 4096."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 4K, 1M, 1048576)")
    n = int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
    if n < 4096 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"chunk size {text!r} must be a power of two >= 4096")
    if n > 1 << 24:
        raise argparse.ArgumentTypeError(f"chunk size {text!r} must be at most 16M")
    return n


def _compressor(text: str) -> str:
    try:
        return COMPRESSOR_NAMES[text]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"invalid compressor {text!r} (choose zstd, lz4 or none)") from None


def _blob_id(text: str) -> str:
    from fscached.util.ids import BLOB_ID

    if not BLOB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a blob id: 64 lowercase hex digits, "
                                         "the sha256 of the blob file")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Build and inspect EROFS (RAFS v6) container images.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("convert", help="convert an OCI layout, docker-save archive or directory")
    c.add_argument("source", type=Path, help="OCI image layout dir, docker save .tar, or a directory")
    c.add_argument("outdir", type=Path, help="output directory (must not exist or be empty)")
    c.add_argument("--compressor", type=_compressor, default="zstd", metavar="zstd|lz4|none")
    c.add_argument("--chunk-size", type=parse_size, default=1 << 20, metavar="SIZE",
                   help="power of two >= 4K, e.g. 1M (default)")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    c.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    c.add_argument("--prefetch-list", type=Path, metavar="FILE",
                   help="files the daemon fetches first when the image is opened: one path a line, "
                        "a directory meaning every file under it; symlinks and missing paths are "
                        "skipped with a warning")
    c.add_argument("--whiteout-spec", choices=WHITEOUT_SPECS, default="oci",
                   help="the whiteout markers of a directory source, left out of the image: oci "
                        "(.wh.* entries; the default), overlayfs (0/0 character devices, opaque "
                        "xattrs) or none")
    c.add_argument("--blob-id", type=_blob_id, metavar="ID",
                   help="the id the blob must come out with (64 hex digits, its sha256): the "
                        "build fails, leaving nothing, when it is another")
    c.add_argument("--profile", type=Path, metavar="FILE",
                   help="a start-up profile recorded on this image: attached to OUTDIR/oci "
                        "(see 'profile attach'); it must match the bootstrap built")
    i = sub.add_parser("inspect", help="show a bootstrap's tree, blobs and chunk statistics")
    i.add_argument("bootstrap", type=Path)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    k = sub.add_parser("cat", help="write a file of the image to stdout")
    k.add_argument("bootstrap", type=Path)
    k.add_argument("path")
    k.add_argument("--blobs", type=Path, required=True, metavar="DIR",
                   help="directory holding the blob files (named by blob id)")
    from .profile_cli import add_parser as add_profile_parser

    add_profile_parser(sub)
    return p


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------- commands


def cmd_convert(args) -> int:
    from .builder import convert
    from .layers import BuildError

    loaded = None
    outdir_existed = args.outdir.exists()
    if args.profile is not None:  # a bad profile file fails before any work
        from erofs_image.profile import ProfileError

        from .profile_cli import load_profile

        try:
            loaded = load_profile(args.profile)
        except ProfileError as e:
            raise CommandError(str(e)) from None
    prefetch = None
    if args.prefetch_list is not None:  # read (and refused) before any work
        from .prefetch import read_prefetch_list

        try:
            prefetch = read_prefetch_list(args.prefetch_list)
        except BuildError as e:
            raise CommandError(str(e)) from None
    try:
        report = convert(args.source, args.outdir, compressor=args.compressor,
                         chunk_size=args.chunk_size, progress=args.progress, prefetch=prefetch,
                         whiteout_spec=args.whiteout_spec, blob_id=args.blob_id)
    except BuildError as e:
        raise CommandError(str(e)) from None
    for warning in report.warnings:  # on stderr, -q or not: input that was skipped
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    artifact = None
    if loaded is not None:
        artifact = _attach_after_convert(args, loaded, outdir_existed)
    if not args.quiet:
        print(f"built {report.outdir} from {report.source_kind} {args.source} "
              f"({report.layers} layer(s)) in {report.seconds:.2f}s")
        print(f"  bootstrap  {report.bootstrap}")
        for b in report.blobs:
            print(f"  blob       {report.outdir}/blobs/{b.blob_id}  {b.compressor}  "
                  f"{b.chunk_count} chunks  {human(b.compressed_size)} stored / "
                  f"{human(b.uncompressed_size)} uncompressed")
        print(f"  oci layout {report.outdir}/oci  (manifest {report.manifest_digest})")
        if report.whiteouts:
            print(f"  whiteouts  {report.whiteouts} marker(s) left out (--whiteout-spec {args.whiteout_spec})")
        print(f"  {report.files} files, {human(report.input_bytes)} read, {report.chunks} chunks "
              f"({report.deduped} deduplicated, {report.holes} holes), "
              f"{human(report.stored_bytes)} of chunk data written")
        if artifact:
            print(f"  profile    {args.profile} attached (artifact {artifact})")
    return 0


def _attach_after_convert(args, loaded, outdir_existed: bool) -> str:
    """`convert --profile`: attach, or empty the fresh OUTDIR and fail (no partial output)."""
    import shutil

    from erofs_image.profile import ProfileError

    from .profile_cli import Failed, attach

    try:
        return attach(args.profile, args.outdir, loaded)
    except (ProfileError, Failed) as e:
        shutil.rmtree(args.outdir, ignore_errors=True)  # convert wrote it all: it was absent or empty
        if outdir_existed:
            args.outdir.mkdir(exist_ok=True)
        raise CommandError(str(e)) from None


def cmd_profile(args) -> int:
    from .profile_cli import Failed, run

    try:
        return run(args)
    except Failed as e:
        if e.code == 2:
            raise UsageError(str(e)) from None
        raise CommandError(str(e)) from None


def _open_bootstrap(path: Path):
    from .reader import Bootstrap

    if not path.exists():
        raise CommandError(f"{path}: no such file")
    try:
        return Bootstrap.open(path)
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror or e}") from None
    except Exception as e:  # the reader's format errors
        msg = str(e)
        raise CommandError(msg if msg.startswith(str(path)) else
                           f"{path}: not a valid bootstrap: {msg}") from None


def _type_char(node) -> str:
    return stat.filemode(node.mode)


def summarize(bs) -> dict:
    from .tree import walk

    image = bs.image
    seen: set[int] = set()
    files = []
    refs = 0
    unique: set[tuple[int, int]] = set()
    logical = 0
    for path, node in walk(image.root):
        entry = {"path": path.decode("utf-8", "surrogateescape"), "mode": f"{node.mode:o}",
                 "type": _type_char(node)[0], "uid": node.uid, "gid": node.gid,
                 "size": node.size, "mtime": node.mtime, "nid": node.nid}
        if node.is_symlink:
            entry["target"] = node.target.decode("utf-8", "surrogateescape")
        if node.is_device:
            entry["rdev"] = [os.major(node.rdev), os.minor(node.rdev)]
        if node.xattrs:
            entry["xattrs"] = {k.decode("utf-8", "surrogateescape"): v.hex()
                               for k, v in node.xattrs.items()}
        if node.is_reg:
            entry["chunks"] = len(node.chunks)
            if id(node) not in seen:
                seen.add(id(node))
                logical += node.size
                for ref in node.chunks:
                    if ref is not None:
                        refs += 1
                        unique.add((ref.blob_index, ref.uncompressed_offset))
        files.append(entry)
    blobs = [{"index": i, "blob_id": b.blob_id, "compressor": b.compressor,
              "chunk_size": b.chunk_size, "chunk_count": b.chunk_count,
              "compressed_size": b.compressed_size, "uncompressed_size": b.uncompressed_size}
             for i, b in enumerate(bs.blobs)]
    return {
        "chunk_size": bs.chunk_size,
        "entries": len(files),
        "regular_files": len(seen),
        "file_bytes": logical,
        "chunk_refs": refs,
        "unique_chunks": len(unique),
        "dedup_ratio": round(refs / len(unique), 3) if unique else 1.0,
        "compressed_bytes": sum(b["compressed_size"] for b in blobs),
        "uncompressed_bytes": sum(b["uncompressed_size"] for b in blobs),
        "blobs": blobs,
        "tree": files,
    }


def print_summary(s: dict, tree: bool = True, out=sys.stdout) -> None:
    if tree:
        for e in s["tree"]:
            extra = f" -> {e['target']}" if "target" in e else ""
            if "rdev" in e:
                extra = f" [{e['rdev'][0]},{e['rdev'][1]}]"
            print(f"{stat.filemode(int(e['mode'], 8))} {e['uid']:>5}:{e['gid']:<5} "
                  f"{e['size']:>12} {e['path']}{extra}", file=out)
        print(file=out)
    print(f"{'#':>3} {'blob id':<64} {'compr':<9} {'chunks':>7} {'stored':>12} {'uncompr':>12}",
          file=out)
    for b in s["blobs"]:
        print(f"{b['index']:>3} {b['blob_id']:<64} {b['compressor']:<9} {b['chunk_count']:>7} "
              f"{b['compressed_size']:>12} {b['uncompressed_size']:>12}", file=out)
    print(f"\nchunk size {human(s['chunk_size'])}; {s['entries']} entries, {s['regular_files']} "
          f"regular files, {human(s['file_bytes'])} of file data", file=out)
    print(f"chunks {s['chunk_refs']}, unique chunks {s['unique_chunks']}, dedup ratio "
          f"{s['dedup_ratio']:.2f}", file=out)
    print(f"compressed {s['compressed_bytes']} bytes ({human(s['compressed_bytes'])}), "
          f"uncompressed {s['uncompressed_bytes']} bytes ({human(s['uncompressed_bytes'])})",
          file=out)


def cmd_inspect(args) -> int:
    s = summarize(_open_bootstrap(args.bootstrap))
    if args.json:
        json.dump(s, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_summary(s)
    return 0


def cmd_cat(args) -> int:
    from .tree import lookup

    bs = _open_bootstrap(args.bootstrap)
    if not args.blobs.is_dir():
        raise CommandError(f"{args.blobs}: blobs directory does not exist")
    try:
        node = lookup(bs.image.root, os.fsencode(args.path))
    except FileNotFoundError:
        raise CommandError(f"{args.path}: no such file in {args.bootstrap}") from None
    if node.is_dir:
        raise CommandError(f"{args.path}: is a directory")
    if not node.is_reg:
        what = f"a symlink to {node.target.decode(errors='replace')}" if node.is_symlink \
            else "not a regular file"
        raise CommandError(f"{args.path}: is {what}")
    for ref in node.chunks:
        if ref is not None and ref.blob_index < len(bs.blobs):
            blob = args.blobs / bs.blobs[ref.blob_index].blob_id
            if not blob.is_file():
                raise CommandError(f"{blob}: blob file missing (needed by {args.path})")
    out = sys.stdout.buffer
    cs = bs.chunk_size
    try:
        for i, ref in enumerate(node.chunks):  # chunk by chunk: no whole file in memory
            want = min(cs, node.size - i * cs)
            if ref is None:
                out.write(bytes(want))
                continue
            try:
                data = bs.read_chunk(ref, args.blobs / bs.blobs[ref.blob_index].blob_id)
            except OSError as e:
                raise CommandError(f"{args.path}: {e.strerror or e}") from None
            except Exception as e:  # verification / decompression failures
                raise CommandError(f"{args.path}: cannot read data: {e}") from None
            out.write(data[:want].ljust(want, b"\0"))
        out.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler = {"convert": cmd_convert, "inspect": cmd_inspect, "cat": cmd_cat,
                   "profile": cmd_profile}[args.command]
        return handler(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except CommandError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("FSCACHED_DEBUG"):
            traceback.print_exc()
        print(f"{PROG}: error: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
