"""`nydusd fuse`: nydus-snapshotter's fusedev driver, answered with file-backed EROFS mounts served
through fanotify pre-content events (fscached.nydusd_cli parses the command line).

The snapshotter only asks for a filesystem at a directory, then uses that directory as an
overlay lower dir (nothing checks it is FUSE). So the image is mounted there as EROFS over
sparse cache files, and every read of a hole is filled by this daemon: native kernel reads,
lazily filled, on Linux 6.14+ where nydus-snapshotter itself has no lazy EROFS path.

    dedicated   --bootstrap B --config F --mountpoint M: the one image at M, bound at start
    shared      --mountpoint R: images by POST /api/v1/mount?mountpoint=/<id>, at R/<id>
    failover    --supervisor P with a stale API socket: a restart of a dead daemon: wait in INIT
                for the takeover (the fanotify group and the state, from the supervisor)
    --upgrade   a hot upgrade: takeover, then `start`

The cache is one per daemon (`--fscache DIR`, else `<cache work_dir>/fscached/<daemon id>`): a
cache file marked by two daemons' groups would be filled twice and answered by both.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fscached.config import ImageSpec

log = logging.getLogger("fscached")

# images mounted by POST /api/v1/mount share their blobs' cache files in one domain
SHARED_DOMAIN = "nydus"


def daemon_id(args: argparse.Namespace) -> str:
    """The snapshotter's daemon id: `--id`, else the name of the API socket's directory
    (`<root>/socket/<id>/api.sock`)."""
    return str(args.id or Path(args.apisock).parent.name or "nydusd")


def cache_dir_for(args: argparse.Namespace, config: dict[str, Any]) -> Path:
    """`--fscache`, else `<work_dir>/fscached/<id>` with the snapshotter's cache dir as work_dir:
    the config's `device.cache.config.work_dir`, or `<root>/cache` beside `<root>/socket`."""
    if args.fscache:
        return Path(os.path.realpath(args.fscache))
    work_dir = ((config.get("device") or {}).get("cache") or {}).get("config", {}).get("work_dir")
    if not isinstance(work_dir, str) or not work_dir:
        sockets = Path(args.apisock).parent.parent
        root = sockets.parent
        work_dir = str(root / "cache") if sockets.name == "socket" else str(Path(args.apisock).parent)
    return Path(os.path.realpath(work_dir)) / "fscached" / daemon_id(args)


def socket_is_stale(path: str) -> bool:
    """A socket file nobody answers on: its daemon died (a failover restart)."""
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return False
    except OSError:
        return True
    finally:
        probe.close()


NEEDS_FANOTIFY = ("nydusd fuse is answered by fscached with a file-backed EROFS mount served through fanotify "
                  "pre-content events (Linux 6.14+), which this kernel cannot give ({reason}); on a kernel with "
                  "cachefiles on-demand (5.19-7.1, EROFS_FS_ONDEMAND) set fs_driver = \"fscache\" in "
                  "nydus-snapshotter's config instead")


@dataclass
class FuseStart:
    """What the command line asks for, prepared before the event loop runs."""

    mountpoint: Path
    cache_dir: Path
    images: list[ImageSpec] = field(default_factory=list)
    token: str | None = None
    restarted: bool = False  # a stale API socket beside a supervisor: a failover restart
    error: str | None = None  # one line: the start is refused


def prepare(args: argparse.Namespace) -> FuseStart:
    """The mountpoint, the cache dir (made; the kernel checked on it) and the dedicated image."""
    from fanotify.group import probe
    from fscached.api.bind_entry import BindError, parse_rafs_config

    mountpoint = Path(os.path.abspath(args.mountpoint))
    config: dict[str, Any] = {}
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:
            return FuseStart(mountpoint, Path(), error=f"--config {args.config}: {getattr(exc, 'strerror', None) or exc}")
        if not isinstance(config, dict):
            return FuseStart(mountpoint, Path(), error=f"--config {args.config}: expected a JSON object (nydusd's "
                                                       "daemon config)")
    cache_dir = cache_dir_for(args, config)
    made = not cache_dir.exists()
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    reason = probe(cache_dir)
    if reason is not None:
        if made:
            cache_dir.rmdir()
        return FuseStart(mountpoint, cache_dir, error=NEEDS_FANOTIFY.format(reason=reason))
    start = FuseStart(mountpoint, cache_dir, restarted=bool(args.supervisor) and socket_is_stale(args.apisock))
    if args.bootstrap:
        try:
            bind = parse_rafs_config(config, fsid=daemon_id(args), bootstrap=args.bootstrap, mountpoint=mountpoint,
                                     where=f"--config {args.config}")
        except BindError as exc:
            start.error = str(exc)
            return start
        start.images.append(bind.spec)
        start.token = bind.registry_token
    else:  # shared: the root images are mounted below
        mountpoint.mkdir(parents=True, exist_ok=True)
    return start


async def serve_fuse(args: argparse.Namespace, start: FuseStart) -> int:
    from fscached.api.server import ApiServer, ApiSocketError, check_socket_path
    from fscached.config import Config
    from fscached.core.catalog import CatalogError
    from fscached.daemon import Daemon
    from fscached.frontends.fanotify.keeper import KeeperError
    from fscached.lifecycle.supervisor import Supervisor
    from fscached.nydusd_cli import LOG_LEVELS, fail, wait_for_takeover
    from fscached.util.buildinfo import build_info

    if start.error is not None:
        return fail(args, start.error)
    mountpoint, cache_dir, images, token = start.mountpoint, start.cache_dir, start.images, start.token
    daemon = Daemon(Config(cache_dir=cache_dir, kernel_path="fanotify", images=images, work_dir=cache_dir / "work",
                           log_level=LOG_LEVELS[args.log_level.lower()],
                           ready_file=Path(args.ready_file) if args.ready_file else None))
    if args.supervisor:
        daemon.supervisor = Supervisor(args.supervisor)
    shared = not args.bootstrap
    api_options: dict[str, Any] = {"fuse_root": mountpoint, "fuse_domain": SHARED_DOMAIN} if shared else {}
    info = build_info()
    log.info("nydusd (fscached %s, git_commit %s) fuse, %s: %s, cache %s, API %s", info["package_ver"],
             info["git_commit"], "shared" if shared else "dedicated", mountpoint, cache_dir, args.apisock)
    apisock = Path(args.apisock)
    if args.upgrade:
        return await wait_for_takeover(daemon, apisock, args, upgrade=True, api_options=api_options)
    if start.restarted:
        log.info("the API socket %s was stale: restarted for failover, waiting in INIT for a takeover from the "
                 "supervisor %s", apisock, args.supervisor)
        return await wait_for_takeover(daemon, apisock, args, upgrade=False, api_options=api_options)
    try:
        check_socket_path(apisock)
        await daemon.load()
        daemon.take_kernel_path()
    except (ApiSocketError, CatalogError, KeeperError) as exc:
        return fail(args, str(exc))
    except OSError as exc:
        return fail(args, f"{exc.filename or ''}: {exc.strerror}")
    if token and images:
        daemon.seed_registry_token(images[0], token)
    if args.supervisor:
        daemon.check_failover_support()
    api = ApiServer(daemon, apisock, daemon_id=args.id, supervisor=args.supervisor, **api_options)
    return await api.serve_daemon(lambda message: fail(args, message))
