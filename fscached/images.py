"""The images a daemon serves, each an explicit state machine, every operation on one id in turn.

    BINDING ──> BOUND ──> UNBINDING ──> GONE
       │          ^           │
       v          └───────────┘ (the unbind was refused: busy)
     FAILED

An `Image` is made BINDING the moment a bind is accepted (synchronously, before anything is
awaited), so a second bind of the same id is refused at once (ALREADY_EXISTS) and can never
interleave with the first. Every operation on one image holds its lock: an unbind that comes
while the image is BINDING waits for the bind to end, then finds it BOUND (and unbinds it) or
FAILED (nothing to unbind). GONE and FAILED images leave the table.

The invariant the daemon keeps (and the tests check after every step): a mount the daemon made
is either watched (its image BOUND, every blob served) or no longer mounted. A bind that fails
after its mount removes the mount before it answers; an unbind removes the mount before it
drops the image's blobs.
"""
from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fscached.config import ImageSpec
from fscached.core.catalog import CatalogError

log = logging.getLogger("fscached")


class ImageState(enum.Enum):
    BINDING = "binding"  # accepted: bootstrap pulled and parsed, blobs made servable, mounted
    BOUND = "bound"  # served (and mounted, when it has a mountpoint)
    UNBINDING = "unbinding"  # being unmounted and dropped
    GONE = "gone"  # unbound
    FAILED = "failed"  # the bind failed; everything it did is undone


_ALLOWED = {
    ImageState.BINDING: {ImageState.BOUND, ImageState.FAILED},
    ImageState.BOUND: {ImageState.UNBINDING},
    ImageState.UNBINDING: {ImageState.GONE, ImageState.BOUND},
    ImageState.GONE: set(),
    ImageState.FAILED: set(),
}


class AlreadyBound(CatalogError):
    """A bind of an id that is bound (or being bound) already."""


class MountpointTaken(ValueError):
    """A bind whose mountpoint another image has."""


class NotBound(CatalogError, LookupError):
    """An unbind of an id that is not bound. The message holds nydusd's wording
    ("blob_cache: cache entry not found"): nydus-snapshotter matches it."""


class BusyError(Exception):
    """An image cannot be dropped now: it is mounted and in use."""


@dataclass(eq=False)
class Image:
    spec: ImageSpec
    run_time: bool  # bound through the API (or restored from a predecessor), not configured
    state: ImageState = ImageState.BINDING
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    mounted_at: Path | None = None  # the mount this daemon made (or adopted), to unmount
    # restored from a predecessor's state and not bound again through this daemon since: the
    # first bind of exactly its spec is that image (Daemon.rebind_restored)
    restored: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.spec.volume, self.spec.fsid)

    def move(self, to: ImageState) -> None:
        if to not in _ALLOWED[self.state]:
            raise AssertionError(f"image {self.spec.fsid}: {self.state.value} -> {to.value} is not a transition")
        log.debug("image %s: %s -> %s", self.spec.fsid, self.state.value, to.value)
        self.state = to


class ImageTable:
    def __init__(self) -> None:
        self._images: dict[tuple[str, str], Image] = {}

    def reserve(self, spec: ImageSpec, *, run_time: bool) -> Image:
        """A new image, BINDING (synchronous: nothing can come between the check and this).
        AlreadyBound, MountpointTaken."""
        key = (spec.volume, spec.fsid)
        existing = self._images.get(key)
        if existing is not None:
            raise AlreadyBound(f"blob_cache: bootstrap blob already exists: image {spec.fsid} is already served in "
                               f"volume {spec.volume} ({existing.state.value})")
        if spec.mountpoint is not None:
            for other in self._images.values():
                if other.spec.mountpoint == spec.mountpoint:
                    raise MountpointTaken(f"image {spec.fsid}: mountpoint {spec.mountpoint} is already the mountpoint "
                                          f"of image {other.spec.fsid}")
        image = self._images[key] = Image(spec, run_time)
        return image

    def get(self, volume: str, fsid: str) -> Image | None:
        return self._images.get((volume, fsid))

    def forget(self, image: Image) -> None:
        """A GONE or FAILED image leaves the table."""
        assert image.state in (ImageState.GONE, ImageState.FAILED), image.state
        if self._images.get(image.key) is image:
            del self._images[image.key]

    def __iter__(self) -> Iterator[Image]:
        return iter(list(self._images.values()))

    def __len__(self) -> int:
        return len(self._images)

    def bound(self) -> list[Image]:
        return [image for image in self if image.state == ImageState.BOUND]

    def mounted(self) -> list[Image]:
        """Images with a mount this daemon made, in bind order."""
        return [image for image in self if image.mounted_at is not None]
