"""nydusd bind entries (`PUT /api/v2/blobs`) -> fscached's `ImageSpec`.

nydus-snapshotter (fscache driver) registers each image with a JSON "blob cache entry":

    {"type": "bootstrap", "id": "<fscache id>", "domain_id": "<domain or the id>",
     "config": {...legacy...}}            or        "config_v2": {...}

Both forms are read here, with the rules nydusd applies to them (refused: 400, `BadBind`; a
backend fscached cannot fetch from: 501, `UnsupportedBind`). The metadata file (the bootstrap)
is checked here too, before anything is registered or mounted. No message ever holds a
credential: they name the field, never its value.

fscached's own extensions (top-level fields of the entry):
- `"mountpoint": "/dir"`: the daemon mounts the image there itself (the image key
  `mountpoint=`), on either kernel path;
- `"ref": "host[:port]/repo:tag"` (or `@sha256:...`) instead of `metadata_path`: the daemon
  pulls the bootstrap from the registry (checked against its digest, then as any bootstrap);
  the registry backend's host and repo default to the reference's;
- `"record_profile": SECONDS` (a number > 0): record the image's start-up profile, the blob
  ranges read in the first SECONDS after the mount, into `<work_dir>/profiles/<id>.json` (the
  image key `record_profile=`, fscached.core.profile_recorder);
- `"profile": "auto" | "none" | "/path/to/profile.json"`: the start-up profile to replay at the
  mount (the image key `profile=`; default "auto": the registry's profile of a `ref` image). A
  profile that cannot be used is skipped with a warning: it never fails the bind.
- `"dragonfly": "/path/to/dfdaemon.sock"`: the node's Dragonfly peer, its gRPC unix socket (the
  image key `dragonfly=`): blobs of the registry backend are fetched through it first, then
  from the registry. nydusd itself only knows the HTTP proxy (the registry backend's `proxy`),
  which works here too.

Mapping (legacy `config.` / v2 `config_v2.`):

| nydusd field                                   | fscached                                  |
|------------------------------------------------|-------------------------------------------|
| entry `id`                                     | `fsid`                                    |
| entry `domain_id` (none when "" or == id)      | `domain`                                  |
| `metadata_path`                                | `bootstrap` (a RAFS v6 file, checked)     |
| `backend_type`/`backend.type` "localfs": `dir` | `blobs` (the blob directory)              |
| localfs `blob_file`                            | `blobs`: its directory when named by the  |
|                                                | blob id, else a link `<work_dir>/fscached-blobs/<blob id>` |
| "registry": `host`, `repo`                     | `registry` (RegistrySpec host, repo)      |
| registry `scheme`, `auth`, `skip_verify`,      | RegistrySpec `scheme`, `auth`,            |
| `timeout`, `ca_cert_files[0]`                  | `skip_verify`, `timeout`, `ca_file`       |
| registry `proxy.url`, `ping_url`,              | ProxySpec `url`, `ping_url`,              |
| `check_interval`, `fallback`, `use_http`       | `check_interval`, `fallback`, `use_http`  |
| `prefetch_config.enable` + `prefetch_all`      | PrefetchSpec mode "all" (enable alone: "table") |
| `prefetch_config.bandwidth_rate` / v2 `bandwidth_limit` | PrefetchSpec `bandwidth` (bytes/s) |
| "oss", "s3"                                    | refused: 501                              |
| registry `registry_token`                      | sent as `Bearer` until the registry refuses it (then `auth` gets a new token) |
| `mirrors`, `blob_url_scheme`, `blob_redirected_host`, `connect_timeout`, `retry_limit`, `merging_size`, `threads_count` (checked), `readahead` | not used (logged once per bind when set) |
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fscached.config import (
    ConfigError, ImageSpec, PrefetchSpec, ProfileSpec, ProxySpec, RegistrySpec, check_auth, check_ca_file, check_id,
    parse_bool, parse_mountpoint, parse_profile, parse_record_seconds, parse_seconds, parse_url, split_repository,
)

if TYPE_CHECKING:
    from erofs_image.index import BootstrapIndex
    from erofs_image.reader import Bootstrap

log = logging.getLogger("fscached.api")

BOOTSTRAP_TYPE = "bootstrap"
DATA_BLOB_TYPE = "datablob"
RAFS_V5_MAGIC = 0x52414653  # little-endian u32 at offset 0 of a RAFS v5 bootstrap
LINK_DIR = "fscached-blobs"
MAX_THREADS = 1024


class BindError(Exception):
    """A bind entry that cannot be served; `status` is the HTTP status to answer with."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")))


