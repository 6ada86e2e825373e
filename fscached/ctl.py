"""`fscachedctl`: talk to a running fscached through its API socket.

    fscachedctl status                      state, kernel path, images, objects open, bytes
    fscachedctl list                        images: id, domain, mountpoint, blobs
    fscachedctl bind --id F --bootstrap PATH [--blobs DIR] [--domain D] [--mountpoint DIR]
    fscachedctl bind --id F --ref host/repo:tag [--scheme http] [--domain D] [--mountpoint DIR]
    fscachedctl unbind --id F [--domain D]
    fscachedctl mount FSID DIR [--domain D]  mount(2) an image the daemon serves
    fscachedctl cull BLOB_ID                 drop a blob no image uses from the cache

Tables for people, `--json` for scripts. Exit codes: 0 done, 1 the operation failed (the daemon
answered an error, or mount(2) failed), 2 usage error, 3 the daemon cannot be reached (no
socket, nobody listening, no answer in time). Errors are one line on stderr naming what and why.

The API (nydusd's, plus fscached's own fields): `GET /api/v1/daemon`, `GET /metrics`,
`PUT /api/v2/blobs` (a legacy nydus bind entry), `DELETE /api/v2/blobs?domain_id=&blob_id=`;
errors are JSON `{"code", "message"}` with a 4xx/5xx status.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from fscached.util.units import human_bytes

PROG = "fscachedctl"
DEFAULT_SOCK = "/run/fscached/api.sock"
DEFAULT_WORK_DIR = "/var/lib/fscached"
DEFAULT_TIMEOUT = 120.0
MS_RDONLY = 0x1

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CtlError(Exception):
    exit_code = EXIT_FAILED


class UsageError(CtlError):
    exit_code = EXIT_USAGE


class Unreachable(CtlError):
    exit_code = EXIT_UNREACHABLE


class DaemonError(CtlError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(f"the daemon refused ({status} {code}): {message}" if code
                         else f"the daemon refused ({status}): {message}")


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- the API client ---------------------------------------------------------------------------
class Client:
    """HTTP over the daemon's unix socket (aiohttp), one session per command."""

    def __init__(self, sock: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self._session: Any = None

    async def __aenter__(self) -> Client:
        import aiohttp

        if not await asyncio.to_thread(os.path.exists, self.sock):
            raise Unreachable(f"cannot reach the daemon: {self.sock} does not exist "
                              "(is fscached running with its API socket there? see --sock)")
        connector = aiohttp.UnixConnector(path=self.sock)
        self._session = aiohttp.ClientSession(connector=connector,
                                              timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, *, params: dict[str, str] | None = None,
                   body: Any = None, allow: tuple[int, ...] = ()) -> tuple[int, bytes]:
        """(status, body) of a successful request (2xx, or a status in `allow`); DaemonError for
        an error status, Unreachable when there is no answer."""
        import aiohttp

        try:
            async with self._session.request(method, f"http://fscached{path}", params=params,
                                             json=body) as resp:
                data = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            why = exc.os_error.strerror if exc.os_error is not None and exc.os_error.strerror else str(exc)
            raise Unreachable(f"cannot reach the daemon at {self.sock}: {_one_line(why)}") from None
        except TimeoutError:
            raise Unreachable(f"no answer from the daemon at {self.sock} within {self.timeout:g} s "
                              f"({method} {path})") from None
        except aiohttp.ClientError as exc:
            raise Unreachable(f"the daemon at {self.sock} did not answer {method} {path}: "
                              f"{_one_line(str(exc) or type(exc).__name__)}") from None
        if status >= 400 and status not in allow:
            raise _error_of(status, data)
        return status, data

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        _, data = await self.call(method, path, **kwargs)
        try:
            return json.loads(data)
        except ValueError:
            raise CtlError(f"{method} {path}: the daemon's answer is not JSON: {_one_line(data.decode('utf-8', 'replace'), 200)}") from None


def _error_of(status: int, data: bytes) -> DaemonError:
    text = data.decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and ("message" in doc or "code" in doc):
        return DaemonError(status, _one_line(str(doc.get("code") or "")), _one_line(str(doc.get("message") or "")))
    return DaemonError(status, "", _one_line(text) or "(no message)")


# -- numbers ------------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus text -> {sample name: {sorted labels: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def _total(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> int | None:
    samples = metrics.get(name)
    if samples is None:
        return None
    want = set(labels.items())
    return int(sum(v for k, v in samples.items() if want <= set(k)))


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def summarize(info: dict[str, Any], metrics: dict[str, dict[tuple[tuple[str, str], ...], float]] | None) -> dict[str, Any]:
    """What `status` shows: the daemon's answer, with the numbers from /metrics where it serves
    them (else from the daemon's counters)."""
    fsc = _dict(info.get("fscached"))
    counters = _dict(fsc.get("counters"))
    version = _dict(info.get("version"))
    m = metrics or {}
    reads = {o: _total(m, "fscached_reads_total", outcome=o) for o in ("cached", "filled", "failed")}
    if reads["filled"] is None:
        reads = {"cached": counters.get("read_cached"), "filled": None, "failed": counters.get("read_failed")}
    served = _total(m, "fscached_read_bytes_total")
    fetched = _total(m, "fscached_source_bytes_total")
    objects = _total(m, "fscached_objects_open")
    return {
        "id": info.get("id"),
        "state": info.get("state"),
        "version": version.get("package_ver"),
        "git_commit": version.get("git_commit"),
        "backend": fsc.get("backend"),
        "kernel": fsc.get("kernel"),
        "cache_dir": fsc.get("cache_dir"),
        "images": len(fsc.get("images") or []),
        "objects_open": objects if objects is not None else counters.get("objects_open"),
        "bytes_served": served if served is not None else counters.get("read_bytes"),
        "bytes_served_from_cache": _total(m, "fscached_read_bytes_total", outcome="cached"),
        "bytes_fetched": fetched if fetched is not None else counters.get("fetched_bytes"),
        "reads": reads,
        "cache_bytes": _total(m, "fscached_cache_bytes"),
    }




def _blob_ids(blobs: Any) -> list[str]:
    ids = []
    for blob in blobs or []:
        if isinstance(blob, dict):
            blob = blob.get("id") or blob.get("blob_id") or ""
        ids.append(str(blob))
    return ids


# -- output -------------------------------------------------------------------------------------
def _console() -> Any:
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _say(args: argparse.Namespace, text: str, doc: dict[str, Any]) -> None:
    if args.json:
        _print_json(doc)
    else:
        print(text)


def show_status(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"fscached {summary['id']}" if summary.get("id") else "fscached", show_header=False,
                  box=None, title_justify="left", pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    version = summary.get("version") or "-"
    if summary.get("git_commit"):
        version += f" ({str(summary['git_commit'])[:12]})"
    reads = summary.get("reads") or {}
    rows = [
        ("state", summary.get("state") or "-"),
        ("version", version),
        ("kernel path", summary.get("backend") or "-"),
        ("kernel", str(summary.get("kernel") or "-")),
        ("cache dir", summary.get("cache_dir") or "-"),
        ("images", str(summary.get("images"))),
        ("objects open", "-" if summary.get("objects_open") is None else str(summary["objects_open"])),
        ("bytes served", human_bytes(summary.get("bytes_served"))
         + (f" ({human_bytes(summary['bytes_served_from_cache'])} from the cache)"
            if summary.get("bytes_served_from_cache") is not None else "")),
        ("bytes fetched", human_bytes(summary.get("bytes_fetched"))),
        ("reads", ", ".join(f"{reads[k]} {k}" for k in ("cached", "filled", "failed") if reads.get(k) is not None) or "-"),
        ("cache size", human_bytes(summary.get("cache_bytes"))),
    ]
    for key, value in rows:
        table.add_row(key, value)
    _console().print(table)


def show_images(images: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.table import Table

    if not images:
        print("no images")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold")
    for name in ("ID", "DOMAIN", "MOUNTPOINT", "BLOBS"):
        table.add_column(name, overflow="fold")
    for image in images:
        ids = _blob_ids(image.get("blobs"))
        blobs = f"{len(ids)}: " + " ".join(i[:12] for i in ids) if ids else "0"
        table.add_row(str(image.get("id") or "-"), str(image.get("domain_id") or "-"),
                      str(image.get("mountpoint") or "-"), blobs)
    _console().print(table)


# -- commands -----------------------------------------------------------------------------------
async def _daemon_info(client: Client) -> dict[str, Any]:
    info = await client.json("GET", "/api/v1/daemon")
    if not isinstance(info, dict):
        raise CtlError("GET /api/v1/daemon: the daemon's answer is not a JSON object")
    return info


def _images(info: dict[str, Any]) -> list[dict[str, Any]]:
    fsc = info.get("fscached")
    images = fsc.get("images") if isinstance(fsc, dict) else None
    return [i for i in images if isinstance(i, dict)] if isinstance(images, list) else []


async def cmd_status(client: Client, args: argparse.Namespace) -> int:
    info = await _daemon_info(client)
    metrics = None
    try:
        _, text = await client.call("GET", "/metrics")
        metrics = parse_metrics(text.decode("utf-8", "replace"))
    except (DaemonError, ValueError):  # an API without /metrics: the counters say less
        metrics = None
    summary = summarize(info, metrics)
    if args.json:
        _print_json(summary)
    else:
        show_status(summary)
    return EXIT_OK


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    images = _images(await _daemon_info(client))
    if args.json:
        _print_json(images)
    else:
        show_images(images)
    return EXIT_OK


def bind_entry(args: argparse.Namespace) -> dict[str, Any]:
    """The legacy nydus bind entry for `PUT /api/v2/blobs`."""
    fsid = args.id
    domain = args.domain or fsid
    config: dict[str, Any] = {"id": fsid, "cache_type": "fscache", "cache_config": {"work_dir": DEFAULT_WORK_DIR}}
    entry: dict[str, Any] = {"type": "bootstrap", "id": fsid, "domain_id": domain, "config": config}
    if args.ref is not None:
        from fetcher.image_ref import parse_image_ref

        if args.blobs is not None:
            raise UsageError("--blobs goes with --bootstrap; with --ref the blobs come from the registry")
        try:
            ref = parse_image_ref(args.ref)
        except ValueError as exc:
            raise UsageError(f"--ref: {exc}") from None
        config["backend_type"] = "registry"
        config["backend_config"] = {"host": ref.host, "repo": ref.repo, "scheme": args.scheme}
        entry["ref"] = args.ref
    else:
        if args.scheme != "https":
            raise UsageError("--scheme goes with --ref")
        bootstrap = Path(args.bootstrap).absolute()  # the daemon does not share our working directory
        if not bootstrap.is_file():
            raise UsageError(f"--bootstrap {bootstrap}: no such file")
        blobs = Path(args.blobs).absolute() if args.blobs is not None else bootstrap.parent / "blobs"
        if not blobs.is_dir():
            raise UsageError(f"--blobs {blobs}: no such directory" + ("" if args.blobs else " (the default: blobs/ beside the bootstrap)"))
        config["backend_type"] = "localfs"
        config["backend_config"] = {"dir": str(blobs)}
        config["metadata_path"] = str(bootstrap)
    if args.mountpoint is not None:
        entry["mountpoint"] = str(Path(args.mountpoint).absolute())
    return entry


async def cmd_bind(client: Client, args: argparse.Namespace) -> int:
    entry = bind_entry(args)
    await client.call("PUT", "/api/v2/blobs", body=entry)
    where = f" on {entry['mountpoint']}" if "mountpoint" in entry else ""
    domain = f" (domain {entry['domain_id']})" if entry["domain_id"] != entry["id"] else ""
    _say(args, f"bound image {entry['id']}{domain}{' and mounted' + where if where else ''}",
         {"bound": entry["id"], "domain_id": entry["domain_id"], "mountpoint": entry.get("mountpoint")})
    return EXIT_OK


async def cmd_unbind(client: Client, args: argparse.Namespace) -> int:
    domain = args.domain or args.id
    await client.call("DELETE", "/api/v2/blobs", params={"domain_id": domain, "blob_id": args.id})
    _say(args, f"unbound image {args.id}" + (f" (domain {domain})" if domain != args.id else ""),
         {"unbound": args.id, "domain_id": domain})
    return EXIT_OK


async def cmd_cull(client: Client, args: argparse.Namespace) -> int:
    await client.call("DELETE", "/api/v2/blobs", params={"blob_id": args.blob_id})
    _say(args, f"culled blob {args.blob_id}", {"culled": args.blob_id})
    return EXIT_OK


async def cmd_mount(client: Client, args: argparse.Namespace) -> int:
    target = Path(await asyncio.to_thread(os.path.abspath, args.dir))
    if not await asyncio.to_thread(target.is_dir):
        raise UsageError(f"{target}: not a directory (create the mount point first)")
    images = [i for i in _images(await _daemon_info(client)) if i.get("id") == args.fsid
              and (args.domain is None or (i.get("domain_id") or i.get("id")) == args.domain)]
    if not images:
        raise CtlError(f"the daemon serves no image {args.fsid}" + (f" in domain {args.domain}" if args.domain else "")
                       + " (see fscachedctl list)")
    if len(images) > 1:
        raise UsageError(f"image {args.fsid} is served in domains "
                         f"{', '.join(str(i.get('domain_id')) for i in images)}: say which with --domain")
    mount = images[0].get("mount")
    if not isinstance(mount, dict) or not mount.get("source"):
        raise CtlError(f"the daemon gives no mount arguments for image {args.fsid}")
    source, options = str(mount["source"]), str(mount.get("options") or "")
    fstype = str(mount.get("fstype") or "erofs")
    try:
        import native
    except ImportError as exc:
        raise CtlError(str(exc)) from None
    try:
        await asyncio.to_thread(native.mount, source, str(target), fstype, MS_RDONLY, options)
    except OSError as exc:
        hint = {errno.EPERM: " (mounting needs root)", errno.EBUSY: " (already mounted?)"}.get(exc.errno or 0, "")
        raise CtlError(f"mount image {args.fsid} on {target}: {exc.strerror or exc}{hint}") from None
    _say(args, f"mounted image {args.fsid} on {target}",
         {"mounted": args.fsid, "mountpoint": str(target), "source": source, "fstype": fstype, "options": options})
    return EXIT_OK


COMMANDS = {"status": cmd_status, "list": cmd_list, "bind": cmd_bind, "unbind": cmd_unbind,
            "mount": cmd_mount, "cull": cmd_cull}


# -- command line ---------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # on the command and on each subcommand: `fscachedctl --json list` and `fscachedctl list --json`
    common.add_argument("--sock", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"the daemon's API socket (default {DEFAULT_SOCK})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts instead of tables")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:g})")
    top = _Parser(prog=PROG, parents=[common],
                  description="Control a running fscached through its API socket.",
                  epilog="exit codes: 0 done, 1 the operation failed (the daemon answered an error, or "
                         "mount(2) failed), 2 usage error, 3 the daemon cannot be reached")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", parents=[common], help="state, kernel path, images, objects open, bytes served and fetched")
    sub.add_parser("list", parents=[common], help="the images served: id, domain, mountpoint, blobs")
    bind = sub.add_parser("bind", parents=[common], help="serve one more image (from a bootstrap file or a registry)")
    bind.add_argument("--id", required=True, help="the image's fsid")
    bind.add_argument("--domain", help="share blobs with the other images of this domain (default: the fsid)")
    source = bind.add_mutually_exclusive_group(required=True)
    source.add_argument("--bootstrap", metavar="PATH", help="the image's bootstrap file (image.boot)")
    source.add_argument("--ref", metavar="HOST/REPO:TAG", help="an image in a registry: the daemon pulls its bootstrap")
    bind.add_argument("--blobs", metavar="DIR", help="the blob directory (default: blobs/ beside the bootstrap)")
    bind.add_argument("--scheme", choices=("https", "http"), default="https", help="with --ref: http for a plain-HTTP registry")
    bind.add_argument("--mountpoint", metavar="DIR", help="the daemon mounts the image there")
    unbind = sub.add_parser("unbind", parents=[common], help="stop serving an image (unmounting what the daemon mounted)")
    unbind.add_argument("--id", required=True, help="the image's fsid")
    unbind.add_argument("--domain", help="its domain (default: the fsid)")
    mount = sub.add_parser("mount", parents=[common], help="mount an image the daemon serves (mount(2), needs root)")
    mount.add_argument("fsid", metavar="FSID")
    mount.add_argument("dir", metavar="DIR")
    mount.add_argument("--domain", help="when the fsid is served in several domains")
    cull = sub.add_parser("cull", parents=[common], help="remove a blob no image uses from the cache")
    cull.add_argument("blob_id", metavar="BLOB_ID")
    return top


async def run(args: argparse.Namespace) -> int:
    async with Client(args.sock, args.timeout) as client:
        return await COMMANDS[args.command](client, args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        args.sock = getattr(args, "sock", DEFAULT_SOCK)
        args.json = getattr(args, "json", False)
        args.timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
        if args.timeout <= 0:
            raise UsageError("--timeout must be positive")
        return asyncio.run(run(args))
    except CtlError as exc:
        print(f"{PROG}: error: {_one_line(str(exc), 1000)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
