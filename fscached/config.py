"""Daemon configuration: a TOML file, then command-line flags on top."""
from __future__ import annotations

import argparse
import math
import re
import ssl
import tomllib
from urllib.parse import urlsplit
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fscached.util.ids import FSID

# fsid and domain_id travel in mount options and cachefiles volume keys: no ',', '/', '='.
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem, worded for the user: one line naming the key and why."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")))


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, exit code 2) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


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


@dataclass(frozen=True)
class ProfileSpec:
    """An image's start-up profile keys (erofs_image.profile): record the blob ranges read in the
    first `record_seconds` after the mount (image key `record_profile`; 0: no recording); replay
    `replay` (image key `profile`): "auto" (the registry's profile of a `ref=` image, when it has
    one), "none", or a profile file's path.

    Kept beside the ImageSpec, not in it: the hand-over state (fscached.lifecycle.state) carries every
    ImageSpec field, and a successor taking over mounted images neither records (a recording
    is one process's) nor needs a replay."""

    record_seconds: float = 0.0
    replay: str = "auto"


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
    kernel_path: str = "auto"  # auto | cachefiles | fanotify (fscached.kernel_path)
    # bytes the cache dir may hold (allocated blocks); past it, unused blobs are culled (LRU)
    cache_budget: int | None = None
    # cachefiles: free-space limits for blocks, in percent (None: the kernel's 7 / 5 / 1)
    brun: int | None = None
    bcull: int | None = None
    bstop: int | None = None
    # (volume, fsid) -> the image's start-up profile keys, for images that set one
    profiles: dict[tuple[str, str], ProfileSpec] = field(default_factory=dict)

    def profile_of(self, spec: ImageSpec) -> ProfileSpec:
        return self.profiles.get((spec.volume, spec.fsid), ProfileSpec())


def check_id(kind: str, value: str, where: str | None = None) -> str:
    if not FSID.fullmatch(value):
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}invalid {kind} {value!r}: use 1-128 letters, digits, '_', '.', ':' or '-'"
        )
    return value


def parse_image_spec(text: str) -> ImageSpec:
    """`fsid=F,bootstrap=PATH,blobs=DIR[,domain=D]` (the --image flag)."""
    return parse_image_flag(text)[0]


def parse_image_flag(text: str) -> tuple[ImageSpec, ProfileSpec]:
    """The --image flag: the image, and its start-up profile keys."""
    if any(part.partition("=")[0].strip() == "auth" for part in text.split(",")):
        # refused before anything else: no message may echo the flag, which holds the secret
        raise ConfigError("--image: auth= on the command line is visible to every local user (ps, /proc): put "
                          "the base64 user:password in a file of mode 0600 and give auth_file=PATH (or auth in the "
                          "config file)")
    where = f"--image {text!r}"
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ConfigError(f"invalid --image {text!r}: expected key=value pairs, got {part!r}")
        key = key.strip()
        if key in fields:
            raise ConfigError(f"{where}: {key or repr(key)} is given twice")
        fields[key] = value.strip()
    return image_and_profile(fields, where)


IMAGE_KEYS = {
    "fsid", "bootstrap", "blobs", "domain", "ref", "registry", "scheme", "auth", "auth_file",
    "ca_file", "skip_verify", "dragonfly", "proxy", "ping_url", "check_interval", "fallback",
    "use_http", "prefetch", "prefetch_bandwidth", "timeout", "mountpoint", "record_profile", "profile",
}
# Keys whose value is text in a TOML table (the others may also be numbers or booleans there).
STRING_KEYS = IMAGE_KEYS - {"skip_verify", "check_interval", "fallback", "use_http",
                            "prefetch_bandwidth", "timeout", "record_profile"}
# Keys that only mean something with a registry (ref or registry), or with a proxy.
REGISTRY_KEYS = ("scheme", "auth", "auth_file", "ca_file", "skip_verify", "timeout")
PROXY_KEYS = ("ping_url", "check_interval", "fallback", "use_http")


