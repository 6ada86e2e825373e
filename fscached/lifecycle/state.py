"""The hand-over state: what a daemon gives the one that takes over from it (issue 9).

The bytes are a `fscached.handover.v1.HandoverState` protobuf message
(proto/fscached/handover/v1/handover.proto; the Python code is generated at install time into
fscached/_proto/). They travel beside the kernel fds: to nydus-snapshotter's supervisor
(sendfd / takeover), to a hot-upgraded successor, or into systemd's fd store. The fds are named
in `fd_names`, in the order they travel.

    Daemon.handover_state()           the running daemon's state, as the view below (fscached.daemon)
    encode(state) / encode_specs(...) the view -> bytes (no daemon needed)
    read_state(data) -> HandoverState the bytes -> the view, or HandoverError (one line)

A daemon reads the state of an older or a newer daemon: fields it does not know are ignored
and named in a warning; a state whose format_version is above FORMAT_VERSION (a change an older
daemon must not ignore), or that holds an enum value this daemon does not know, is refused with
a line saying so. Registry credentials travel in the state (a successor must fetch with them)
but never reach a log: the view's repr leaves them out, and no message holds a field's value.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from fscached.lifecycle import fdnames
from fscached.util.buildinfo import package_version
from fscached.config import ConfigError, ImageSpec, PrefetchSpec, ProxySpec, RegistrySpec, check_auth, check_id

try:
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]
    from google.protobuf.unknown_fields import UnknownFieldSet  # type: ignore[import-untyped, unused-ignore]

    from fscached._proto.handover.v1 import handover_pb2 as pb
except ImportError as exc:  # the generated code is missing, or the protobuf runtime refuses it
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("fscached._proto"):
        raise ImportError("fscached/_proto/ (code generated from proto/ at install time) is missing: "
                          "install fscached again (pip install -e . / make venv)") from None
    raise
except Exception as exc:  # google.protobuf.runtime_version.VersionError: generated for a newer runtime
    raise ImportError(f"fscached/_proto/ does not fit the installed protobuf runtime ({exc}): "
                      "upgrade protobuf, or install fscached again") from None

log = logging.getLogger("fscached.handover")


def _warn_if_stale() -> None:
    """In a checkout (an editable install), the generated code must come from the .proto
    beside it: a changed .proto is only seen once fscached is installed again."""
    from fscached import _proto

    proto_dir = Path(__file__).resolve().parent.parent / "proto"
    for name, digest in getattr(_proto, "SOURCES", {}).items():
        try:
            data = (proto_dir / name).read_bytes()
        except OSError:
            continue  # installed from a wheel: no proto/ beside the package
        if hashlib.sha256(data).hexdigest() != digest:
            warnings.warn(f"{proto_dir / name} changed since fscached/_proto/ was generated from it: "
                          "install fscached again (pip install -e . / make venv)", stacklevel=3)


_warn_if_stale()

# The hand-over format this daemon writes and the newest it reads. Bump it only for a change an
# older daemon must not ignore (see the rules in the .proto); adding fields does not.
FORMAT_VERSION = 1
MAGIC = "fscached-handover"

# Names of the fds that travel beside the state (HandoverState.fd_names): fscached.lifecycle.fdnames.
FD_CACHEFILES = fdnames.CACHEFILES
FD_FANOTIFY_GROUP = fdnames.FANOTIFY_GROUP


class HandoverError(Exception):
    """A hand-over state that cannot be read (or written), in one line; never holds a secret."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


_BACKENDS = {pb.BACKEND_CACHEFILES: "cachefiles", pb.BACKEND_FANOTIFY: "fanotify"}
_PREFETCH = {pb.PREFETCH_MODE_NONE: "none", pb.PREFETCH_MODE_TABLE: "table", pb.PREFETCH_MODE_ALL: "all"}
_ORIGINS = {pb.ORIGIN_CONFIGURED: False, pb.ORIGIN_RUN_TIME: True}  # -> run_time


# -- the view -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bind:
    """One image as the writer served it."""

    spec: ImageSpec
    run_time: bool = False  # bound at run time (the API), not from the command line / config file
    served_bootstrap: Path | None = None  # the file served (a `ref` image's pulled copy)
    blob_ids: tuple[str, ...] = ()  # the served bootstrap's blob table, in device order

    def __repr__(self) -> str:
        return (f"Bind({_safe_spec_repr(self.spec)}, run_time={self.run_time}, "
                f"served_bootstrap={self.served_bootstrap!r}, blob_ids={self.blob_ids!r})")


