"""`nydusd`: fscached under the command lines nydus-snapshotter runs, for both its drivers.

    nydusd singleton --fscache DIR --apisock PATH --log-level L [--fscache-threads N]
           [--id ID --supervisor PATH] [--upgrade] [--log-file F] [--log-rotation-size N]
           [--config F]
    nydusd fuse [--upgrade] [--thread-num N] [--id ID] [--config F --bootstrap B] --mountpoint M
           --apisock PATH --log-level L [--log-rotation-size N] [--supervisor P] [--log-file F]
           [--prefetch-files X] [--backend-source URL] [--failover-policy none|resend|flush]
    nydusd --version

`singleton` (fs_driver = "fscache"): fscached's daemon on the cachefiles path (the snapshotter
mounts with `-o fsid=`) with no image: images are bound at run time through the nydusd API on
`--apisock` (fscached.api.server). `--config` may hold nydusd's singleton config,
`{"blobs": [<bind entry>...]}`, bound at start.

`fuse` (fs_driver = "fusedev"): the snapshotter asks for a filesystem at a directory and uses it
as an overlay lower dir; fscached answers with a file-backed EROFS mount there, served through
fanotify pre-content events (Linux 6.14+): native kernel reads, filled lazily, no FUSE.
Dedicated mode (`--bootstrap` and `--config`): the one image at `--mountpoint`. Shared mode
(neither): `--mountpoint` is the root; each image comes by `POST /api/v1/mount?mountpoint=/<id>`
and is mounted at `<root>/<id>`, its blobs' cache files shared with the other images. The cache
is `--fscache DIR` when given, else `<cache work_dir>/fscached/<daemon id>` (the snapshotter's
cache dir, from the config or beside its socket dir): one group and one cache per daemon.

Failover (`--supervisor`, fscached.lifecycle.supervisor): a daemon that finds /dev/cachefiles busy (the
supervisor holds it) beside a stale API socket was restarted for failover: it serves the API in
INIT and waits for `takeover` (then `start`). `--upgrade` (hot upgrade) always starts that way,
on its new API socket. With `--supervisor`, a normal start asks the kernel for `restore` and
says when failover needs a newer kernel.

Logs go to `--log-file` (rotated at `--log-rotation-size` MiB, 0 = never) with timestamps, else
to stderr: without timestamps, with syslog priority prefixes, when stderr is the journal
(systemd's JOURNAL_STREAM names it).
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fscached.config import ConfigError, OneLineParser
from fscached.util.buildinfo import build_info

if TYPE_CHECKING:
    from fscached.api.server import ApiServer
    from fscached.daemon import Daemon

PROG = "nydusd"
LOG_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "warning": "warning",
              "error": "error"}
LOG_BACKUPS = 5
MAX_THREADS = 1024


def version_text() -> str:
    info = build_info()
    return (f"{PROG} (fscached) {info['package_ver']}\n"
            f"Version: \t{info['package_ver']}\n"
            f"Git Commit: \t{info['git_commit']}\n"
            f"Build Time: \t{info['build_time']}\n"
            f"Profile: \t{info['profile']}\n"
            f"Rustc: \t{info['rustc']}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description="fscached answering as nydusd (singleton, fscache) for nydus-snapshotter.")
    p.add_argument("mode", nargs="?", help="singleton (nydus-snapshotter's fscache driver) or fuse (fusedev)")
    p.add_argument("--version", "-V", action="store_true", help="print the version (Git Commit: ...) and exit")
    p.add_argument("--fscache", metavar="DIR", help="the cache directory (cachefiles `dir`)")
    p.add_argument("--fscache-tag", metavar="TAG", help="cachefiles tag")
    p.add_argument("--fscache-threads", metavar="N", help="accepted (1..1024); fscached's workers are its own")
    p.add_argument("--thread-num", metavar="N", help=argparse.SUPPRESS)  # nydusd FUSE mode: accepted, unused
    p.add_argument("--apisock", metavar="PATH", help="the API's unix socket")
    p.add_argument("--log-level", default="info", help="trace, debug, info, warn or error (default info)")
    p.add_argument("--log-file", metavar="FILE", help="log there instead of stderr")
    p.add_argument("--log-rotation-size", metavar="MIB", default="0", help="rotate the log file at this size (0: never)")
    p.add_argument("--id", help="the daemon id (reported by the API)")
    p.add_argument("--supervisor", metavar="PATH", help="failover supervisor socket (sendfd / takeover)")
    p.add_argument("--upgrade", action="store_true", help="hot upgrade: wait in INIT for a takeover, then start")
    p.add_argument("--config", metavar="FILE", help="singleton: {\"blobs\": [bind entries]}; fuse: the daemon config "
                   "of the image at --mountpoint (with --bootstrap)")
    p.add_argument("--mountpoint", metavar="DIR", help="fuse: the image's directory (dedicated) or the root below "
                   "which images are mounted (shared)")
    p.add_argument("--bootstrap", metavar="FILE", help="fuse, dedicated: the image's bootstrap")
    p.add_argument("--failover-policy", help="fuse: accepted (none, resend, flush): fscached answers every "
                   "request a dead daemon left from its journal")
    p.add_argument("--prefetch-files", metavar="LIST", help="fuse: accepted, not used (prefetch is the image's)")
    p.add_argument("--backend-source", metavar="URL", help=argparse.SUPPRESS)  # snapshotter system controller
    p.add_argument("--ready-file", metavar="FILE", help=argparse.SUPPRESS)  # fscached: written once serving
    return p.parse_args(argv)


FAILOVER_POLICIES = ("none", "resend", "flush")


def check_args(args: argparse.Namespace) -> None:
    if args.mode not in ("singleton", "fuse"):
        what = f"mode {args.mode!r}" if args.mode else "no mode"
        raise ConfigError(f"{what}: fscached's nydusd runs `nydusd singleton --fscache DIR --apisock PATH` "
                          "(nydus-snapshotter's fscache driver) or `nydusd fuse --mountpoint DIR --apisock PATH` "
                          "(its fusedev driver)")
    if args.mode == "singleton" and not args.fscache:
        raise ConfigError("--fscache DIR is required (the cache directory)")
    if args.mode == "fuse":
        if not args.mountpoint:
            raise ConfigError("fuse: --mountpoint DIR is required (the image's directory, or the root of them)")
        if bool(args.bootstrap) != bool(args.config):
            raise ConfigError("fuse: --bootstrap and --config go together (dedicated mode: one image at "
                              "--mountpoint); give neither for the shared mode")
        if args.failover_policy and args.failover_policy not in FAILOVER_POLICIES:
            raise ConfigError(f"invalid --failover-policy {args.failover_policy!r}: {', '.join(FAILOVER_POLICIES)}")
    if not args.apisock:
        raise ConfigError("--apisock PATH is required (images are bound through the API)")
    if args.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"invalid --log-level {args.log_level!r}: use trace, debug, info, warn or error")
    if args.fscache_threads is not None:
        if not args.fscache_threads.isdigit() or not 1 <= int(args.fscache_threads) <= MAX_THREADS:
            raise ConfigError(f"invalid --fscache-threads {args.fscache_threads!r}: a number from 1 to {MAX_THREADS}")
    if not str(args.log_rotation_size).isdigit():
        raise ConfigError(f"invalid --log-rotation-size {args.log_rotation_size!r}: MiB, 0 or more")


def read_initial_binds(path: str | None) -> list[Any]:
    if not path:
        return []
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object, like {{\"blobs\": [...]}}")
    blobs = data.get("blobs", [])
    if not isinstance(blobs, list):
        raise ConfigError(f"--config {path}: blobs must be a list of bind entries")
    return blobs


def setup_logging(level: str, log_file: str | None, rotation_mib: int) -> None:
    """fscached's one logging set-up (fscached.util.logs): journald-aware on stderr, or the file."""
    from fscached.util.logs import setup_logging as setup

    setup(level, log_file, rotation_mib=rotation_mib, backups=LOG_BACKUPS)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.version:
            sys.stdout.write(version_text())
            return 0
        check_args(args)
        initial = read_initial_binds(args.config) if args.mode == "singleton" else []
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.log_file:  # nydus-snapshotter does not make the directory of the log it names
            os.makedirs(os.path.dirname(os.path.abspath(args.log_file)), mode=0o700, exist_ok=True)
        setup_logging(LOG_LEVELS[args.log_level.lower()], args.log_file, int(args.log_rotation_size))
    except OSError as exc:
        print(f"{PROG}: error: --log-file {args.log_file}: {exc.strerror}", file=sys.stderr)
        return 1
    import uvloop

    try:
        # paths resolved here, before the loop: the cwd they are relative to, and the socket left
        args.apisock = os.path.abspath(args.apisock)
        stale_socket = os.path.exists(args.apisock)
        if args.mode == "fuse":
            from fscached.nydusd_fuse import prepare, serve_fuse

            return uvloop.run(serve_fuse(args, prepare(args)))
        args.fscache = os.path.realpath(args.fscache)
        return uvloop.run(serve(args, initial, stale_socket=stale_socket))
    except KeyboardInterrupt:
        return 0


