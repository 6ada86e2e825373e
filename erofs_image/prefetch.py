"""The prefetch list: which files of an image the daemon fetches first, as paths of the image.

`convert --prefetch-list FILE` reads one path a line. Paths are bytes, as Linux names are (any
byte but NUL, UTF-8 or not): a line is taken as it is, surrounding whitespace stripped, blank
lines skipped, and a leading "/" optional. A line holding a NUL byte is refused, naming the
file and line.

What an entry means, as nydus-image takes a prefetch list:
- a regular file: that file;
- a directory ("/" too): every regular file under it, in tree order (depth first, names in
  byte order);
- a symlink (not followed, nor through a parent directory), a missing path, or a file with no
  data (device, FIFO, socket): skipped, with a warning naming the file and line.
The table lists files in the order of the list, each once (a file listed again, directly or
under a directory, keeps its first place; hard links are one file).
"""
from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import reader
from .layers import BuildError
from .tree import Inode, walk


@dataclass(frozen=True)
class PrefetchEntry:
    path: bytes  # as listed, whitespace stripped
    where: str  # "FILE:LINE", for messages


def shown(path: bytes) -> str:
    """A path for a one-line message: UTF-8 where it is, \\x escapes where it is not."""
    return path.decode("utf-8", "backslashreplace")


def read_prefetch_list(path: Path) -> list[PrefetchEntry]:
    """The entries of a prefetch list file; BuildError for an unreadable file or a NUL byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BuildError(f"{path}: {e.strerror or e}") from None
    entries = []
    for number, line in enumerate(data.split(b"\n"), 1):
        text = line.strip()
        if not text:
            continue
        if b"\0" in text:
            raise BuildError(f"{path}: line {number}: holds a NUL byte (a path is any bytes but NUL)")
        entries.append(PrefetchEntry(text, f"{path}:{number}"))
    return entries


def as_entry(item: PrefetchEntry | str | bytes) -> PrefetchEntry:
    """A path given by a caller of `convert` (str or bytes) as an entry of an unnamed list."""
    if isinstance(item, PrefetchEntry):
        return item
    raw = item.encode("utf-8", "surrogateescape") if isinstance(item, str) else item
    return PrefetchEntry(raw.strip(), "prefetch list")


def _find(root: Inode, raw: bytes) -> tuple[bytes, Inode] | str:
    """(normalised path, inode) of a listed path, or why there is none."""
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        return "'..' in a prefetch path"
    node = root
    for i, part in enumerate(parts):
        if node.is_symlink:
            return f"{shown(b'/' + b'/'.join(parts[:i]))} is a symlink (not followed)"
        child = node.children.get(part) if node.is_dir else None
        if child is None:
            return "no such file in the image"
        node = child
    return b"/" + b"/".join(parts), node


_NO_DATA = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
            stat.S_IFSOCK: "a socket"}


def resolve(root: Inode, items: Sequence[PrefetchEntry | str | bytes]) -> tuple[list[bytes], list[str]]:
    """(the bootstrap's prefetch paths, one warning a skipped entry), by the rules above.
    BuildError when the paths are more than a bootstrap reader takes."""
    paths: list[bytes] = []
    taken: set[int] = set()  # inodes listed so far: a hard link is one file
    warnings: list[str] = []

    def take(path: bytes, node: Inode) -> None:
        if id(node) not in taken:
            taken.add(id(node))
            paths.append(path)

    for entry in map(as_entry, items):
        found = _find(root, entry.path)
        if isinstance(found, str):
            warnings.append(f"{entry.where}: {shown(entry.path)}: skipped: {found}")
            continue
        path, node = found
        if node.is_reg:
            take(path, node)
        elif node.is_dir:
            for sub, child in walk(node, path if path != b"/" else b""):
                if child.is_reg:
                    take(sub, child)
        else:
            why = "a symlink (not followed)" if node.is_symlink else \
                f"{_NO_DATA.get(stat.S_IFMT(node.mode), 'not a regular file')} (no data to fetch)"
            warnings.append(f"{entry.where}: {shown(entry.path)}: skipped: {why}")
    total = sum(map(len, paths))
    if total > reader.MAX_PREFETCH_PATH_BYTES:
        raise BuildError(f"prefetch list: {len(paths)} files with {total} bytes of paths, more than a "
                         f"bootstrap's prefetch table may name ({reader.MAX_PREFETCH_PATH_BYTES}): "
                         "list fewer or smaller directories")
    return paths, warnings
