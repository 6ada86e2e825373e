"""OCI / Docker media types, nydus annotations, and the choice of a platform in an image index.

Shared by the converter (`erofs_image.oci`, reading input images) and the puller
(`fetcher.pull`, reading a registry's manifests); it lives here, the lower layer, because
erofs_image never imports fetcher.

    desc = choose_manifest(index)                     # for this machine
    desc = choose_manifest(index, Platform.parse("linux/arm/v7"))
    machine_platform()   # Platform("linux", "arm64") on an aarch64 host

Platform rules (`choose_manifest`):
- The wanted platform defaults to the running machine's: os `linux`, architecture from
  `platform.machine()` in GOARCH terms (x86_64 -> amd64, aarch64 -> arm64, armv7l -> arm/v7,
  armv6l -> arm/v6, i686 -> 386, ppc64le, s390x, riscv64, ...; a name not in the table is used
  as it is, lower-cased).
- Entries that are not images are skipped: platform `unknown/unknown` (buildx attestations)
  and `vnd.docker.reference.type` annotations.
- An entry matches when its os and architecture are the wanted ones. Among matches, in this
  order: the same variant (arm64's `v8` and amd64's `v1` count as no variant); then an entry
  without a variant; then (arm) an older variant the machine runs (v6 on a v7 machine, v5 on
  v6), the closest first; then, when the wanted platform has no variant, one with a variant.
  A newer variant than the machine's never matches. Ties go to the first in index order.
- No match: an index whose only image entry says nothing about its platform (OCI layouts
  written by skopeo or docker often do not) gives that entry. Never another architecture:
  a foreign-only index is an error.
- Errors are `PlatformError` (a ValueError), naming what the index has: "2 manifests and
  none for linux/amd64 (linux/arm64, linux/s390x)". Callers prefix where the index came from.
"""
from __future__ import annotations

import platform as _platform
import re
from dataclasses import dataclass

# -- media types ---------------------------------------------------------------------------
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# what a registry client accepts for a manifest GET: images and indexes, OCI and Docker v2
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))

# -- annotations and the nydus bootstrap layer ------------------------------------------------
ANN_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANN_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANN_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_DOCKER_REFERENCE_TYPE = "vnd.docker.reference.type"  # buildx attestation manifests
BOOTSTRAP_ENTRY = "image/image.boot"  # the bootstrap's path inside the bootstrap layer's tar


def is_index(obj: dict, media_type: str | None = None) -> bool:
    """Whether a parsed manifest document is an index / manifest list: by its media type
    (`media_type`, e.g. from a descriptor or Content-Type, else its own `mediaType`), or, when
    neither says, by shape (`manifests` and no `layers`)."""
    mt = media_type or obj.get("mediaType")
    if mt:
        return mt in INDEX_TYPES
    return "manifests" in obj and "layers" not in obj


# -- platforms ------------------------------------------------------------------------------
# platform.machine() -> (GOARCH, variant); the names the kernels and distributions use
_MACHINE_GOARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None), "x64": ("amd64", None),
    "aarch64": ("arm64", None), "arm64": ("arm64", None), "aarch64_be": ("arm64be", None),
    "armv8l": ("arm", "v7"),  # a 32-bit userland on a 64-bit ARM core
    "armv7l": ("arm", "v7"), "armv7": ("arm", "v7"), "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"), "armv6": ("arm", "v6"),
    "armv5tel": ("arm", "v5"), "armv5l": ("arm", "v5"),
    "i386": ("386", None), "i486": ("386", None), "i586": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "ppc64": ("ppc64", None),
    "s390x": ("s390x", None), "riscv64": ("riscv64", None),
    "loongarch64": ("loong64", None), "mips64": ("mips64", None), "mips64el": ("mips64le", None),
}
# variants that mean "no variant" for an architecture (containerd normalises them away)
_DEFAULT_VARIANT = {"arm64": "v8", "amd64": "v1"}
_VARIANT_NUMBER = re.compile(r"v(\d+)")


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`os/architecture[/variant]`, e.g. "linux/arm/v7"; ValueError otherwise."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text[:100]!r}: expected os/architecture[/variant]")
        return cls(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else None).normalized()

    @classmethod
    def from_descriptor(cls, desc: dict) -> Platform | None:
        """The `platform` of an index entry; None when it says nothing usable."""
        plat = desc.get("platform")
        if not isinstance(plat, dict):
            return None
        os_, arch, variant = plat.get("os"), plat.get("architecture"), plat.get("variant")
        if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
            return None
        return cls(os_.lower(), arch.lower(), variant.lower() if isinstance(variant, str) and variant else None).normalized()

    def normalized(self) -> Platform:
        if self.variant is not None and _DEFAULT_VARIANT.get(self.architecture) == self.variant:
            return Platform(self.os, self.architecture, None)
        return self


def machine_platform(machine: str | None = None) -> Platform:
    """The platform of the running machine (or of `machine`, a `platform.machine()` value)."""
    name = (machine if machine is not None else _platform.machine()).strip().lower()
    arch, variant = _MACHINE_GOARCH.get(name, (name or "unknown", None))
    return Platform("linux", arch, variant)


class PlatformError(ValueError):
    """No entry of an index fits the wanted platform (the message names the ones present)."""


def _is_image_entry(desc: object) -> bool:
    if not isinstance(desc, dict):
        return False
    plat = desc.get("platform")
    if isinstance(plat, dict) and (plat.get("os") == "unknown" or plat.get("architecture") == "unknown"):
        return False
    annotations = desc.get("annotations")
    if isinstance(annotations, dict) and ANN_DOCKER_REFERENCE_TYPE in annotations:
        return False
    return True


def _variant_number(variant: str | None) -> int | None:
    m = _VARIANT_NUMBER.fullmatch(variant or "")
    return int(m.group(1)) if m else None


def _rank(have: Platform, want: Platform) -> int | None:
    """How well an entry for `have` fits `want`: 0 best, None not at all."""
    if have.os != want.os or have.architecture != want.architecture:
        return None
    if have.variant == want.variant:
        return 0
    if have.variant is None:
        return 1
    if want.variant is None:
        return 1000  # the machine's variant is unknown: accepted after the plain entries
    hn, wn = _variant_number(have.variant), _variant_number(want.variant)
    if hn is not None and wn is not None and hn < wn:
        return 2 + (wn - hn)  # an older variant the machine runs; the closest first
    return None


def describe(desc: object) -> str:
    """An index entry's platform for messages ("linux/arm64", "unspecified")."""
    p = Platform.from_descriptor(desc) if isinstance(desc, dict) else None
    return str(p) if p is not None else "unspecified"


def choose_manifest(index: dict, want: Platform | None = None) -> dict:
    """The entry (a descriptor dict) of `index`'s `manifests` for platform `want` (default: this
    machine's), by the rules in the module doc. Raises PlatformError."""
    want = (want or machine_platform()).normalized()
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise PlatformError("lists no manifests")
    images = [m for m in manifests if _is_image_entry(m)]
    if not images:
        raise PlatformError(f"{len(manifests)} entries and none is an image (only attestations)")
    best: tuple[int, dict] | None = None
    for desc in images:
        have = Platform.from_descriptor(desc)
        rank = _rank(have, want) if have is not None else None
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, desc)
    if best is not None:
        return best[1]
    if len(images) == 1 and Platform.from_descriptor(images[0]) is None:
        return images[0]
    n = len(images)
    plats = ", ".join(sorted({describe(m) for m in images}))
    raise PlatformError(f"{n} manifest{'s' if n != 1 else ''} and none for {want} ({plats})")