class BadBind(BindError):
    """The entry breaks a rule (nydusd's, or the kernel's grammar for ids): 400."""


class UnsupportedBind(BindError):
    """A valid entry fscached cannot serve (an oss / s3 backend, a data-blob entry): 501."""

    status = 501
    code = "UNSUPPORTED"


@dataclass
class BindRequest:
    """A parsed bind entry: the image to serve, and what was given but is not used."""

    spec: ImageSpec
    form: str  # "config" (legacy) or "config_v2"
    ignored: list[str] = field(default_factory=list)  # field names only, never values
    registry_token: str | None = field(default=None, repr=False)  # a bearer token: never shown
    profile: ProfileSpec = field(default_factory=ProfileSpec)  # fscached's record_profile / profile fields
    bootstrap: Bootstrap | BootstrapIndex | None = field(default=None, repr=False)  # the checked bootstrap, parsed


def check_entry_id(kind: str, value: Any) -> str:
    """nydusd's rules for `id` / `domain_id` (no "/", "..", NUL), then the kernel's grammar
    (they travel in mount options and cachefiles volume keys)."""
    if not isinstance(value, str):
        raise BadBind(f"blob_cache: `{kind}` must be a string, not {type(value).__name__}")
    for bad, what in (("/", "'/'"), ("..", "'..'"), ("\0", "NUL")):
        if bad in value:
            raise BadBind(f"blob_cache: `{kind}` {value[:80]!r} is invalid: it contains {what}")
    try:
        return check_id(kind, value)
    except ConfigError as exc:
        raise BadBind(f"blob_cache: {exc}") from None