@dataclass(frozen=True)
class FanotifyPointers:
    """Where the fanotify path keeps what outlives a daemon (all under state_dir today)."""

    state_dir: Path
    event_journal: Path | None = None
    clean_stop_record: Path | None = None
    keeper_socket: Path | None = None


@dataclass(frozen=True)
class CachefilesInfo:
    device: Path | None = None
    tag: str | None = None


@dataclass(frozen=True)
class HandoverState:
    """A hand-over state, read or to be written. Its repr holds no credentials."""

    backend: str  # "cachefiles" | "fanotify"
    cache_dir: Path
    binds: tuple[Bind, ...] = ()  # in bind order
    work_dir: Path | None = None
    fd_names: tuple[str, ...] = ()
    fanotify: FanotifyPointers | None = None
    cachefiles: CachefilesInfo | None = None
    daemon_version: str = ""
    format_version: int = FORMAT_VERSION
    # fields of a newer writer this daemon ignored, as "images[0].registry field 12"
    unknown_fields: tuple[str, ...] = field(default=(), compare=False)

    @property
    def images(self) -> tuple[ImageSpec, ...]:
        return tuple(bind.spec for bind in self.binds)

    @property
    def run_time_images(self) -> tuple[ImageSpec, ...]:
        """The images bound at run time (through the API), not configured at start."""
        return tuple(bind.spec for bind in self.binds if bind.run_time)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"HandoverState({fields})"

    __str__ = __repr__


