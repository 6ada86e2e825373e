"""What the daemon serves: (volume, cookie) -> a bootstrap or a data blob.

The kernel names an object by its volume key (`erofs,<domain or fsid>`) and cookie key (the
fsid for the bootstrap, the device tag = blob id for a data blob). Images in one domain share
their blobs: one BlobObject per (volume, blob id), referenced by every image that uses it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from erofs_image.reader import Bootstrap
from erofs_image.tree import BlobInfo
from fetcher.chain import SourceChain
from fscached.chunkmap import ChunkMap, chunks_by_blob, round_up
from fscached.config import ImageSpec

VOLUME_PREFIX = "erofs,"


class CatalogError(Exception):
    """An image that cannot be served, worded for the user."""


@dataclass
class BootstrapObject:
    fsid: str
    path: Path
    file_size: int
    size: int  # reported to the kernel: the file size rounded up to a block


@dataclass
class BlobObject:
    info: BlobInfo
    chunk_map: ChunkMap
    source: SourceChain
    bootstrap: Bootstrap
    users: set[str] = field(default_factory=set)  # fsids referencing it
    prefetch_mode: str = "none"
    prefetch_bandwidth: int = 0

    @property
    def size(self) -> int:
        return self.info.uncompressed_size


Served = BootstrapObject | BlobObject


class Catalog:
    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], Served] = {}
        self.images: dict[tuple[str, str], ImageSpec] = {}

    def add_image(self, spec: ImageSpec, bootstrap_path: Path, source: SourceChain) -> None:
        if (spec.volume, spec.fsid) in self.images:
            raise CatalogError(f"image {spec.fsid}: already served in volume {spec.volume}")
        try:
            bootstrap = Bootstrap.open(bootstrap_path)
        except FileNotFoundError:
            raise CatalogError(f"image {spec.fsid}: bootstrap {bootstrap_path} not found") from None
        except (ValueError, OSError) as exc:
            raise CatalogError(f"image {spec.fsid}: bootstrap {bootstrap_path}: {exc}") from None
        if spec.blobs is not None and not spec.blobs.is_dir() and spec.registry is None and bootstrap.blobs:
            raise CatalogError(f"image {spec.fsid}: blob directory {spec.blobs} does not exist")
        grouped = chunks_by_blob(bootstrap.image)
        new: dict[tuple[str, str], Served] = {}
        for index, info in enumerate(bootstrap.blobs):
            key = (spec.volume, info.blob_id)
            existing = self._objects.get(key)
            if isinstance(existing, BlobObject):
                existing.users.add(spec.fsid)
                continue
            if existing is not None or info.blob_id == spec.fsid:
                raise CatalogError(f"image {spec.fsid}: blob id {info.blob_id} collides with an fsid")
            try:
                chunk_map = ChunkMap(grouped.get(index, []), info.uncompressed_size)
            except ValueError as exc:
                raise CatalogError(f"image {spec.fsid}: blob {info.blob_id}: {exc}") from None
            new[key] = BlobObject(info, chunk_map, source, bootstrap, {spec.fsid},
                                  spec.prefetch.mode, spec.prefetch.bandwidth)
        key = (spec.volume, spec.fsid)
        if key in self._objects:
            raise CatalogError(f"image {spec.fsid}: the fsid collides with a blob id in {spec.volume}")
        file_size = os.stat(bootstrap_path).st_size
        new[key] = BootstrapObject(spec.fsid, bootstrap_path, file_size, round_up(file_size))
        self._objects.update(new)
        self.images[key] = spec

    def lookup(self, volume_key: str, cookie_key: bytes) -> Served | None:
        if not volume_key.startswith(VOLUME_PREFIX):
            return None
        try:
            cookie = cookie_key.decode("ascii")
        except UnicodeDecodeError:
            return None
        return self._objects.get((volume_key[len(VOLUME_PREFIX):], cookie))

    def sources(self) -> list[SourceChain]:
        unique: dict[int, SourceChain] = {}
        for obj in self._objects.values():
            if isinstance(obj, BlobObject):
                unique[id(obj.source)] = obj.source
        return list(unique.values())
