"""Local blob sources: a directory of blobs named by id, and one blob in any file."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fetcher.local import LocalDirectorySource, LocalFileSource
from fetcher.source import BlobSource, SourceError

BLOB = "ab" * 32


def test_directory_and_single_file_read_exact_ranges(tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    (tmp_path / BLOB).write_bytes(data)
    (tmp_path / "renamed.blob").write_bytes(data)

    async def main() -> None:
        for src in (LocalDirectorySource(tmp_path), LocalFileSource(BLOB, tmp_path / "renamed.blob")):
            assert isinstance(src, BlobSource)
            assert await src.read(BLOB, 100, 300) == data[100:400]
            assert await src.read(BLOB, 0, len(data)) == data
            with pytest.raises(SourceError, match="short read"):
                await src.read(BLOB, len(data) - 10, 20)
            await src.close()

    asyncio.run(main())


def test_bad_ids_and_missing_blobs_are_named(tmp_path: Path) -> None:
    async def main() -> None:
        directory = LocalDirectorySource(tmp_path)
        with pytest.raises(SourceError, match="invalid blob id"):
            await directory.read("../etc/passwd", 0, 1)
        with pytest.raises(SourceError, match=f"blob {BLOB}: cannot open"):
            await directory.read(BLOB, 0, 1)
        single = LocalFileSource(BLOB, tmp_path / "x")
        with pytest.raises(SourceError, match="only holds"):
            await single.read("cd" * 32, 0, 1)

    asyncio.run(main())