def parse_bind_entry(entry: Any, *, check_files: bool = True) -> BindRequest:
    """The whole entry -> BindRequest. With `check_files` (the daemon's case) the metadata file
    is validated as a bootstrap and a localfs `blob_file` is linked in place; without, only the
    JSON is checked (unit tests of the mapping)."""
    if not isinstance(entry, dict):
        raise BadBind("blob_cache: the bind entry must be a JSON object")
    blob_type = entry.get("type", BOOTSTRAP_TYPE)
    if blob_type == DATA_BLOB_TYPE:
        raise UnsupportedBind("blob_cache: data blob entries (type \"datablob\") are not supported: "
                              "bind the image's bootstrap (type \"bootstrap\"), its data blobs follow")
    if blob_type != BOOTSTRAP_TYPE:
        raise BadBind(f"blob_cache: invalid blob cache entry type {str(blob_type)[:40]!r}: expected \"bootstrap\"")
    if not entry.get("id"):
        raise BadBind("blob_cache: `id` of the bind entry is missing or empty")
    fsid = check_entry_id("id", entry["id"])
    domain_id = entry.get("domain_id") or ""
    domain = check_entry_id("domain_id", domain_id) if domain_id and domain_id != fsid else None
    mountpoint = None
    if entry.get("mountpoint"):
        if not isinstance(entry["mountpoint"], str):
            raise BadBind("mountpoint must be a string (an absolute directory path)")
        if not os.path.isabs(entry["mountpoint"]):
            raise BadBind(f"mountpoint {entry['mountpoint'][:200]!r} must be an absolute path")
        try:
            mountpoint = parse_mountpoint(f"image {fsid}", entry["mountpoint"])
        except ConfigError as exc:
            raise BadBind(str(exc)) from None
    ref = _ref(entry.get("ref"))
    record_profile, profile = _profile_fields(entry, fsid)
    dragonfly = _dragonfly_socket(entry.get("dragonfly"))
    if entry.get("config_v2") is not None:  # nydusd prefers it when both are given
        parsed = _from_v2(entry["config_v2"], ref is not None)
        form = "config_v2"
    elif entry.get("config") is not None:
        parsed = _from_legacy(entry["config"], ref is not None)
        form = "config"
    else:
        raise BadBind("blob_cache: missing blob cache configuration information (`config` or `config_v2`)")
    where = f"image {fsid}"
    bootstrap: Path | None = Path(parsed.metadata_path)
    opened: Bootstrap | BootstrapIndex | None = None  # parsed here (a worker thread), served as it is
    blobs = parsed.blob_dir
    if ref is not None:
        _registry_from_ref(parsed, ref)
        bootstrap = None  # pulled by the daemon
    elif check_files:
        bootstrap, opened = open_metadata_path(parsed.metadata_path)
        if parsed.blob_file is not None:
            blobs = link_blob_file(Path(parsed.blob_file), bootstrap, Path(parsed.work_dir), opened)
    elif parsed.blob_file is not None:
        blobs = Path(parsed.blob_file).parent
    registry = None
    proxy = None
    token = None
    if parsed.registry is not None:
        registry, proxy = _registry_spec(where, parsed.registry)
        token = _string(parsed.registry, "registry_token", "registry") or None
    if dragonfly is not None and registry is None:
        raise BadBind(f"image {fsid}: dragonfly: a Dragonfly peer fetches from a registry: give a registry "
                      "backend or ref")
    spec = ImageSpec(
        fsid=fsid, bootstrap=bootstrap, blobs=Path(blobs) if blobs is not None else None, domain=domain,
        ref=ref.text if ref is not None else None, registry=registry, dragonfly_socket=dragonfly, proxy=proxy,
        prefetch=parsed.prefetch, mountpoint=mountpoint,
    )
    return BindRequest(spec, form, parsed.ignored, token, ProfileSpec(record_profile, profile), opened)


def _profile_fields(entry: dict[str, Any], fsid: str) -> tuple[float, str]:
    """fscached's `record_profile` (seconds, a number) and `profile` ("auto", "none", a path)."""
    where = f"image {fsid}"
    record = entry.get("record_profile")
    seconds = 0.0
    if record is not None:
        if isinstance(record, bool) or not isinstance(record, (int, float)):
            raise BadBind(f"{where}: record_profile must be a number of seconds > 0, not {str(record)[:40]!r}")
        try:
            seconds = parse_record_seconds(where, record)
        except ConfigError as exc:
            raise BadBind(str(exc)) from None
    value = entry.get("profile", "auto")
    if not isinstance(value, str) or not value:
        raise BadBind(f"{where}: profile must be \"auto\", \"none\" or an absolute file path")
    if value not in ("auto", "none") and not os.path.isabs(value):
        raise BadBind(f"{where}: profile {value[:200]!r} must be \"auto\", \"none\" or an absolute file path")
    try:
        return seconds, parse_profile(where, value)
    except ConfigError as exc:
        raise BadBind(str(exc)) from None


@dataclass
class _Ref:
    text: str
    host: str
    repo: str


def _ref(value: Any) -> _Ref | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadBind("ref must be an image reference, host[:port]/repo:tag or host[:port]/repo@sha256:...")
    from fetcher.image_ref import parse_image_ref

    try:
        parsed = parse_image_ref(value)
    except ValueError as exc:
        raise BadBind(f"ref: {exc}") from None
    return _Ref(value, parsed.host, parsed.repo)


def _dragonfly_socket(value: Any) -> Path | None:
    """fscached's `dragonfly`: the dfdaemon's gRPC unix socket, an absolute path."""
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
        raise BadBind("dragonfly must be the absolute path of the dfdaemon's unix socket")
    return Path(value)


