"""Blob bytes from local files: a directory of blobs named by id, or one single blob file."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fetcher.source import LocalRange, SourceError, check_blob_id


class LocalDirectorySource:
    """Blobs stored as `<dir>/<blob id>` (the layout `fscached-image convert` writes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.name = f"local {self.directory}"
        self._fds: dict[str, int] = {}
        # O_DIRECT fds for the fill core's reads (local_range): a blob's bytes go straight into
        # the fill's buffer, not through the page cache as well (the cache file holds them next)
        self._direct_fds: dict[str, int] = {}
        self.direct = True  # False once a filesystem refused O_DIRECT

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

    async def local_range(self, blob_id: str, offset: int, length: int) -> LocalRange:
        """The range as an fd and offsets, unread (SourceError when the blob cannot be opened):
        an O_DIRECT fd where the filesystem takes one."""
        buffered = self._fd(blob_id)
        if self.direct:
            fd = self._direct_fds.get(blob_id)
            if fd is None:
                try:
                    fd = os.open(self._path(blob_id), os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
                except OSError:  # tmpfs and a few others: no O_DIRECT
                    self.direct = False
                    return LocalRange(buffered, offset, length)
                self._direct_fds[blob_id] = fd
            return LocalRange(buffered, offset, length, fd)
        return LocalRange(buffered, offset, length)

    async def close(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()


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
