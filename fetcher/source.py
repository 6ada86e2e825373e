"""The seam between the daemon and wherever blob bytes come from.

A source returns RAW blob-file bytes (compressed chunks stay compressed); mapping the
kernel's uncompressed offsets to those ranges, decompression and digest checks happen above,
in the daemon's blob reader, so every source gets verification for free.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

_BLOB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class SourceError(Exception):
    """A source could not deliver the bytes asked for (missing blob, short read, I/O error)."""


class IntegrityError(Exception):
    """Bytes a source delivered failed verification (digest, size, decompression)."""


@dataclass(frozen=True)
class LocalRange:
    """Bytes of a local blob file that its source does not read itself: the caller reads
    `length` bytes at `offset` of `fd` where it needs them (the fill core, in C, straight into
    its own buffer). Handed to `verify` by SourceChain.read_verified(..., local=True) in place
    of the bytes; fewer bytes there than `length` is the source's failure (SourceError)."""

    fd: int
    offset: int
    length: int
    direct_fd: int = -1  # the file opened O_DIRECT (whole blocks into aligned memory), or -1


def check_blob_id(blob_id: str) -> str:
    """Blob ids come from bootstraps and the kernel: never let one name a path outside."""
    if not _BLOB_ID.fullmatch(blob_id):
        raise SourceError(f"invalid blob id {blob_id[:80]!r}: expected letters, digits, '_', '.', '-'")
    return blob_id


@runtime_checkable
class BlobSource(Protocol):
    name: str  # for logs and metrics, without credentials: "registry 127.0.0.1:5000/app"

    async def read(self, blob_id: str, offset: int, length: int, *, prefetch: bool = False) -> bytes:
        """Exactly `length` bytes of blob `blob_id` at `offset`, or raise SourceError.

        prefetch: a background read (lower priority where the source has priorities).
        """
        ...

    async def close(self) -> None:
        ...