def _registry_from_ref(parsed: _Parsed, ref: _Ref) -> None:
    """`ref` gives the bootstrap; blobs come from its registry (the backend's fields, when a
    registry backend is given, must name the same repository)."""
    if parsed.metadata_path:
        raise BadBind("give metadata_path (a local bootstrap) or ref (pulled from the registry), not both")
    if parsed.blob_file is not None:
        raise BadBind("a localfs blob_file goes with a local metadata_path, not with ref")
    registry = dict(parsed.registry or {})
    for key, value in (("host", ref.host), ("repo", ref.repo)):
        given = registry.get(key)
        if given and given != value:
            raise BadBind(f"ref {ref.text[:200]!r} names {key} {value!r}, the registry backend {given[:200]!r}")
        registry[key] = value
    parsed.registry = registry


@dataclass
class _Parsed:
    metadata_path: str
    work_dir: str
    prefetch: PrefetchSpec
    blob_dir: Path | None = None
    blob_file: str | None = None
    registry: dict[str, Any] | None = None
    ignored: list[str] = field(default_factory=list)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadBind(f"blob_cache: `{what}` must be a JSON object")
    return value


def _string(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadBind(f"blob_cache: `{what}.{key}` must be a string")
    return value


def _from_legacy(config: Any, has_ref: bool = False) -> _Parsed:
    config = _object(config, "config")
    cache_type = _string(config, "cache_type", "config")
    cache_config = _object(config.get("cache_config"), "config.cache_config")
    work_dir = _check_cache(cache_type, cache_config, "config.cache_config.work_dir")
    prefetch_config = _object(config.get("prefetch_config"), "config.prefetch_config")
    prefetch = _prefetch(prefetch_config, "config.prefetch_config", "threads_count", "bandwidth_rate")
    backend_type = _string(config, "backend_type", "config")
    backend = _object(config.get("backend_config"), "config.backend_config")
    parsed = _backend(backend_type, backend, "config.backend_config", _string(config, "metadata_path", "config"),
                      work_dir, prefetch, has_ref)
    if prefetch_config.get("merging_size"):
        parsed.ignored.append("prefetch_config.merging_size")
    return parsed


def _from_v2(config: Any, has_ref: bool = False) -> _Parsed:
    config = _object(config, "config_v2")
    version = config.get("version", 2)
    if version != 2:
        raise BadBind(f"blob_cache: `config_v2.version` must be 2, not {str(version)[:20]!r}")
    cache = _object(config.get("cache"), "config_v2.cache")
    cache_type = _string(cache, "type", "config_v2.cache")
    fscache = _object(cache.get("fscache"), "config_v2.cache.fscache")
    work_dir = _check_cache(cache_type, fscache, "config_v2.cache.fscache.work_dir")
    prefetch_config = _object(cache.get("prefetch"), "config_v2.cache.prefetch")
    prefetch = _prefetch(prefetch_config, "config_v2.cache.prefetch", "threads", "bandwidth_limit")
    backend = _object(config.get("backend"), "config_v2.backend")
    backend_type = _string(backend, "type", "config_v2.backend")
    section = _object(backend.get(backend_type), f"config_v2.backend.{backend_type}") if backend_type in (
        "localfs", "registry", "oss", "s3") else {}
    parsed = _backend(backend_type, section, f"config_v2.backend.{backend_type}",
                      _string(config, "metadata_path", "config_v2"), work_dir, prefetch, has_ref)
    if prefetch_config.get("batch_size"):
        parsed.ignored.append("cache.prefetch.batch_size")
    return parsed


def _check_cache(cache_type: str, cache_config: dict[str, Any], where: str) -> str:
    if cache_type != "fscache":
        raise BadBind(f"blob_cache: cache type {cache_type[:40]!r} is not supported here: fscached serves "
                      "the fscache cache type (the kernel's cachefiles or fanotify cache)")
    work_dir = cache_config.get("work_dir")
    if not isinstance(work_dir, str) or not work_dir:
        raise BadBind(f"blob_cache: `{where}` is empty: fscache needs a work directory")
    if os.path.exists(work_dir) and not os.path.isdir(work_dir):
        raise BadBind(f"blob_cache: `{where}` {work_dir[:200]!r} is not a directory")
    return work_dir


def _int(value: Any, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f"{low} or more"
        raise BadBind(f"blob_cache: `{what}` must be an integer {bound}, not {str(value)[:40]!r}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadBind(f"blob_cache: `{what}` must be true or false, not {str(value)[:40]!r}")
    return value


def _prefetch(config: dict[str, Any], where: str, threads_key: str, bandwidth_key: str) -> PrefetchSpec:
    enable = _bool(config.get("enable", False), f"{where}.enable")
    prefetch_all = _bool(config.get("prefetch_all", False), f"{where}.prefetch_all")
    bandwidth = _int(config.get(bandwidth_key, 0), f"{where}.{bandwidth_key}", 0)
    if not enable:
        return PrefetchSpec()
    if threads_key in config:  # nydusd: 1..1024 when prefetch is enabled
        _int(config[threads_key], f"{where}.{threads_key}", 1, MAX_THREADS)
    return PrefetchSpec("all" if prefetch_all else "table", bandwidth)


REGISTRY_UNUSED = ("blob_url_scheme", "blob_redirected_host", "connect_timeout",
                   "retry_limit", "mirrors", "readahead")


def _backend(backend_type: str, backend: dict[str, Any], where: str, metadata_path: str, work_dir: str,
             prefetch: PrefetchSpec, has_ref: bool = False) -> _Parsed:
    if not metadata_path and not has_ref:
        raise BadBind("blob_cache: `config.metadata_path` for meta blob is empty")
    parsed = _Parsed(metadata_path, work_dir, prefetch)
    if backend_type == "localfs":
        blob_file = _string(backend, "blob_file", where)
        blob_dir = _string(backend, "dir", where)
        if not blob_file and not blob_dir:
            raise BadBind(f"blob_cache: localfs backend needs `{where}.blob_file` or `{where}.dir`")
        if blob_file:
            parsed.blob_file = blob_file
        else:
            parsed.blob_dir = Path(blob_dir)
        if backend.get("alt_dirs"):
            parsed.ignored.append("localfs.alt_dirs")
    elif backend_type == "registry":
        for key in ("host", "repo"):
            if not _string(backend, key, where) and not has_ref:
                raise BadBind(f"blob_cache: registry backend needs `{where}.{key}`")
        parsed.registry = backend
        parsed.ignored += [f"registry.{key}" for key in REGISTRY_UNUSED if backend.get(key)]
    elif backend_type in ("oss", "s3"):
        raise UnsupportedBind(f"backend type {backend_type!r} is not supported by fscached: use a registry "
                              "backend (optionally through a Dragonfly proxy) or localfs")
    elif not backend_type and has_ref:
        pass  # the registry of the reference
    elif not backend_type:
        raise BadBind("blob_cache: the backend type is missing (registry, localfs)")
    else:
        raise BadBind(f"blob_cache: unsupported backend type {backend_type[:40]!r} (registry, localfs)")
    return parsed


def _registry_spec(where: str, backend: dict[str, Any]) -> tuple[RegistrySpec, ProxySpec | None]:
    """The registry fields onto RegistrySpec (and its proxy onto ProxySpec), checked as the
    daemon's own config checks them. No message carries the `auth` value."""
    host = _string(backend, "host", "registry")
    repo = _string(backend, "repo", "registry")
    scheme = _string(backend, "scheme", "registry") or "https"
    try:
        host, repo = split_repository(where, f"{host}/{repo}", "registry host/repo")
        if scheme not in ("http", "https"):
            raise ConfigError(f"{where}: registry scheme must be http or https, not {scheme[:20]!r}")
        auth = _string(backend, "auth", "registry") or None
        if auth is not None:
            check_auth(where, "registry auth", auth)
        ca_files = backend.get("ca_cert_files") or []
        if not isinstance(ca_files, list) or not all(isinstance(f, str) for f in ca_files):
            raise ConfigError(f"{where}: registry ca_cert_files must be a list of paths")
        ca_file = check_ca_file(where, ca_files[0]) if ca_files else None
        if len(ca_files) > 1:
            log.warning("%s: only the first of %d ca_cert_files is used (%s)", where, len(ca_files), ca_files[0])
        skip_verify = parse_bool(where, "skip_verify", backend.get("skip_verify", False))
        # nydusd's 0 means "no timeout of our own": the daemon's default then
        timeout = parse_seconds(where, "registry timeout", backend.get("timeout") or 60)
        proxy = None
        proxy_config = _object(backend.get("proxy"), "registry.proxy")
        if proxy_config.get("url"):
            url = parse_url(where, "proxy url", _string(proxy_config, "url", "registry.proxy"))
            ping_url = (parse_url(where, "proxy ping_url", _string(proxy_config, "ping_url", "registry.proxy"))
                        if proxy_config.get("ping_url") else None)
            check_interval = parse_seconds(where, "proxy check_interval", proxy_config.get("check_interval", 5),
                                           allow_zero=ping_url is None)
            proxy = ProxySpec(url, ping_url, check_interval,
                              parse_bool(where, "proxy fallback", proxy_config.get("fallback", True)),
                              parse_bool(where, "proxy use_http", proxy_config.get("use_http", False)))
    except ConfigError as exc:
        raise BadBind(str(exc)) from None
    return RegistrySpec(host, repo, scheme, auth, ca_file, skip_verify, timeout), proxy


def open_metadata_path(value: str) -> tuple[Path, Bootstrap | BootstrapIndex]:
    """The bootstrap: an existing regular file holding a RAFS v6 (EROFS) image, as nydusd checks
    it (its messages), plus fscached's reader's own validation; and the parsed bootstrap (the
    daemon serves that one: read once per bind, off the event loop: its chunk index, or the
    whole image when it has no chunk table)."""
    from erofs_image.index import open_served

    path = check_metadata_file(value)
    try:
        return path, open_served(path)
    except (ValueError, OSError) as exc:
        raise BadBind(f"blob_cache: `config.metadata_path={value[:300]}` is not a usable RAFS v6 bootstrap: "
                      f"{exc}") from None


def check_metadata_file(value: str) -> Path:
    """The cheap part of open_metadata_path: a regular file that is not RAFS v5 (no parse)."""
    try:
        path = Path(value).resolve(strict=True)
    except (OSError, RuntimeError):
        raise BadBind(f"blob_cache: `config.metadata_path={value[:300]}` for meta blob is invalid: "
                      "no such file") from None
    if not path.is_file():
        raise BadBind(f"blob_cache: `config.metadata_path={value[:300]}` for meta blob is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise BadBind(f"blob_cache: `config.metadata_path={value[:300]}`: {exc.strerror}") from None
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == RAFS_V5_MAGIC:
        raise BadBind(f"blob_cache: RAFSv5 image is not supported ({path}): fscached serves RAFS v6 "
                      "(EROFS) images: build with `nydus-image create --fs-version 6` or fscached-image")
    return path


def link_blob_file(blob_file: Path, bootstrap: Path, work_dir: Path,
                   parsed: Bootstrap | BootstrapIndex | None = None) -> Path:
    """nydusd's localfs `blob_file`: the one data blob of the image, whatever its name. Named by
    its blob id, its directory serves it; otherwise a link named by the blob id is made in
    `<work_dir>/fscached-blobs/` (the bind's own work directory)."""
    from erofs_image.reader import Bootstrap

    if not blob_file.is_file():
        raise BadBind(f"blob_cache: localfs blob_file {str(blob_file)[:300]!r} is not a regular file")
    blobs = (parsed or Bootstrap.open(bootstrap)).blobs
    if len(blobs) > 1:
        raise BadBind(f"blob_cache: localfs blob_file serves one data blob, but {bootstrap} names {len(blobs)}: "
                      "give the blob directory as `dir` instead")
    if not blobs or blob_file.name == blobs[0].blob_id:
        return blob_file.resolve().parent
    link_dir = work_dir / LINK_DIR
    try:
        link_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        link = link_dir / blobs[0].blob_id
        tmp = link_dir / f".{blobs[0].blob_id}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(blob_file.resolve())
        os.replace(tmp, link)
    except OSError as exc:
        raise BadBind(f"blob_cache: cannot link localfs blob_file into {link_dir}: {exc.strerror or exc}") from None
    return link_dir


# -- nydusd's fusedev daemon config (RafsConfig v1) --------------------------------------------------
FUSE_CACHE_TYPES = ("", "blobcache", "fscache", "dummycache")


def parse_rafs_config(config: Any, *, fsid: str, bootstrap: str, mountpoint: Path | None,
                      domain: str | None = None, where: str = "config") -> BindRequest:
    """nydusd's daemon config for the fusedev driver (what nydus-snapshotter writes for `nydusd
    fuse --config F` and sends as the `config` string of POST /api/v1/mount):

        {"device": {"backend": {"type": "registry"|"localfs", "config": {...}},
                    "cache": {"type": "blobcache", "config": {"work_dir": "..."}}},
         "mode": "direct", "digest_validate": false, "enable_xattr": true,
         "fs_prefetch": {"enable": false, "prefetch_all": false, "threads_count": 4, "bandwidth_rate": 0}}

    `config` is the JSON object or its text. The backend goes through the same rules as a bind
    entry's; the cache is fscached's own (the kernel's page cache over sparse cache files), so
    its type and work_dir are only checked. BadBind / UnsupportedBind, one line."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError as exc:
            raise BadBind(f"{where}: not JSON: {exc}") from None
    config = _object(config, where)
    device = _object(config.get("device"), f"{where}.device")
    if not device:
        raise BadBind(f"{where}: invalid fuse daemon configuration: no `device` (nydus-snapshotter's "
                      "nydusd_config needs one, with a backend)")
    cache = _object(device.get("cache"), f"{where}.device.cache")
    cache_type = _string(cache, "type", f"{where}.device.cache")
    if cache_type not in FUSE_CACHE_TYPES:
        raise UnsupportedBind(f"{where}.device.cache.type {cache_type[:40]!r}: fscached caches in the kernel's "
                              "page cache over sparse cache files (blobcache, or leave it out)")
    backend = _object(device.get("backend"), f"{where}.device.backend")
    backend_type = _string(backend, "type", f"{where}.device.backend")
    prefetch = _prefetch(_object(config.get("fs_prefetch"), f"{where}.fs_prefetch"), f"{where}.fs_prefetch",
                         "threads_count", "bandwidth_rate")
    parsed = _backend(backend_type, _object(backend.get("config"), f"{where}.device.backend.config"),
                      f"{where}.device.backend.config", bootstrap, "", prefetch)
    boot_path, opened = open_metadata_path(bootstrap)
    blobs = parsed.blob_dir
    if parsed.blob_file is not None:
        blobs = Path(parsed.blob_file).resolve().parent
    registry = proxy = None
    token = None
    if parsed.registry is not None:
        registry, proxy = _registry_spec(f"image {fsid}", parsed.registry)
        token = _string(parsed.registry, "registry_token", "registry") or None
    spec = ImageSpec(fsid=check_entry_id("id", fsid), bootstrap=boot_path, blobs=blobs, domain=domain, registry=registry,
                     proxy=proxy, prefetch=parsed.prefetch, mountpoint=mountpoint)
    ignored = parsed.ignored + [key for key in ("digest_validate", "amplify_io", "warmup", "iostats_files",
                                                 "access_pattern", "latest_read_files") if config.get(key)]
    return BindRequest(spec, "fusedev", ignored, token, ProfileSpec(), opened)