async def serve(args: argparse.Namespace, initial: list[Any], *, stale_socket: bool = False) -> int:
    log = logging.getLogger("fscached")
    try:  # imported here: a missing native extension is one clean line
        from cachefiles.device import CachefilesError
        from fscached.api.server import ApiServer, ApiSocketError, check_socket_path
        from fscached.config import Config
        from fscached.core.catalog import CatalogError
        from fscached.daemon import Daemon
        from fscached.lifecycle.supervisor import Supervisor
    except ImportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    apisock = Path(args.apisock)
    config = Config(cache_dir=Path(args.fscache), tag=args.fscache_tag, kernel_path="cachefiles",
                    log_level=LOG_LEVELS[args.log_level.lower()],
                    ready_file=Path(args.ready_file) if args.ready_file else None)
    daemon = Daemon(config)
    if args.supervisor:
        daemon.supervisor = Supervisor(args.supervisor)
    info = build_info()
    log.info("nydusd (fscached %s, git_commit %s) singleton: cache %s, API %s", info["package_ver"],
             info["git_commit"], config.cache_dir, apisock)
    if args.fscache_threads:
        log.info("--fscache-threads %s: fscached serves asynchronously with its own workers", args.fscache_threads)
    if args.upgrade:
        return await wait_for_takeover(daemon, apisock, args, upgrade=True)
    # stale_socket: nydusd reads a leftover socket + a busy device as a failover restart
    try:
        check_socket_path(apisock)  # before the device is taken: nothing to undo (a live socket: refused)
        await daemon.load()
        daemon.take_kernel_path()
    except CachefilesError as exc:
        if getattr(exc, "errno", None) == errno.EBUSY and stale_socket:
            if args.supervisor:
                log.info("%s is busy and the API socket %s was stale: restarted for failover, waiting in INIT "
                         "for a takeover from the supervisor %s", config.device, apisock, args.supervisor)
                return await wait_for_takeover(daemon, apisock, args, upgrade=False)
            return fail(args, f"{exc}; restarted for failover? without --supervisor there is nothing to take "
                              "over from (nydus-snapshotter passes it with recover_policy = \"failover\")")
        return fail(args, str(exc))
    except (ApiSocketError, CatalogError) as exc:
        return fail(args, str(exc))
    except OSError as exc:
        return fail(args, f"{exc.filename or ''}: {exc.strerror}")
    if args.supervisor:
        daemon.check_failover_support()  # says at start when failover needs a newer kernel
    api = ApiServer(daemon, apisock, daemon_id=args.id, supervisor=args.supervisor)
    try:
        await api.start()
    except ApiSocketError as exc:
        fail(args, str(exc))
        if daemon.frontend is not None:
            daemon.frontend.close(let_go=True)
        return 1
    binder = asyncio.ensure_future(bind_at_start(daemon, api, initial)) if initial else None
    try:
        return await daemon.run()
    finally:
        if binder is not None:
            binder.cancel()
        await api.stop()


