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
class RegistrySpec:
    host: str
    repo: str
    scheme: str = "https"
    auth: str | None = field(default=None, repr=False)  # base64 "user:pass", never logged
    ca_file: str | None = None
    skip_verify: bool = False
    timeout: float = 60.0  # seconds for one request (a stalled registry fails over after it)


@dataclass(frozen=True)
class ProxySpec:
    url: str
    ping_url: str | None = None
    check_interval: float = 5.0
    fallback: bool = True
    use_http: bool = False


@dataclass(frozen=True)
class PrefetchSpec:
    mode: str = "none"  # none | table (the bootstrap's prefetch list) | all (table, then the rest)
    bandwidth: int = 0  # bytes per second, 0 = unlimited


@dataclass(frozen=True)
class ImageSpec:
    fsid: str
    bootstrap: Path | None
    blobs: Path | None
    domain: str | None = None
    ref: str | None = None  # host/repo:tag or @sha256:..: pull the bootstrap, fetch blobs there
    registry: RegistrySpec | None = None
    dragonfly_socket: Path | None = None
    proxy: ProxySpec | None = None
    prefetch: PrefetchSpec = PrefetchSpec()
    mountpoint: Path | None = None  # the daemon mounts the image there once it can serve it

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
    work_dir: Path = Path("/var/lib/fscached")  # pulled bootstraps
    read_window: int = 1 << 20
    backend: str = "auto"  # auto | cachefiles | fanotify


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


IMAGE_KEYS = {
    "fsid", "bootstrap", "blobs", "domain", "ref", "registry", "scheme", "auth", "auth_file",
    "ca_file", "skip_verify", "dragonfly", "proxy", "ping_url", "check_interval", "fallback",
    "use_http", "prefetch", "prefetch_bandwidth", "timeout", "mountpoint",
}


def parse_bool(where: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: {key} must be true or false, not {value!r}")


def parse_size(where: str, key: str, value: Any) -> int:
    """123, "64K", "1M", "2G" -> bytes."""
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise ConfigError(f"{where}: {key} must be a size like 1048576, 64K or 20M, not {value!r}") from None


def parse_seconds(where: str, key: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"{where}: {key} must be a positive number of seconds, not {value!r}")
    return seconds


def split_repository(where: str, value: str) -> tuple[str, str]:
    host, sep, repo = value.partition("/")
    if not sep or not host or not repo:
        raise ConfigError(f"{where}: registry must be host[:port]/repository, not {value!r}")
    return host, repo


def image_from_mapping(fields: dict[str, Any], where: str) -> ImageSpec:
    unknown = set(fields) - IMAGE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    if not fields.get("fsid"):
        raise ConfigError(f"{where}: missing fsid")
    ref = str(fields["ref"]) if fields.get("ref") else None
    if not fields.get("bootstrap") and not ref:
        raise ConfigError(f"{where}: missing bootstrap (a path) or ref (an image in a registry)")
    bootstrap = Path(str(fields["bootstrap"])).resolve() if fields.get("bootstrap") else None
    if fields.get("blobs"):
        blobs: Path | None = Path(str(fields["blobs"])).resolve()
    elif bootstrap is not None and not ref and not fields.get("registry"):
        blobs = bootstrap.parent / "blobs"
    else:
        blobs = None
    domain = fields.get("domain")
    registry = None
    repository = fields.get("registry")
    if ref:
        from fetcher.image_ref import parse_image_ref  # the one parser of image references

        try:
            parsed = parse_image_ref(ref)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        repository = repository or f"{parsed.host}/{parsed.repo}"
    if repository:
        host, repo = split_repository(where, str(repository))
        scheme = str(fields.get("scheme", "https"))
        if scheme not in ("http", "https"):
            raise ConfigError(f"{where}: scheme must be http or https, not {scheme!r}")
        auth = fields.get("auth")
        if fields.get("auth_file"):
            try:
                auth = Path(str(fields["auth_file"])).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{where}: auth_file {fields['auth_file']}: {exc.strerror}") from None
        registry = RegistrySpec(host, repo, scheme, str(auth) if auth else None,
                                str(fields["ca_file"]) if fields.get("ca_file") else None,
                                parse_bool(where, "skip_verify", fields.get("skip_verify", False)),
                                parse_seconds(where, "timeout", fields.get("timeout", 60)))
    proxy = None
    if fields.get("proxy"):
        proxy = ProxySpec(
            str(fields["proxy"]),
            str(fields["ping_url"]) if fields.get("ping_url") else None,
            float(fields.get("check_interval", 5)),
            parse_bool(where, "fallback", fields.get("fallback", True)),
            parse_bool(where, "use_http", fields.get("use_http", False)),
        )
    if (proxy or fields.get("dragonfly")) and registry is None:
        raise ConfigError(f"{where}: a Dragonfly peer fetches from a registry: give ref or registry too")
    if blobs is None and registry is None:
        raise ConfigError(f"{where}: no blob source: give blobs (a directory) or ref / registry")
    mode = str(fields.get("prefetch", "none"))
    if mode not in ("none", "table", "all"):
        raise ConfigError(f"{where}: prefetch must be none, table or all, not {mode!r}")
    return ImageSpec(
        fsid=check_id("fsid", str(fields["fsid"])),
        bootstrap=bootstrap,
        blobs=blobs,
        domain=check_id("domain", str(domain)) if domain else None,
        ref=ref,
        registry=registry,
        dragonfly_socket=Path(str(fields["dragonfly"])) if fields.get("dragonfly") else None,
        proxy=proxy,
        prefetch=PrefetchSpec(mode, parse_size(where, "prefetch_bandwidth", fields.get("prefetch_bandwidth", 0))),
        mountpoint=parse_mountpoint(where, fields.get("mountpoint")),
    )


def parse_mountpoint(where: str, value: Any) -> Path | None:
    if not value:
        return None
    path = Path(str(value)).resolve()
    if "," in str(path) or "\n" in str(path):
        raise ConfigError(f"{where}: mountpoint {value!r} cannot contain ',' or a newline")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}: mountpoint {value!r} is not a directory")
    return path


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
    work_dir: str | None = None,
    read_window: str | None = None,
    backend: str | None = None,
) -> Config:
    """Merge the file's values with flags (flags win; images from both are served)."""
    unknown = set(file_values) - {"cache_dir", "tag", "log_level", "image", "ready_file", "stats_file",
                                  "device", "work_dir", "read_window", "backend"}
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
    chosen_backend = str(backend or file_values.get("backend") or "auto")
    if chosen_backend not in ("auto", "cachefiles", "fanotify"):
        raise ConfigError(f"invalid backend {chosen_backend!r}: use auto, cachefiles or fanotify")
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
        work_dir=Path(str(work_dir or file_values.get("work_dir") or "/var/lib/fscached")).resolve(),
        backend=chosen_backend,
        read_window=check_window(parse_size("read window", "read_window", read_window or file_values.get("read_window") or (1 << 20))),
    )


def check_window(size: int) -> int:
    if size < 4096 or size & (size - 1):
        raise ConfigError(f"read window {size} must be a power of two of at least 4096 bytes")
    return size


def check_unique(images: list[ImageSpec]) -> None:
    """The kernel looks an image up by (volume, fsid): two specs must never collide."""
    seen: set[tuple[str, str]] = set()
    for image in images:
        key = (image.volume, image.fsid)
        if key in seen:
            where = f"domain {image.domain}" if image.domain else "no domain"
            raise ConfigError(f"image fsid {image.fsid!r} is configured twice ({where})")
        seen.add(key)
