"""Start-up profiles: which blob ranges an image's start-up read, in first-read order.

A profile is recorded by the daemon (image key `record_profile=SECONDS`), folded into the image
by `fscached-image profile` (an OCI artifact whose subject is the image manifest), and replayed
by the daemon on the next node: those ranges are fetched, in that order, in large merged
requests, as soon as the image is mounted (on-demand reads still go first).

The file is JSON, version 1:

    {"format": "fscached-startup-profile", "version": 1,
     "bootstrap_digest": "sha256:<hex of the bootstrap file>",
     "recorded_seconds": 30.0, "image": "<ref or fsid, informative>",
     "ranges": [{"blob": "<64 hex>", "offset": 0, "length": 1048576, "at_ms": 12}, ...]}

`offset`/`length` are in the blob's uncompressed address space (what the kernel reads).
A profile is only trusted for what it names: a stale or foreign one costs bandwidth, never
correctness (every fetched byte is verified against its chunk digest anyway). Loading checks
the format, the version, the size bounds, the bootstrap digest and every range against the
image's blobs; problems are ProfileError with one line naming the file and why.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fscached.util.ids import BLOB_ID, SHA256_DIGEST

FORMAT = "fscached-startup-profile"
VERSION = 1
MEDIA_TYPE = "application/vnd.fscached.startup-profile.v1+json"  # the artifact's layer and artifactType
MAX_PROFILE_BYTES = 16 << 20
MAX_RANGES = 200_000


class ProfileError(ValueError):
    """A profile that cannot be used, worded for the user (one line)."""


@dataclass(frozen=True)
class ProfileRange:
    blob_id: str
    offset: int
    length: int
    at_ms: int = 0  # milliseconds after the mount when this range was first read


@dataclass
class StartupProfile:
    bootstrap_digest: str
    ranges: list[ProfileRange] = field(default_factory=list)
    recorded_seconds: float = 0.0
    image: str = ""

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "bootstrap_digest": self.bootstrap_digest,
            "recorded_seconds": self.recorded_seconds,
            "image": self.image,
            "ranges": [{"blob": r.blob_id, "offset": r.offset, "length": r.length, "at_ms": r.at_ms}
                       for r in self.ranges],
        }
        return (json.dumps(doc, separators=(",", ":")) + "\n").encode()

    @property
    def total_bytes(self) -> int:
        return sum(r.length for r in self.ranges)

    def blob_ids(self) -> list[str]:
        return list(dict.fromkeys(r.blob_id for r in self.ranges))

    def check_against(self, digest: str, blob_sizes: Mapping[str, int], where: str = "profile") -> None:
        """Raise ProfileError unless this profile was recorded on the image whose bootstrap has
        `digest` and every range lies inside one of its blobs (blob id -> uncompressed size)."""
        if self.bootstrap_digest != digest:
            raise ProfileError(f"{where}: recorded on bootstrap {self.bootstrap_digest}, "
                               f"not on this image's {digest}")
        for n, r in enumerate(self.ranges):
            size = blob_sizes.get(r.blob_id)
            if size is None:
                raise ProfileError(f"{where}: range {n} names blob {r.blob_id}, which the image does not have")
            if r.offset + r.length > size:
                raise ProfileError(f"{where}: range {n} [{r.offset}, {r.offset + r.length}) ends past "
                                   f"blob {r.blob_id[:12]}'s {size} bytes")

    @classmethod
    def from_json(cls, data: bytes, where: str = "profile") -> StartupProfile:
        """Parse and check the shape and bounds (not the image: see check_against)."""
        if len(data) > MAX_PROFILE_BYTES:
            raise ProfileError(f"{where}: {len(data)} bytes, more than a profile may be ({MAX_PROFILE_BYTES})")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{where}: not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ProfileError(f"{where}: not a start-up profile (format is not {FORMAT!r})")
        if doc.get("version") != VERSION:
            raise ProfileError(f"{where}: version {doc.get('version')!r} is not supported (this daemon reads {VERSION})")
        digest = doc.get("bootstrap_digest")
        if not isinstance(digest, str) or not SHA256_DIGEST.fullmatch(digest):
            raise ProfileError(f"{where}: bootstrap_digest must be sha256:<64 hex>, not {str(digest)[:80]!r}")
        raw_ranges = doc.get("ranges")
        if not isinstance(raw_ranges, list):
            raise ProfileError(f"{where}: ranges must be a list")
        if len(raw_ranges) > MAX_RANGES:
            raise ProfileError(f"{where}: {len(raw_ranges)} ranges, more than {MAX_RANGES}")
        seconds = doc.get("recorded_seconds", 0)
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
            raise ProfileError(f"{where}: recorded_seconds must be a number >= 0")
        image = doc.get("image", "")
        ranges = [_parse_range(item, n, where) for n, item in enumerate(raw_ranges)]
        return cls(digest, ranges, float(seconds), str(image)[:1000])

    @classmethod
    def load(cls, path: Path) -> StartupProfile:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PROFILE_BYTES + 1)
        except OSError as exc:
            raise ProfileError(f"profile {path}: {exc.strerror or exc}") from None
        return cls.from_json(data, f"profile {path}")


def _parse_range(item: Any, n: int, where: str) -> ProfileRange:
    if not isinstance(item, dict):
        raise ProfileError(f"{where}: range {n} is not an object")
    blob = item.get("blob")
    if not isinstance(blob, str) or not BLOB_ID.fullmatch(blob):
        raise ProfileError(f"{where}: range {n}: blob must be 64 lowercase hex digits")
    values = []
    for key in ("offset", "length", "at_ms"):
        v = item.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 53:
            raise ProfileError(f"{where}: range {n}: {key} must be an integer >= 0")
        values.append(v)
    if values[1] == 0:
        raise ProfileError(f"{where}: range {n}: length must be > 0")
    return ProfileRange(blob, values[0], values[1], values[2])


def bootstrap_digest(path: Path) -> str:
    """"sha256:<hex>" of a bootstrap file: what names an image in its profile."""
    from erofs_image.oci import sha256_file

    return "sha256:" + sha256_file(path)[0]
