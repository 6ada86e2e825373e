"""Daemon configuration: a TOML file, then command-line flags on top."""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# fsid and domain_id travel in mount options and cachefiles volume keys: no ',', '/', '='.
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem, worded for the user."""


@dataclass(frozen=True)
class ImageSpec:
    fsid: str
    bootstrap: Path
    blobs: Path
    domain: str | None = None

    @property
    def volume(self) -> str:
        """The part of the cachefiles volume key after "erofs,"."""
        return self.domain or self.fsid


@dataclass
class Config:
    cache_dir: Path
    tag: str | None = None
    log_level: str = "info"
    images: list[ImageSpec] = field(default_factory=list)
    ready_file: Path | None = None
    stats_file: Path | None = None
    device: Path = Path("/dev/cachefiles")


def check_id(kind: str, value: str) -> str:
    if not _ID.fullmatch(value):
        raise ConfigError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '.', ':' or '-'"
        )
    return value


def parse_image_spec(text: str) -> ImageSpec:
    """`fsid=F,bootstrap=PATH,blobs=DIR[,domain=D]` (the --image flag)."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ConfigError(f"invalid --image {text!r}: expected key=value pairs, got {part!r}")
        fields[key.strip()] = value.strip()
    return image_from_mapping(fields, f"--image {text!r}")


def image_from_mapping(fields: dict[str, Any], where: str) -> ImageSpec:
    unknown = set(fields) - {"fsid", "bootstrap", "blobs", "domain"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("fsid", "bootstrap"):
        if not fields.get(key):
            raise ConfigError(f"{where}: missing {key}")
    bootstrap = Path(str(fields["bootstrap"])).resolve()
    blobs = Path(str(fields.get("blobs") or bootstrap.parent / "blobs")).resolve()
    domain = fields.get("domain")
    return ImageSpec(
        fsid=check_id("fsid", str(fields["fsid"])),
        bootstrap=bootstrap,
        blobs=blobs,
        domain=check_id("domain", str(domain)) if domain else None,
    )


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def build_config(
    file_values: dict[str, Any],
    cache_dir: str | None,
    tag: str | None,
    log_level: str | None,
    image_specs: list[str],
    ready_file: str | None,
    stats_file: str | None,
    device: str | None,
) -> Config:
    """Merge the file's values with flags (flags win; images from both are served)."""
    unknown = set(file_values) - {"cache_dir", "tag", "log_level", "image", "ready_file", "stats_file", "device"}
    if unknown:
        raise ConfigError(f"config file: unknown key(s) {', '.join(sorted(unknown))}")
    chosen_cache_dir = cache_dir or file_values.get("cache_dir")
    if not chosen_cache_dir:
        raise ConfigError("no cache directory: pass --cache-dir or set cache_dir in the config file")
    level = (log_level or file_values.get("log_level") or "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"invalid log level {level!r}: use one of {', '.join(LOG_LEVELS)}")
    chosen_tag = tag or file_values.get("tag")
    if chosen_tag is not None:
        check_id("tag", str(chosen_tag))
    images = [
        image_from_mapping(entry, f"config file [[image]] #{n + 1}")
        for n, entry in enumerate(file_values.get("image", []))
    ]
    images += [parse_image_spec(spec) for spec in image_specs]
    check_unique(images)
    ready = ready_file or file_values.get("ready_file")
    stats = stats_file or file_values.get("stats_file")
    return Config(
        cache_dir=Path(str(chosen_cache_dir)).resolve(),
        tag=str(chosen_tag) if chosen_tag else None,
        log_level=level,
        images=images,
        ready_file=Path(ready) if ready else None,
        stats_file=Path(stats) if stats else None,
        device=Path(device or file_values.get("device") or "/dev/cachefiles"),
    )


def check_unique(images: list[ImageSpec]) -> None:
    """The kernel looks an image up by (volume, fsid): two specs must never collide."""
    seen: set[tuple[str, str]] = set()
    for image in images:
        key = (image.volume, image.fsid)
        if key in seen:
            where = f"domain {image.domain}" if image.domain else "no domain"
            raise ConfigError(f"image fsid {image.fsid!r} is configured twice ({where})")
        seen.add(key)
