"""The prefetch list: which files of an image the daemon fetches first, as paths of the image.

`convert --prefetch-list FILE` reads one path a line. Paths are bytes, as Linux names are (any
byte but NUL, UTF-8 or not): a line is taken as it is, surrounding whitespace stripped, blank
lines skipped, and a leading "/" optional. A line holding a NUL byte is refused, naming the
file and line.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .layers import BuildError
from .tree import Inode, lookup


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


def resolve(root: Inode, items: Sequence[PrefetchEntry | str | bytes]) -> list[bytes]:
    """The bootstrap's prefetch paths: each entry must name a regular file of the tree."""
    found: list[bytes] = []
    for entry in map(as_entry, items):
        path = b"/" + entry.path.lstrip(b"/")
        try:
            node = lookup(root, path)
        except FileNotFoundError:
            raise BuildError(f"{entry.where}: {shown(entry.path)}: no such file in the image") from None
        if not node.is_reg:
            raise BuildError(f"{entry.where}: {shown(entry.path)}: not a regular file")
        if path not in found:
            found.append(path)
    return found