def check_value_types(where: str, values: dict[str, Any], string_keys: set[str]) -> None:
    """TOML gives typed values: a table, a list, a date or a wrongly typed value is named."""
    for key, value in values.items():
        if key in string_keys:
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {key} must be a string, not {value!r}")
        elif not isinstance(value, (str, int, float)):  # bool is an int
            raise ConfigError(f"{where}: {key} must be a single value, not {value!r}")
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{where}: {key} is empty")


def parse_bool(where: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: {key} must be true or false, not {value!r}")


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMG]?)(?:I?B)?")


def parse_size(where: str, key: str, value: Any) -> int:
    """123, "64K", "1M", "2G" (also "64KiB", "1MB") -> bytes; never negative."""
    if isinstance(value, bool):
        value = repr(value)  # not a size: refused below
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where}: {key} must be a size of 0 or more, like 64K or 20M, not {value!r}")
        return value
    text = str(value).strip().upper()
    m = _SIZE.fullmatch(text)
    if not m:
        if text.startswith("-"):
            raise ConfigError(f"{where}: {key} must be a size of 0 or more, like 64K or 20M, not {value!r}")
        raise ConfigError(f"{where}: {key} must be a size like 1048576, 64K or 20M, not {value!r}")
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number = m.group(1)
    if "." in number:
        return int(float(number) * units[m.group(2)])
    return int(number) * units[m.group(2)]


def parse_seconds(where: str, key: str, value: Any, allow_zero: bool = False) -> float:
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        kind = "a number of seconds, 0 or more" if allow_zero else "a positive number of seconds"
        raise ConfigError(f"{where}: {key} must be {kind}, not {value!r}")
    return seconds


