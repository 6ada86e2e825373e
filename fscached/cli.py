"""`fscached`: the on-demand EROFS daemon's command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fscached.config import Config, ConfigError, OneLineParser, build_config, load_toml

if TYPE_CHECKING:
    from fscached.lifecycle.systemd import Service

PROG = "fscached"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog=PROG,
        description="Serve EROFS images to the kernel on demand, through fanotify pre-content "
                    "events (Linux 6.14+) or cachefiles on-demand (/dev/cachefiles).",
    )
    parser.add_argument("--config", help="TOML config file (flags override it)")
    parser.add_argument("--cache-dir", help="cache directory (ext4/xfs/btrfs, not tmpfs)")
    parser.add_argument("--kernel-path", "--backend", dest="kernel_path",
                        help="auto (default: fanotify when the kernel has pre-content events, else cachefiles), "
                        "cachefiles or fanotify (--backend is its older name)")
    parser.add_argument("--tag", help="cachefiles tag (default: the kernel's)")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="fsid=F,bootstrap=PATH,blobs=DIR[,domain=D]",
        help="an image to serve; repeat for more",
    )
    parser.add_argument("--log-level", help="debug, info, warning or error (default info)")
    parser.add_argument("--work-dir", help="where bootstraps pulled from registries are kept (default /var/lib/fscached)")
    parser.add_argument("--read-window", help="the most bytes fetched around a small READ (power of two, default 1M; "
                        "less from a network source whose link carries less per request)")
    parser.add_argument("--ready-file", help="written with the pid once the daemon serves")
    parser.add_argument("--stats-file", help="request counters as JSON, written on SIGUSR1 and at exit")
    parser.add_argument("--apisock", help="serve the nydusd-compatible control API on this unix socket "
                        "(images bound and unbound at run time)")
    parser.add_argument("--device", help=argparse.SUPPRESS)  # tests: another device node
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        file_values = load_toml(args.config) if args.config else {}
        apisock = args.apisock if args.apisock is not None else file_values.pop("apisock", None)
        if apisock is not None and (not isinstance(apisock, str) or not apisock.strip()):
            raise ConfigError(f"apisock must be a path, not {apisock!r} (leave it out to serve no API)")
        config = build_config(
            file_values, args.cache_dir, args.tag, args.log_level, args.image,
            args.ready_file, args.stats_file, args.device, args.work_dir, args.read_window,
            args.kernel_path,
        )
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from fscached.util.logs import setup_logging

    setup_logging(config.log_level)  # journald-aware: no timestamps when stderr is the journal
    import uvloop

    try:
        return uvloop.run(start_and_serve(config, Path(apisock).absolute() if apisock else None))
    except KeyboardInterrupt:
        return 0


async def start_and_serve(config: Config, apisock: Path | None = None) -> int:
    try:
        # Imported here: a missing native extension is reported as a clean error.
        from cachefiles.device import CachefilesError
        from fanotify.group import FanotifyError
        from fscached.kernel_path import KernelPathError
        from fscached.core.catalog import CatalogError
        from fscached.daemon import Daemon
        from fscached.frontends.fanotify.keeper import KeeperError
        from fscached.util.api_socket import ApiSocketError, check_socket_path
        from fetcher.source import SourceError
        from fscached.lifecycle.systemd import Service, SystemdError
        from fscached.util.files import describe_os_error
    except ImportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    service: Service | None = None
    try:
        # run by systemd: fds from its store, WATCHDOG=1 from this loop from now on (start-up too)
        service = Service.from_environment()
        if service is not None:
            _under_systemd(service)
        if apisock is not None:
            check_socket_path(apisock)  # before the kernel is involved
        daemon = Daemon(config, service=service)
        await daemon.load()  # every image is readable before the kernel is involved
        daemon.take_kernel_path()
    except (CatalogError, CachefilesError, FanotifyError, KernelPathError, KeeperError, ApiSocketError,
            SystemdError, SourceError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    if apisock is None:
        return await daemon.run()
    # imported only for an API socket (aiohttp's server, prometheus): a tenth of a second of the start
    from fscached.api.server import ApiServer

    api = ApiServer(daemon, apisock)  # on the daemon's loop, beside run()
    return await api.serve_daemon(lambda message: print(f"{PROG}: error: {message}", file=sys.stderr))


def _under_systemd(service: Service) -> None:
    """Log what systemd handed over; a watchdog kill (SIGABRT) prints where the loop was stuck."""
    import faulthandler
    import logging

    log = logging.getLogger("fscached.systemd")
    log.info("%s", service.describe_start())
    if service.watchdog is not None:
        faulthandler.enable()
        service.start_watchdog()
        log.info("watchdog: WATCHDOG=1 every %.1f s (timeout %.1f s)", service.watchdog / 3, service.watchdog)
    if service.fdstore_max is None and service.can_store:
        log.info("systemd did not say how many fds its store takes ($FDSTORE, systemd 254+): "
                 "the unit must set FileDescriptorStoreMax=")


if __name__ == "__main__":
    sys.exit(main())