def fail(args: argparse.Namespace, message: str) -> int:
    """A start-up error: one line on stderr (the snapshotter's log), and in --log-file."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if args.log_file:
        logging.getLogger("fscached").error("%s", message)
    return 1


async def bind_at_start(daemon: Daemon, api: ApiServer, entries: list[Any]) -> None:
    """nydusd's `--config` blobs, bound once the daemon serves (each failure logged)."""
    from fscached.api.server import ApiError

    log = logging.getLogger("fscached")
    while not daemon.serving:
        if daemon.stopping:
            return
        await asyncio.sleep(0.01)
    for n, entry in enumerate(entries):
        try:
            await api.bind_entry(entry)
        except ApiError as exc:
            log.error("--config blobs[%d]: %s", n, exc.message)


async def wait_for_takeover(daemon: Daemon, apisock: Path, args: argparse.Namespace, *, upgrade: bool,
                            api_options: dict[str, Any] | None = None) -> int:
    """Serve the API in INIT until the supervisor's takeover (Daemon.take_over), then serve the
    kernel: at once after a failover restart, at `start` for a hot upgrade (`--upgrade`: the
    old daemon serves until told to exit). Exit (API or signal) while waiting: leave, exit 0."""
    from fscached.api.server import ApiServer, ApiSocketError

    log = logging.getLogger("fscached")
    daemon.upgrade = upgrade
    daemon.autostart = False
    api = ApiServer(daemon, apisock, daemon_id=args.id, supervisor=args.supervisor, **(api_options or {}))
    try:
        await api.start()
    except ApiSocketError as exc:
        return fail(args, str(exc))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    if args.supervisor is None:
        log.warning("%s: waiting in INIT for a takeover, but without --supervisor there is nothing to take over "
                    "from (exit through the API)", "--upgrade" if upgrade else "restart")
    else:
        log.info("%s: waiting in INIT for a takeover from the supervisor %s",
                 "hot upgrade" if upgrade else "failover restart", args.supervisor)
    try:
        if not await daemon.wait_for_takeover():
            return 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)  # daemon.run() installs its own
        return await daemon.run()
    finally:
        await api.stop()


if __name__ == "__main__":
    sys.exit(main())
