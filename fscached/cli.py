"""`fscached`: the on-demand EROFS daemon's command line."""
from __future__ import annotations

import argparse
import logging
import sys

from fscached.config import Config, ConfigError, build_config, load_toml

PROG = "fscached"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every other config error
        raise ConfigError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog=PROG,
        description="Serve EROFS images to the kernel on demand, through fanotify pre-content "
                    "events (Linux 6.14+) or cachefiles on-demand (/dev/cachefiles).",
    )
    parser.add_argument("--config", help="TOML config file (flags override it)")
    parser.add_argument("--cache-dir", help="cache directory (ext4/xfs/btrfs, not tmpfs)")
    parser.add_argument("--backend", help="kernel path: auto (default: fanotify when the kernel has "
                        "pre-content events, else cachefiles), cachefiles or fanotify")
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
    parser.add_argument("--read-window", help="bytes fetched around a small READ (power of two, default 1M)")
    parser.add_argument("--ready-file", help="written with the pid once the daemon serves")
    parser.add_argument("--stats-file", help="request counters as JSON, written on SIGUSR1 and at exit")
    parser.add_argument("--device", help=argparse.SUPPRESS)  # tests: another device node
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        file_values = load_toml(args.config) if args.config else {}
        config = build_config(
            file_values, args.cache_dir, args.tag, args.log_level, args.image,
            args.ready_file, args.stats_file, args.device, args.work_dir, args.read_window,
            args.backend,
        )
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import uvloop

    try:
        return uvloop.run(start_and_serve(config))
    except KeyboardInterrupt:
        return 0


async def start_and_serve(config: "Config") -> int:
    try:
        # Imported here: a missing native extension is reported as a clean error.
        from cachefiles.device import CachefilesError
        from fanotify.group import FanotifyError
        from fscached.backend import BackendError
        from fscached.catalog import CatalogError
        from fscached.daemon import Daemon
        from fscached.keeper import KeeperError
    except ImportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    try:
        daemon = Daemon(config)
        await daemon.load()  # every image is readable before the kernel is involved
        daemon.bind()
    except (CatalogError, CachefilesError, FanotifyError, BackendError, KeeperError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    return await daemon.run()


if __name__ == "__main__":
    sys.exit(main())