def split_repository(where: str, value: str, key: str = "registry") -> tuple[str, str]:
    """`host[:port]/repository`, both checked as the registry source will use them."""
    from fetcher.image_ref import _REPO_RE, _check_host  # the grammar RegistrySource checks too

    if "://" in value:
        raise ConfigError(f"{where}: {key} must be host[:port]/repository without a scheme "
                          f"(use scheme=http for a plain-HTTP registry), not {value!r}")
    host, sep, repo = value.partition("/")
    repo = repo.strip("/")
    if not sep or not host or not repo:
        raise ConfigError(f"{where}: {key} must be host[:port]/repository, not {value!r}")
    try:
        _check_host(host, value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None
    if not _REPO_RE.fullmatch(repo) or len(host) + 1 + len(repo) > 255:
        raise ConfigError(f"{where}: {key}: invalid repository name {repo[:200]!r}: lowercase letters, "
                          "digits and separators ('.', '_', '__', '-') in '/'-separated components, "
                          "at most 255 characters with the host")
    return host, repo


def parse_url(where: str, key: str, value: str) -> str:
    """An http(s)://host[:port] URL (the proxy, its ping url); userinfo is never echoed."""
    shown = repr(value) if "@" not in value else "(a URL with credentials)"
    try:
        url = urlsplit(value)
        _ = url.port  # raises ValueError on a bad port
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{where}: {key} must be an http:// or https:// URL with a host, not {shown}")
    return value


def read_auth_file(where: str, value: str) -> str:

    try:
        auth = Path(value).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: auth_file {value!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: auth_file {value!r}: not text (expected base64 of 'user:password')") from None
    if not auth:
        raise ConfigError(f"{where}: auth_file {value!r} is empty (expected base64 of 'user:password')")
    check_auth(where, f"auth_file {value!r}", auth)
    return auth


def check_auth(where: str, what: str, auth: str) -> None:
    from fetcher.auth import make_credentials

    try:
        make_credentials(auth=auth)
    except ValueError:  # the message never holds the secret
        raise ConfigError(f"{where}: {what}: not base64 of 'user:password'") from None


def check_ca_file(where: str, value: str) -> str:
    """Loaded as the registry source will load it (local files only: no network)."""
    try:
        ssl.create_default_context(cafile=value)
    except OSError as exc:
        raise ConfigError(f"{where}: ca_file {value!r}: {exc.strerror or exc}") from None
    except ssl.SSLError:
        raise ConfigError(f"{where}: ca_file {value!r}: no PEM certificate could be loaded from it") from None
    return value


def image_from_mapping(fields: dict[str, Any], where: str) -> ImageSpec:
    return image_and_profile(fields, where)[0]


def image_and_profile(fields: dict[str, Any], where: str) -> tuple[ImageSpec, ProfileSpec]:
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: must be a table of key = value, not {fields!r}")
    unknown = set(fields) - IMAGE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(repr(k) if not k else k for k in sorted(unknown))}")
    check_value_types(where, fields, STRING_KEYS)
    if not fields.get("fsid"):
        raise ConfigError(f"{where}: missing fsid")
    fsid = check_id("fsid", fields["fsid"], where)
    domain = check_id("domain", fields["domain"], where) if fields.get("domain") else None
    ref = fields.get("ref")
    if not fields.get("bootstrap") and not ref:
        raise ConfigError(f"{where}: missing bootstrap (a path) or ref (an image in a registry)")
    bootstrap = Path(fields["bootstrap"]).resolve() if fields.get("bootstrap") else None
    if fields.get("blobs"):
        blobs: Path | None = Path(fields["blobs"]).resolve()
    elif bootstrap is not None and not ref and not fields.get("registry"):
        blobs = bootstrap.parent / "blobs"
    else:
        blobs = None
    registry = None
    repository = fields.get("registry")
    if repository:
        split_repository(where, repository)
    if ref:
        from fetcher.image_ref import parse_image_ref  # the one parser of image references

        try:
            parsed = parse_image_ref(ref)
        except ValueError as exc:
            raise ConfigError(f"{where}: ref: {exc}") from None
        repository = repository or f"{parsed.host}/{parsed.repo}"
    # Every value is checked, also one that would go unused.
    scheme = str(fields.get("scheme", "https"))
    if scheme not in ("http", "https"):
        raise ConfigError(f"{where}: scheme must be http or https, not {scheme!r}")
    if fields.get("auth") and fields.get("auth_file"):
        raise ConfigError(f"{where}: auth and auth_file both given: give one")
    if fields.get("auth"):
        check_auth(where, "auth", str(fields["auth"]))
    auth = read_auth_file(where, fields["auth_file"]) if fields.get("auth_file") else fields.get("auth")
    ca_file = check_ca_file(where, fields["ca_file"]) if fields.get("ca_file") else None
    skip_verify = parse_bool(where, "skip_verify", fields.get("skip_verify", False))
    timeout = parse_seconds(where, "timeout", fields.get("timeout", 60))
    proxy_url = parse_url(where, "proxy", fields["proxy"]) if fields.get("proxy") else None
    ping_url = parse_url(where, "ping_url", fields["ping_url"]) if fields.get("ping_url") else None
    # without a ping url, check_interval is how long a failed proxy is skipped: 0 is allowed
    check_interval = parse_seconds(where, "check_interval", fields.get("check_interval", 5),
                                   allow_zero=ping_url is None)
    fallback = parse_bool(where, "fallback", fields.get("fallback", True))
    use_http = parse_bool(where, "use_http", fields.get("use_http", False))
    mode = str(fields.get("prefetch", "none"))
    if mode not in ("none", "table", "all"):
        raise ConfigError(f"{where}: prefetch must be none, table or all, not {mode!r}")
    bandwidth = parse_size(where, "prefetch_bandwidth", fields.get("prefetch_bandwidth", 0))
    mountpoint = parse_mountpoint(where, fields.get("mountpoint"))
    profile = ProfileSpec(
        parse_record_seconds(where, fields["record_profile"]) if "record_profile" in fields else 0.0,
        parse_profile(where, fields.get("profile", "auto")))
    if not repository:
        given = [key for key in REGISTRY_KEYS if key in fields]
        if given:
            raise ConfigError(f"{where}: {', '.join(given)} set for a registry, but there is none: "
                              "give ref or registry too")
    if proxy_url is None:
        given = [key for key in PROXY_KEYS if key in fields]
        if given:
            raise ConfigError(f"{where}: {', '.join(given)} set for a Dragonfly proxy, but there is none: "
                              "give proxy too")
    if repository:
        host, repo = split_repository(where, repository)
        registry = RegistrySpec(host, repo, scheme, auth, ca_file, skip_verify, timeout)
    proxy = ProxySpec(proxy_url, ping_url, check_interval, fallback, use_http) if proxy_url else None
    if (proxy or fields.get("dragonfly")) and registry is None:
        raise ConfigError(f"{where}: a Dragonfly peer fetches from a registry: give ref or registry too")
    if blobs is None and registry is None:
        raise ConfigError(f"{where}: no blob source: give blobs (a directory) or ref / registry")
    return ImageSpec(
        fsid=fsid,
        bootstrap=bootstrap,
        blobs=blobs,
        domain=domain,
        ref=ref,
        registry=registry,
        dragonfly_socket=Path(fields["dragonfly"]) if fields.get("dragonfly") else None,
        proxy=proxy,
        prefetch=PrefetchSpec(mode, bandwidth),
        mountpoint=mountpoint,
    ), profile


MAX_RECORD_SECONDS = 24 * 3600.0


def parse_record_seconds(where: str, value: Any) -> float:
    """`record_profile`: seconds after the mount to record (> 0, at most a day)."""
    seconds = parse_seconds(where, "record_profile", value)
    if seconds > MAX_RECORD_SECONDS:
        raise ConfigError(f"{where}: record_profile must be at most {MAX_RECORD_SECONDS:.0f} seconds, not {value!r}")
    return seconds


def parse_profile(where: str, value: Any) -> str:
    """`profile`: "auto", "none" or a profile file's path (made absolute; whether it is a good
    profile is only checked when the image is added: a bad one is skipped with a warning)."""
    text = str(value).strip()
    if text in ("auto", "none"):
        return text
    if not text or "\n" in text or "\0" in text:
        raise ConfigError(f"{where}: profile must be auto, none or a file path, not {value!r}")
    return str(Path(text).resolve())


def parse_mountpoint(where: str, value: Any) -> Path | None:
    if not value:
        return None
    path = Path(str(value)).resolve()
    if "," in str(path) or "\n" in str(path):
        raise ConfigError(f"{where}: mountpoint {value!r} cannot contain ',' or a newline")
    if path == Path("/"):
        raise ConfigError(f"{where}: mountpoint {value!r} is the root directory")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where}: mountpoint {value!r} is not a directory")
    return path


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


