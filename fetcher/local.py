"""Blob bytes from local files: a directory of blobs named by id, or one single blob file."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fetcher.source import SourceError, check_blob_id


class LocalDirectorySource:
    """Blobs stored as `<dir>/<blob id>` (the layout `fscached-image convert` writes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.name = f"local {self.directory}"
        self._fds: dict[str, int] = {}

    def _path(self, blob_id: str) -> Path:
        return self.directory / check_blob_id(blob_id)

    def _fd(self, blob_id: str) -> int:
        fd = self._fds.get(blob_id)
        if fd is None:
            path = self._path(blob_id)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SourceError(f"blob {blob_id}: cannot open {path}: {exc.strerror}") from exc
            self._fds[blob_id] = fd
        return fd

    async def read(self, blob_id: str, offset: int, length: int, *, prefetch: bool = False) -> bytes:
        fd = self._fd(blob_id)
        data = await asyncio.get_running_loop().run_in_executor(None, os.pread, fd, length, offset)
        if len(data) != length:
            raise SourceError(
                f"blob {blob_id}: short read at {offset}: wanted {length} bytes, file has {len(data)}"
            )
        return data

    async def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class LocalFileSource(LocalDirectorySource):
    """One blob in one file whose name need not be its id."""

    def __init__(self, blob_id: str, path: Path) -> None:
        super().__init__(Path(path).parent)
        self.blob_id = check_blob_id(blob_id)
        self.path = Path(path)
        self.name = f"local file {self.path}"

    def _path(self, blob_id: str) -> Path:
        if blob_id != self.blob_id:
            raise SourceError(f"blob {blob_id}: this source only holds {self.blob_id} ({self.path})")
        return self.path
