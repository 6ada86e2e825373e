"""What the daemon serves: (volume, cookie) -> a bootstrap or a data blob.

The kernel names an object by its volume key (`erofs,<domain or fsid>`) and cookie key (the
fsid for the bootstrap, the device tag = blob id for a data blob). Images in one domain share
their blobs: one BlobObject per (volume, blob id), referenced by every image that uses it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from erofs_image.index import BootstrapIndex, open_served
from erofs_image.reader import Bootstrap
from erofs_image.tree import BlobInfo, ChunkRef, Inode
from fetcher.chain import SourceChain
from fscached.core.chunkmap import ChunkMap, chunks_by_blob, round_up
from fscached.config import ImageSpec
from erofs_image.profile import StartupProfile

if TYPE_CHECKING:
    from fscached.core.profile_recorder import ImageRecorder

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
    bootstrap: Bootstrap | BootstrapIndex
    users: set[str] = field(default_factory=set)  # fsids referencing it
    prefetch_mode: str = "none"
    prefetch_bandwidth: int = 0
    prefetch_order: list[ChunkRef] = field(default_factory=list)  # computed once, at load
    # a start-up profile's chunks of this blob, in profile order (replayed before prefetch_order;
    # a blob shared in a domain: every profile's chunks, the first image's first)
    profile_order: list[ChunkRef] = field(default_factory=list)
    recorders: list[ImageRecorder] = field(default_factory=list)  # images recording its reads

    @property
    def size(self) -> int:
        return self.info.uncompressed_size


Served = BootstrapObject | BlobObject


class Catalog:
    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], Served] = {}
        self.images: dict[tuple[str, str], ImageSpec] = {}
        # (volume, fsid) -> the image's blobs in device-table order (a file-backed mount
        # names one device per slot, in that order)
        self.devices: dict[tuple[str, str], list[BlobObject]] = {}

    def add_image(self, spec: ImageSpec, bootstrap_path: Path, source: SourceChain,
                  parsed: Bootstrap | BootstrapIndex | None = None) -> None:
        """Serve `spec`. `parsed`: its bootstrap already opened (open_bootstrap, off the event
        loop); else it is opened here."""
        if (spec.volume, spec.fsid) in self.images:
            raise CatalogError(f"image {spec.fsid}: already served in volume {spec.volume}")
        bootstrap = parsed if parsed is not None else open_bootstrap(spec, bootstrap_path)
        if isinstance(bootstrap, BootstrapIndex) and spec.prefetch.mode != "none":
            bootstrap = open_bootstrap(spec, bootstrap_path)  # the prefetch table's files: the tree
        if spec.blobs is not None and not spec.blobs.is_dir() and spec.registry is None and bootstrap.blobs:
            what = "is not a directory" if spec.blobs.exists() else "does not exist"
            raise CatalogError(f"image {spec.fsid}: blob directory {spec.blobs} {what}")
        devices: list[BlobObject] = []
        grouped = chunks_by_blob(bootstrap.image) if isinstance(bootstrap, Bootstrap) else {}
        prefetch_nodes = (prefetch_table_nodes(bootstrap) if spec.prefetch.mode != "none"
                          and isinstance(bootstrap, Bootstrap) else [])
        new: dict[tuple[str, str], Served] = {}
        for index, info in enumerate(bootstrap.blobs):
            key = (spec.volume, info.blob_id)
            existing = self._objects.get(key)
            if isinstance(existing, BlobObject):
                devices.append(existing)  # shared within the domain: one more user, below
                continue
            if existing is not None or info.blob_id == spec.fsid:
                raise CatalogError(f"image {spec.fsid}: blob id {info.blob_id} collides with an fsid")
            try:
                chunk_map = (ChunkMap.from_index(bootstrap.chunks[index], info.uncompressed_size)
                             if isinstance(bootstrap, BootstrapIndex)
                             else ChunkMap(grouped.get(index, []), info.uncompressed_size))
            except ValueError as exc:
                raise CatalogError(f"image {spec.fsid}: blob {info.blob_id}: {exc}") from None
            new[key] = BlobObject(info, chunk_map, source, bootstrap, {spec.fsid},
                                  spec.prefetch.mode, spec.prefetch.bandwidth,
                                  prefetch_order(prefetch_nodes, index, chunk_map, spec.prefetch.mode))
            devices.append(new[key])  # type: ignore[arg-type]
        key = (spec.volume, spec.fsid)
        if key in self._objects:
            raise CatalogError(f"image {spec.fsid}: the fsid collides with a blob id in {spec.volume}")
        file_size = os.stat(bootstrap_path).st_size
        new[key] = BootstrapObject(spec.fsid, bootstrap_path, file_size, round_up(file_size))
        self._objects.update(new)
        for blob in devices:  # only now: a refused image leaves no reference behind
            blob.users.add(spec.fsid)
        self.images[key] = spec
        self.devices[key] = devices

    def remove_image(self, volume: str, fsid: str) -> tuple[BootstrapObject, list[BlobObject]]:
        """Forget an image: its bootstrap object, and the blobs no other image of the volume
        uses (returned, for the frontend to close). CatalogError when there is no such image."""
        key = (volume, fsid)
        if key not in self.images:
            raise CatalogError(f"blob_cache: cache entry not found: image {fsid} in {volume}")
        del self.images[key]
        boot = self._objects.pop(key)
        assert isinstance(boot, BootstrapObject)
        dropped: list[BlobObject] = []
        for blob in self.devices.pop(key):
            blob.users.discard(fsid)
            if not blob.users and self._objects.get((volume, blob.info.blob_id)) is blob:
                del self._objects[(volume, blob.info.blob_id)]
                dropped.append(blob)
        return boot, dropped

    def bootstrap_of(self, spec: ImageSpec) -> BootstrapObject:
        obj = self._objects[(spec.volume, spec.fsid)]
        assert isinstance(obj, BootstrapObject)
        return obj

    def add_profile(self, spec: ImageSpec, profile: StartupProfile) -> int:
        """Append a (checked) profile's chunks to the image's blobs' `profile_order`, in profile
        order, each chunk once; the number of chunks added."""
        by_id = {blob.info.blob_id: blob for blob in self.devices[(spec.volume, spec.fsid)]}
        known = {id(blob): {c.uncompressed_offset for c in blob.profile_order} for blob in by_id.values()}
        added = 0
        for r in profile.ranges:
            blob = by_id.get(r.blob_id)
            if blob is None:
                continue
            have = known[id(blob)]
            for chunk in blob.chunk_map.chunks_in(r.offset, r.offset + r.length):
                if chunk.uncompressed_offset not in have:
                    have.add(chunk.uncompressed_offset)
                    blob.profile_order.append(chunk)
                    added += 1
        return added

    def blobs(self) -> list[tuple[str, BlobObject]]:
        """Every distinct data blob with its volume (a domain's blob once)."""
        return [(volume, obj) for (volume, _), obj in self._objects.items() if isinstance(obj, BlobObject)]

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


def open_bootstrap(spec: ImageSpec, path: Path) -> Bootstrap | BootstrapIndex:
    """The image's bootstrap as served: its chunk index (erofs_image.index: the superblocks,
    blob and chunk tables read and checked, no tree), or the whole image parsed and validated
    when it has no chunk table or its prefetch table is used (CatalogError, worded for the user)."""
    try:
        return open_served(path) if spec.prefetch.mode == "none" else Bootstrap.open(path)
    except FileNotFoundError:
        raise CatalogError(f"image {spec.fsid}: bootstrap {path} not found") from None
    except (ValueError, OSError) as exc:
        raise CatalogError(f"image {spec.fsid}: bootstrap {path}: {exc}") from None


def prefetch_table_nodes(bootstrap: Bootstrap) -> list[Inode]:
    """The inodes the bootstrap's prefetch table lists, in table order (one tree walk)."""
    by_nid: dict[int, Inode] = {}
    stack = [bootstrap.image.root]
    while stack:
        node = stack.pop()
        if node.nid in by_nid:
            continue
        by_nid[node.nid] = node
        stack.extend(node.children.values())
    return [by_nid[nid] for nid in bootstrap.prefetch_nids if nid in by_nid]


def prefetch_order(nodes: list[Inode], blob_index: int, chunk_map: ChunkMap, mode: str) -> list[ChunkRef]:
    """What to prefetch for one blob: the chunks of the prefetch table's files first, then
    (mode "all") every other chunk in address order; nothing for mode "none"."""
    if mode == "none":
        return []
    order: dict[int, ChunkRef] = {}
    for node in nodes:
        for ref in node.chunks:
            if ref is not None and ref.blob_index == blob_index:
                order.setdefault(ref.uncompressed_offset, ref)
    if mode == "all":
        for ref in chunk_map.chunks:
            order.setdefault(ref.uncompressed_offset, ref)
    return list(order.values())