FILE_KEYS = {"cache_dir", "tag", "log_level", "image", "ready_file", "stats_file", "device", "work_dir",
             "read_window", "kernel_path", "backend", "cache_budget", "brun", "bcull", "bstop"}
SPACE_LIMIT_KEYS = ("brun", "bcull", "bstop")
KERNEL_SPACE_LIMITS = {"brun": 7, "bcull": 5, "bstop": 1}  # cachefiles' defaults


def parse_cache_budget(where: str, value: Any) -> int | None:
    """A size like "10G"; 0 means no budget."""
    size = parse_size(where, "cache_budget", value)
    if 0 < size < 1 << 20:
        raise ConfigError(f"{where}: cache_budget {value!r} is below 1M: give a size like 10G (0: no budget)")
    return size or None


def parse_space_limits(where: str, values: dict[str, Any]) -> dict[str, int | None]:
    """brun / bcull / bstop: whole percentages of the cache filesystem free (10 or "10%"),
    0 <= bstop < bcull < brun < 100 counting the kernel's 7 / 5 / 1 for the ones not given."""
    out: dict[str, int | None] = {}
    for key in SPACE_LIMIT_KEYS:
        value = values.get(key)
        if value is None:
            out[key] = None
            continue
        text = str(value).strip()
        text = text[:-1].strip() if text.endswith("%") else text
        if isinstance(value, bool) or isinstance(value, float) or not text.isdigit() or int(text) > 99:
            raise ConfigError(f"{where}: {key} must be a whole percentage 0-99 (like 10 or \"10%\"), not {value!r}")
        out[key] = int(text)
    if any(v is not None for v in out.values()):
        run, cull, stop = (KERNEL_SPACE_LIMITS[k] if out[k] is None else out[k] for k in SPACE_LIMIT_KEYS)
        assert run is not None and cull is not None and stop is not None
        if not stop < cull < run:
            raise ConfigError(f"{where}: brun/bcull/bstop {run}/{cull}/{stop}% (the kernel's 7/5/1 for those not "
                              "given): cachefiles wants 0 <= bstop < bcull < brun < 100")
    return out


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
    kernel_path: str | None = None,
) -> Config:
    """Merge the file's values with flags (flags win; images from both are served)."""
    unknown = set(file_values) - FILE_KEYS
    if unknown:
        raise ConfigError(f"config file: unknown key(s) {', '.join(sorted(unknown))}")
    tables = file_values.get("image", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("config file: image must be [[image]] tables (an array of tables), "
                          f"not {tables!r}")
    check_value_types("config file", {k: v for k, v in file_values.items() if k != "image"},
                      FILE_KEYS - {"image", "read_window", "cache_budget", *SPACE_LIMIT_KEYS})
    chosen_cache_dir = cache_dir or file_values.get("cache_dir")
    if not chosen_cache_dir:
        raise ConfigError("no cache directory: pass --cache-dir or set cache_dir in the config file")
    level = (log_level or file_values.get("log_level") or "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"invalid log level {level!r}: use one of {', '.join(LOG_LEVELS)}")
    chosen_tag = tag or file_values.get("tag")
    if chosen_tag is not None:
        check_id("tag", str(chosen_tag))
    parsed = [image_and_profile(entry, f"config file [[image]] #{n + 1}") for n, entry in enumerate(tables)]
    parsed += [parse_image_flag(spec) for spec in image_specs]
    images = [image for image, _ in parsed]
    check_unique(images)
    profiles = {(image.volume, image.fsid): profile for image, profile in parsed if profile != ProfileSpec()}
    if file_values.get("kernel_path") is not None and file_values.get("backend") is not None:
        raise ConfigError("config file: kernel_path and backend (its older name) both given: give one")
    chosen = str(kernel_path or file_values.get("kernel_path") or file_values.get("backend") or "auto")
    if chosen not in ("auto", "cachefiles", "fanotify"):
        raise ConfigError(f"invalid kernel path (--kernel-path, formerly --backend) {chosen!r}: use auto, cachefiles "
                          "or fanotify")
    ready = ready_file or file_values.get("ready_file")
    stats = stats_file or file_values.get("stats_file")
    if read_window:
        window = check_window("--read-window", parse_size("--read-window", "read window", read_window))
    elif "read_window" in file_values:
        window = check_window("config file: read_window",
                              parse_size("config file", "read_window", file_values["read_window"]))
    else:
        window = 1 << 20
    budget = parse_cache_budget("config file", file_values["cache_budget"]) if "cache_budget" in file_values else None
    limits = parse_space_limits("config file", file_values)
    return Config(
        cache_dir=Path(str(chosen_cache_dir)).resolve(),
        tag=str(chosen_tag) if chosen_tag else None,
        log_level=level,
        images=images,
        ready_file=Path(ready) if ready else None,
        stats_file=Path(stats) if stats else None,
        device=Path(device or file_values.get("device") or "/dev/cachefiles"),
        work_dir=Path(str(work_dir or file_values.get("work_dir") or "/var/lib/fscached")).resolve(),
        kernel_path=chosen,
        read_window=window,
        cache_budget=budget,
        brun=limits["brun"],
        bcull=limits["bcull"],
        bstop=limits["bstop"],
        profiles=profiles,
    )


def check_window(where: str, size: int) -> int:
    if size < 4096 or size & (size - 1):
        raise ConfigError(f"{where}: read window {size} must be a power of two of at least 4096 bytes")
    return size


def check_unique(images: list[ImageSpec]) -> None:
    """The kernel looks an image up by (volume, fsid): two specs must never collide; nor may two
    images be mounted on one directory."""
    seen: set[tuple[str, str]] = set()
    mounted: dict[Path, str] = {}
    for image in images:
        key = (image.volume, image.fsid)
        if key in seen:
            where = f"domain {image.domain}" if image.domain else "no domain"
            raise ConfigError(f"image fsid {image.fsid!r} is configured twice ({where})")
        seen.add(key)
        if image.mountpoint is not None:
            other = mounted.setdefault(image.mountpoint, image.fsid)
            if other != image.fsid:
                raise ConfigError(f"images {other!r} and {image.fsid!r} have the same mountpoint {str(image.mountpoint)!r}")
