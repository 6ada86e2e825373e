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

Start-up on a slow or loaded node. A daemon the snapshotter restarted for failover gets about
2 s to listen on its API socket (the stale socket refuses at once, and both WaitUntilState(INIT)
and the liveness monitor's Subscribe try 20 times, 100-200 ms apart), and 10 s from before its
exec to take the state from the supervisor (SendStatesTimeout); fscached's imports alone can take
longer (about 10 s in a TCG guest). So `nydusd singleton` does two things first, with nothing
heavy imported (`start_early`): it binds its API socket (the snapshotter's requests wait in the
backlog until the daemon answers them: its client waits 30 s for an answer), and at a failover
restart or a hot upgrade (`--supervisor` with a stale API socket, or `--upgrade`) it takes the
state and the kernel fd from the supervisor at once, kept for the takeover.

Logs go to `--log-file` (rotated at `--log-rotation-size` MiB, 0 = never) with timestamps, else
to stderr: without timestamps, with syslog priority prefixes, when stderr is the journal
(systemd's JOURNAL_STREAM names it).
"""
from __future__ import annotations

# only what the early start needs at the top (see the module docstring): the rest is imported
# by the functions that use it
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fscached.util.api_socket import ApiSocketError, Listener, bind_listening, check_socket_path

if TYPE_CHECKING:
    import argparse

    from fscached.api.server import ApiServer
    from fscached.daemon import Daemon

PROG = "nydusd"
LOG_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "warning": "warning",
              "error": "error"}
LOG_BACKUPS = 5
MAX_THREADS = 1024


def version_text() -> str:
    from fscached.util.buildinfo import build_info

    info = build_info()
    return (f"{PROG} (fscached) {info['package_ver']}\n"
            f"Version: \t{info['package_ver']}\n"
            f"Git Commit: \t{info['git_commit']}\n"
            f"Build Time: \t{info['build_time']}\n"
            f"Profile: \t{info['profile']}\n"
            f"Rustc: \t{info['rustc']}\n")


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from fscached.config import OneLineParser

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
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


FAILOVER_POLICIES = ("none", "resend", "flush")


def check_args(args: argparse.Namespace) -> None:
    from fscached.config import ConfigError

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
    import json

    from fscached.config import ConfigError

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


# -- the early start (see the module docstring) ------------------------------------------------
# nydusd's options that take a value: start_early skips their values (kept equal to parse_args's
# by tests/fscached/test_api.py)
VALUE_OPTIONS = frozenset({
    "--fscache", "--fscache-tag", "--fscache-threads", "--thread-num", "--apisock", "--log-level", "--log-file",
    "--log-rotation-size", "--id", "--supervisor", "--config", "--mountpoint", "--bootstrap", "--failover-policy",
    "--prefetch-files", "--backend-source", "--ready-file"})
FLAG_OPTIONS = frozenset({"--upgrade"})


class EarlyStart:
    """What `nydusd singleton` did before its imports: whether a socket was at `--apisock` (a
    stale one: a failover restart), the socket it bound there (None: it could not, the normal
    start says why), the state and fds it took from the supervisor, and what to log once
    logging is set up. `close()` lets go of what the daemon did not take."""

    def __init__(self, apisock: str, stale: bool) -> None:
        self.apisock = apisock
        self.stale = stale
        self.listener: Listener | None = None
        self.offer: tuple[bytes, list[int]] | None = None
        self.notes: list[str] = []

    def take_listener(self) -> Listener | None:
        listener, self.listener = self.listener, None
        return listener

    def take_offer(self) -> tuple[bytes, list[int]] | None:
        offer, self.offer = self.offer, None
        return offer

    def close(self) -> None:
        listener, offer = self.take_listener(), self.take_offer()
        if listener is not None:
            listener.close()
        for fd in offer[1] if offer is not None else []:
            try:
                os.close(fd)
            except OSError:
                pass


def _scan(argv: list[str]) -> dict[str, Any] | None:
    """The few things start_early needs from nydusd's command line, as the snapshotter writes
    it (`--opt value`): None for anything else (help, version, an unknown or abbreviated option,
    a second mode), left to the real parser."""
    found: dict[str, Any] = {"modes": []}
    it = iter(argv)
    for token in it:
        if token in VALUE_OPTIONS:
            value = next(it, None)
            if value is None:
                return None
            found[token] = value
        elif token in FLAG_OPTIONS:
            found[token] = True
        elif token.startswith("-"):
            return None
        else:
            found["modes"].append(token)
    return found


def start_early(argv: list[str]) -> EarlyStart | None:
    """`nydusd singleton ... --apisock P`: bind P at once (a stale socket is replaced, a live one
    left to the normal start to refuse), and with `--supervisor` at a failover restart (a socket
    was at P) or a hot upgrade (`--upgrade`), take the state and the fds the supervisor offers:
    it listens only for 10 s, from before it started us. None: not a singleton start."""
    found = _scan(argv)
    if found is None or found["modes"] != ["singleton"] or not found.get("--apisock"):
        return None
    apisock = os.path.abspath(found["--apisock"])
    early = EarlyStart(apisock, os.path.exists(apisock))
    try:
        if check_socket_path(Path(apisock)):
            early.notes.append(f"removed the stale API socket {apisock}")
        early.listener = bind_listening(Path(apisock))
    except ApiSocketError:
        return early  # the normal start checks again and says why
    supervisor = found.get("--supervisor")
    if supervisor and (early.stale or found.get("--upgrade")):
        from fscached.lifecycle.supervisor import FailoverError, receive_states

        try:
            data, fds = receive_states(supervisor)
        except FailoverError as exc:
            early.notes.append(f"the state was not taken at start ({exc}): the takeover asks the supervisor")
        else:
            early.offer = (data, fds)
            early.notes.append(f"took the state ({len(data)} bytes, {len(fds)} fd(s)) the supervisor {supervisor} "
                               "offered, for the takeover")
    return early


def main(argv: list[str] | None = None) -> int:
    early = start_early(sys.argv[1:] if argv is None else list(argv))
    try:
        return _main(argv, early)
    finally:
        if early is not None:
            early.close()


def _main(argv: list[str] | None, early: EarlyStart | None) -> int:
    from fscached.config import ConfigError

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
        stale_socket = early.stale if early is not None else os.path.exists(args.apisock)
        if args.mode == "fuse":
            from fscached.nydusd_fuse import prepare, serve_fuse

            return uvloop.run(serve_fuse(args, prepare(args)))
        args.fscache = os.path.realpath(args.fscache)
        return uvloop.run(serve(args, initial, stale_socket=stale_socket, early=early))
    except KeyboardInterrupt:
        return 0


async def serve(args: argparse.Namespace, initial: list[Any], *, stale_socket: bool = False,
                early: EarlyStart | None = None) -> int:
    import asyncio
    import errno
    import logging

    log = logging.getLogger("fscached")
    try:  # imported here: a missing native extension is one clean line
        from cachefiles.device import CachefilesError
        from fscached.api.server import ApiServer
        from fscached.config import Config
        from fscached.core.catalog import CatalogError
        from fscached.daemon import Daemon
        from fscached.lifecycle.supervisor import Supervisor
        from fscached.util.buildinfo import build_info
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
    listener = None
    if early is not None:
        for note in early.notes:
            log.info("at start: %s", note)
        listener = early.take_listener()
        offer = early.take_offer()
        if offer is not None and daemon.supervisor is not None:
            daemon.supervisor.keep_offer(*offer)
    if args.fscache_threads:
        log.info("--fscache-threads %s: fscached serves asynchronously with its own workers", args.fscache_threads)
    try:
        if args.upgrade:
            listener, waiting = None, listener
            return await wait_for_takeover(daemon, apisock, args, upgrade=True, listener=waiting)
        # stale_socket: nydusd reads a leftover socket + a busy device as a failover restart
        try:
            if listener is None:
                check_socket_path(apisock)  # before the device is taken: nothing to undo (a live socket: refused)
            await daemon.load()
            daemon.take_kernel_path()
        except CachefilesError as exc:
            if getattr(exc, "errno", None) == errno.EBUSY and stale_socket:
                if args.supervisor:
                    log.info("%s is busy and the API socket %s was stale: restarted for failover, waiting in INIT "
                             "for a takeover from the supervisor %s", config.device, apisock, args.supervisor)
                    listener, waiting = None, listener
                    return await wait_for_takeover(daemon, apisock, args, upgrade=False, listener=waiting)
                return fail(args, f"{exc}; restarted for failover? without --supervisor there is nothing to take "
                                  "over from (nydus-snapshotter passes it with recover_policy = \"failover\")")
            return fail(args, str(exc))
        except (ApiSocketError, CatalogError) as exc:
            return fail(args, str(exc))
        except OSError as exc:
            return fail(args, f"{exc.filename or ''}: {exc.strerror}")
        if daemon.supervisor is not None:
            daemon.supervisor.drop_offer()  # the device was free: no takeover to come
        if args.supervisor:
            daemon.check_failover_support()  # says at start when failover needs a newer kernel
        api = ApiServer(daemon, apisock, daemon_id=args.id, supervisor=args.supervisor)
        try:
            listener, serving = None, listener
            await api.start(serving)
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
    finally:
        if listener is not None:  # not served: no socket left behind
            listener.close()
        if daemon.supervisor is not None:
            daemon.supervisor.drop_offer()


def fail(args: argparse.Namespace, message: str) -> int:
    """A start-up error: one line on stderr (the snapshotter's log), and in --log-file."""
    import logging

    print(f"{PROG}: error: {message}", file=sys.stderr)
    if args.log_file:
        logging.getLogger("fscached").error("%s", message)
    return 1


async def bind_at_start(daemon: Daemon, api: ApiServer, entries: list[Any]) -> None:
    """nydusd's `--config` blobs, bound once the daemon serves (each failure logged)."""
    import asyncio
    import logging

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
                            api_options: dict[str, Any] | None = None, listener: Listener | None = None) -> int:
    """Serve the API in INIT until the supervisor's takeover (Daemon.take_over), then serve the
    kernel: at once after a failover restart, at `start` for a hot upgrade (`--upgrade`: the
    old daemon serves until told to exit). Exit (API or signal) while waiting: leave, exit 0.
    `listener`: the API socket bound already (start_early)."""
    import asyncio
    import logging
    import signal

    from fscached.api.server import ApiServer

    log = logging.getLogger("fscached")
    daemon.upgrade = upgrade
    daemon.autostart = False
    api = ApiServer(daemon, apisock, daemon_id=args.id, supervisor=args.supervisor, **(api_options or {}))
    try:
        await api.start(listener)
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