def _safe_url(url: str | None) -> str | None:
    """The URL without its userinfo (a proxy URL may carry credentials)."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        if "@" not in parts.netloc:
            return url
        return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
    except ValueError:
        return "<invalid url>"


def _safe_spec_repr(spec: ImageSpec) -> str:
    """ImageSpec's repr without secrets: no registry auth (RegistrySpec leaves it out already:
    it is dropped here too, whatever its repr becomes), no userinfo in proxy URLs."""
    registry = dataclasses.replace(spec.registry, auth=None) if spec.registry is not None else None
    proxy = spec.proxy
    if proxy is not None:
        proxy = dataclasses.replace(proxy, url=_safe_url(proxy.url) or "", ping_url=_safe_url(proxy.ping_url))
    text = repr(dataclasses.replace(spec, registry=registry, proxy=proxy))
    if spec.registry is not None and spec.registry.auth:
        text = text[:-1] + ", registry_auth=<given>)"
    return text


# -- writing --------------------------------------------------------------------------------
def _path_bytes(path: Path | str | None) -> bytes:
    return os.fsencode(str(path)) if path is not None else b""


def _path(value: bytes) -> Path | None:
    return Path(os.fsdecode(value)) if value else None


def _bind_message(bind: Bind, out: Any) -> None:
    spec = bind.spec
    out.fsid = spec.fsid
    out.domain = spec.domain or ""
    out.origin = pb.ORIGIN_RUN_TIME if bind.run_time else pb.ORIGIN_CONFIGURED
    out.bootstrap = _path_bytes(spec.bootstrap)
    out.served_bootstrap = _path_bytes(bind.served_bootstrap)
    out.blobs = _path_bytes(spec.blobs)
    out.ref = spec.ref or ""
    out.blob_ids.extend(bind.blob_ids)
    if spec.registry is not None:
        r = spec.registry
        out.registry.host = r.host
        out.registry.repo = r.repo
        out.registry.scheme = r.scheme
        out.registry.auth = r.auth or ""
        out.registry.ca_file = _path_bytes(r.ca_file)
        out.registry.skip_verify = r.skip_verify
        out.registry.timeout = r.timeout
    out.dragonfly_socket = _path_bytes(spec.dragonfly_socket)
    if spec.proxy is not None:
        p = spec.proxy
        out.proxy.url = p.url
        out.proxy.ping_url = p.ping_url or ""
        out.proxy.check_interval = p.check_interval
        out.proxy.fallback = p.fallback
        out.proxy.use_http = p.use_http
    modes = {name: number for number, name in _PREFETCH.items()}
    if spec.prefetch.mode not in modes:
        raise HandoverError(f"image {spec.fsid}: prefetch mode {spec.prefetch.mode!r} has no hand-over form")
    out.prefetch.mode = modes[spec.prefetch.mode]
    out.prefetch.bandwidth = spec.prefetch.bandwidth
    out.mountpoint = _path_bytes(spec.mountpoint)


def encode(state: HandoverState) -> bytes:
    """The view -> the bytes (always written as FORMAT_VERSION)."""
    backends = {name: number for number, name in _BACKENDS.items()}
    if state.backend not in backends:
        raise HandoverError(f"backend {state.backend!r} has no hand-over form: cachefiles or fanotify")
    msg = pb.HandoverState(format_version=FORMAT_VERSION, magic=MAGIC,
                           daemon_version=state.daemon_version or package_version(),
                           backend=backends[state.backend], cache_dir=_path_bytes(state.cache_dir),
                           work_dir=_path_bytes(state.work_dir))
    for bind in state.binds:
        _bind_message(bind, msg.images.add())
    msg.fd_names.extend(state.fd_names)
    if state.fanotify is not None:
        f = state.fanotify
        msg.fanotify.state_dir = _path_bytes(f.state_dir)
        msg.fanotify.event_journal = _path_bytes(f.event_journal)
        msg.fanotify.clean_stop_record = _path_bytes(f.clean_stop_record)
        msg.fanotify.keeper_socket = _path_bytes(f.keeper_socket)
    if state.cachefiles is not None:
        msg.cachefiles.device = _path_bytes(state.cachefiles.device)
        msg.cachefiles.tag = state.cachefiles.tag or ""
    data: bytes = msg.SerializeToString()
    return data


def encode_specs(backend: str, specs: Iterable[ImageSpec], *, cache_dir: Path, work_dir: Path | None = None,
                 run_time: Iterable[ImageSpec] = (), fd_names: Sequence[str] = (),
                 served_bootstraps: Mapping[str, Path] | None = None,
                 blob_ids: Mapping[str, Sequence[str]] | None = None,
                 fanotify: FanotifyPointers | None = None, cachefiles: CachefilesInfo | None = None,
                 daemon_version: str = "") -> bytes:
    """Bytes for these images without a daemon (tests, tools). `run_time`: those of `specs`
    bound at run time; `served_bootstraps` / `blob_ids` by fsid."""
    late = list(run_time)
    binds = tuple(Bind(spec, spec in late, (served_bootstraps or {}).get(spec.fsid),
                       tuple((blob_ids or {}).get(spec.fsid, ()))) for spec in specs)
    return encode(HandoverState(backend, cache_dir, binds, work_dir, tuple(fd_names), fanotify, cachefiles,
                                daemon_version))


# -- reading --------------------------------------------------------------------------------
def read_state(data: bytes) -> HandoverState:
    """The bytes -> the view. HandoverError (one line, no secret) for bytes that are not a
    state, a state of a newer format, or a value this daemon does not know; fields of a newer
    writer it does not know are ignored and named in a warning (and in `unknown_fields`)."""
    if not data:
        raise HandoverError("not an fscached hand-over state: no bytes")
    msg = pb.HandoverState()
    try:
        msg.ParseFromString(bytes(data))
    except (DecodeError, ValueError, TypeError):
        raise HandoverError(f"not an fscached hand-over state: {len(data)} bytes that are not one") from None
    if msg.magic != MAGIC or msg.format_version == 0:
        raise HandoverError(f"not an fscached hand-over state: {len(data)} bytes without its marker")
    writer = f"fscached {msg.daemon_version}" if msg.daemon_version else "an unnamed fscached"
    if msg.format_version > FORMAT_VERSION:
        raise HandoverError(
            f"hand-over state format {msg.format_version} (written by {writer}) is newer than this daemon "
            f"reads (format {FORMAT_VERSION}, fscached {package_version()}): this daemon is older than the one "
            "that wrote it; run that version or a newer one to take over")
    if msg.backend not in _BACKENDS:
        raise HandoverError(_unknown_value("the kernel path (backend)", msg.backend, _BACKENDS.values(), writer))
    binds = tuple(_bind_from_message(n, image, writer) for n, image in enumerate(msg.images))
    seen: set[tuple[str, str]] = set()
    for bind in binds:
        key = (bind.spec.volume, bind.spec.fsid)
        if key in seen:
            raise HandoverError(f"hand-over state: image {bind.spec.fsid} in volume {bind.spec.volume} is bound twice")
        seen.add(key)
    cache_dir = _path(msg.cache_dir)
    if cache_dir is None:
        raise HandoverError("hand-over state: no cache dir")
    fanotify = None
    if msg.HasField("fanotify"):
        f = msg.fanotify
        state_dir = _path(f.state_dir) or cache_dir / ".fscached"
        fanotify = FanotifyPointers(state_dir, _path(f.event_journal), _path(f.clean_stop_record),
                                    _path(f.keeper_socket))
    cachefiles = None
    if msg.HasField("cachefiles"):
        cachefiles = CachefilesInfo(_path(msg.cachefiles.device), msg.cachefiles.tag or None)
    unknown = tuple(unknown_fields(msg))
    if unknown:
        log.warning("hand-over state from %s (format %d): ignoring %d field(s) this daemon does not know "
                    "(a newer daemon wrote them): %s", writer, msg.format_version, len(unknown), ", ".join(unknown))
    state = HandoverState(
        backend=_BACKENDS[msg.backend],
        cache_dir=cache_dir,
        binds=binds,
        work_dir=_path(msg.work_dir),
        fd_names=tuple(msg.fd_names),
        fanotify=fanotify,
        cachefiles=cachefiles,
        daemon_version=msg.daemon_version,
        format_version=msg.format_version,
        unknown_fields=unknown,
    )
    log.debug("hand-over state read: %r", state)
    return state


def _unknown_value(what: str, number: int, known: Iterable[str], writer: str) -> str:
    return (f"hand-over state: {what} value {number} is unknown to this daemon (fscached {package_version()} "
            f"knows {', '.join(known)}): written by {writer}, a newer daemon")


def _bind_from_message(n: int, msg: Any, writer: str) -> Bind:
    where = f"hand-over state: image #{n + 1}"
    try:
        fsid = check_id("fsid", msg.fsid)
        where = f"hand-over state: image {fsid}"
        domain = check_id("domain", msg.domain) if msg.domain else None
    except ConfigError as exc:
        raise HandoverError(f"{where}: {exc}") from None
    if msg.origin not in _ORIGINS:
        raise HandoverError(_unknown_value(f"image {fsid}: its origin", msg.origin, ("configured", "run time"), writer))
    if msg.prefetch.mode not in _PREFETCH:
        raise HandoverError(_unknown_value(f"image {fsid}: its prefetch mode", msg.prefetch.mode,
                                           _PREFETCH.values(), writer))
    registry = None
    if msg.HasField("registry"):
        r = msg.registry
        if not r.host or not r.repo:
            raise HandoverError(f"{where}: a registry without host or repository")
        scheme = r.scheme or "https"
        if scheme not in ("http", "https"):
            raise HandoverError(f"{where}: registry scheme {scheme!r} is neither http nor https")
        if r.auth:
            try:
                check_auth(where, "registry auth", r.auth)  # its message never holds the value
            except ConfigError as exc:
                raise HandoverError(str(exc)) from None
        ca_file = _path(r.ca_file)
        registry = RegistrySpec(r.host, r.repo, scheme, r.auth or None, str(ca_file) if ca_file else None,
                                r.skip_verify, r.timeout if r.HasField("timeout") and r.timeout > 0 else 60.0)
    proxy = None
    if msg.HasField("proxy"):
        p = msg.proxy
        if not p.url:
            raise HandoverError(f"{where}: a Dragonfly proxy without its URL")
        proxy = ProxySpec(p.url, p.ping_url or None, p.check_interval if p.HasField("check_interval") else 5.0,
                          p.fallback if p.HasField("fallback") else True, p.use_http)
    bootstrap, blobs = _path(msg.bootstrap), _path(msg.blobs)
    if bootstrap is None and not msg.ref:
        raise HandoverError(f"{where}: neither a bootstrap nor a ref")
    if blobs is None and registry is None:
        raise HandoverError(f"{where}: no blob source (neither blobs nor a registry)")
    spec = ImageSpec(
        fsid=fsid,
        bootstrap=bootstrap,
        blobs=blobs,
        domain=domain,
        ref=msg.ref or None,
        registry=registry,
        dragonfly_socket=_path(msg.dragonfly_socket),
        proxy=proxy,
        prefetch=PrefetchSpec(_PREFETCH[msg.prefetch.mode], msg.prefetch.bandwidth),
        mountpoint=_path(msg.mountpoint),
    )
    return Bind(spec, _ORIGINS[msg.origin], _path(msg.served_bootstrap), tuple(msg.blob_ids))


def _is_repeated(fd: Any) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf 7; `label` before
    return bool(flag) if flag is not None else bool(fd.label == fd.LABEL_REPEATED)


def unknown_fields(msg: Any, path: str = "") -> list[str]:
    """The fields of `msg` (and the messages in it) its schema does not name, by number and
    where: "HandoverState field 40", "images[0].registry field 12". Never their values."""
    unknown = UnknownFieldSet(msg)
    found = [f"{path or msg.DESCRIPTOR.name} field {unknown[i].field_number}" for i in range(len(unknown))]
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        where = f"{path}.{fd.name}" if path else fd.name
        if _is_repeated(fd):
            for i, item in enumerate(value):
                found += unknown_fields(item, f"{where}[{i}]")
        else:
            found += unknown_fields(value, where)
    return found
