#!/usr/bin/env python3
"""fscached (fanotify pre-content events + file-backed EROFS, this machine's kernel) side by side
with nydusd (nydus-rs 2.2.0 from crates.io, FUSE), on the same image: issue 17's comparison.

Both daemons serve the same image directory, built by `fscached-image convert` (RAFS v6, zstd:
random bytes, so most chunks are stored as they are), from the same blob: nydusd as `nydusd fuse
--config --mountpoint --bootstrap` with the `localfs` backend on the image's blobs dir or the
`registry` backend (http) on the loopback registry the image was pushed to with skopeo, its
blobcache in a fresh work dir; fscached with the same blobs dir or the same reference, a fresh
cache dir. Every cold run starts a fresh daemon on a fresh cache. Runs are interleaved (nydusd
first in odd runs, fscached first in even ones), the page cache is dropped before every timed
read, and every byte read through either daemon is checked against the source, every run.

  cold local     sequential read of a SIZE MiB file (1 MiB reads, one reader), local blob
  cold registry  the same from the loopback registry
  cold walk      every file of a 2,000-file ~50 MiB tree (sorted walk, 1 MiB reads), from the
                 registry (--walk-source local: the local blob)
  warm           the SIZE MiB file again once each daemon has filled its cache (both daemons
                 still running, the page cache dropped: what is timed is the daemon's cache)
  random 4 KiB   cold preads at the same random offsets of the file, local blob: p50 and p99

Each row: nydusd's best of the runs, fscached's best, and nydusd / fscached (above 1: fscached is
ahead by that factor), beside the spread of the per-run ratios. Timings are never asserted;
wrong bytes, a hang (a read over 180 s: the daemon is killed), a daemon that does not start or
error lines in a daemon's log are listed and make the exit code 1.
nydusd runs with --rlimit-nofile 0: by default it raises RLIMIT_NOFILE to 1,000,000 and exits
with EPERM ("Operation not permitted", nothing else said) where the hard limit is lower.
Usage: bench/nydusd.py [--size-mib 256] [--runs 3] [--walk-files 2000] [--walk-mib 50] [--reads 2000]
       [--walk-source registry|local] [--compressor zstd|none] [--nydusd PATH] [--json OUT.json] [--markdown OUT.md]
Needs root, a 6.14+ kernel with fanotify pre-content events and file-backed EROFS, /dev/fuse,
skopeo, docker-registry, and nydusd (`python -m coldstart.peers install nydus-rs`).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "fanotify")]

from bench import fanotify as fb  # noqa: E402  (bench/fanotify.py: its helpers, imported, not copied)
from coldstart import peers  # noqa: E402
from daemon_proc import drop_caches  # noqa: E402
from fscached.util import mounts  # noqa: E402
from registry_server import RegistryServer  # noqa: E402
from rich.table import Table  # noqa: E402

console = fb.console
MIB = fb.MIB
PEER = "nydus-rs"
SIDES = ("nydusd", "fscached")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
T = TypeVar("T")


class DaemonError(Exception):
    """A daemon that did not come up (its own words, from its log)."""


class ReadFailed(Exception):
    pass


def order(run: int) -> tuple[str, str]:
    """Who goes first in run `run` (0-based): nydusd in even runs, fscached in odd ones."""
    return SIDES if run % 2 == 0 else (SIDES[1], SIDES[0])


# -- nydusd --------------------------------------------------------------------------------------
def nydusd_config(backend: dict[str, Any], cache: Path) -> dict[str, Any]:
    """nydusd's config (v1, what nydus-snapshotter writes for its fusedev driver; keys as in
    nydus 2.2's docs/nydusd.md): the backend, a blobcache in `cache`, no prefetch."""
    return {"device": {"backend": backend, "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
            "mode": "direct", "digest_validate": False, "enable_xattr": True, "fs_prefetch": {"enable": False}}


def fuse_mounted(path: Path) -> bool:
    return any(e.mountpoint == str(path) and e.fstype.startswith("fuse") for e in mounts.mount_table())


class Nydusd:
    """One `nydusd fuse` process: config, FUSE mountpoint, blobcache, log and API socket in `run`."""

    def __init__(self, exe: Path, run: Path, bootstrap: Path, backend: dict[str, Any]) -> None:
        self.run, self.mnt, self.cache = run, run / "mnt", run / "cache"
        self.log, self.out, self.config = run / "nydusd.log", run / "nydusd.out", run / "nydusd.json"
        self.backend = backend
        self.argv = [str(exe), "fuse", "--config", str(self.config), "--mountpoint", str(self.mnt),
                     "--bootstrap", str(bootstrap), "--apisock", str(run / "api.sock"), "--log-level", "warn",
                     "--log-file", str(self.log), "--rlimit-nofile", "0"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # by kill(): the watchdog's, or stop()'s after SIGTERM was not enough

    def start(self, timeout: float = 60) -> Nydusd:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(nydusd_config(self.backend, self.cache), indent=1))
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not fuse_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise DaemonError(f"nydusd exited {self.proc.returncode} before mounting: {self.first_error()}")
            if time.monotonic() > deadline:
                raise DaemonError(f"nydusd did not mount within {timeout:.0f} s: {self.first_error()}")
            time.sleep(0.01)
        os.listdir(self.mnt)  # the root answers: serving
        return self

    def log_lines(self) -> list[str]:
        text = "".join(p.read_text(errors="replace") for p in (self.log, self.out) if p.exists())
        return ANSI.sub("", text).splitlines()

    def errors(self) -> list[str]:
        """ERROR lines and panics, each with the line after it (nydusd puts the message there)."""
        lines = self.log_lines()
        return [" ".join(x.strip() for x in lines[i:i + 2]) for i, line in enumerate(lines)
                if " ERROR " in line or "panicked" in line or line.startswith("Error:")]

    def first_error(self) -> str:
        found = self.errors()
        return found[0] if found else "(nothing in its log)"

    def stop(self, timeout: float = 30) -> str | None:
        """SIGTERM (nydusd unmounts and exits 0); what went wrong, if anything (then -9 and a
        lazy unmount). A daemon the watchdog killed is not reported again."""
        if self.proc is None or self.killed:
            self.kill()
            return None
        said = None
        if self.proc.poll() is not None:
            said = f"nydusd had exited {self.proc.returncode} before it was stopped"
        else:
            said = self.terminate(timeout)
        if self.mounted() and said is None:
            said = "nydusd exited and left its mount"
        self.kill()
        return said

    def mounted(self) -> bool:
        """Its mount is there (FUSE here; the guest's fscache nydusd: EROFS)."""
        return fuse_mounted(self.mnt)

    def terminate(self, timeout: float) -> str | None:
        """SIGTERM and the wait for the exit: what went wrong, if anything."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return f"nydusd did not stop within {timeout:.0f} s of SIGTERM"
        return f"nydusd exited {code} on SIGTERM" if code != 0 else None

    def kill(self) -> None:
        """-9 (the reader of a hung read gets ENOTCONN through FUSE, EIO through cachefiles) and
        the mount lazily gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.killed = True
            self.proc.kill()
            self.proc.wait(10)
        if self.mounted():
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)


# -- the two daemons on one source ---------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where both daemons get the image from."""

    name: str
    bootstrap: Path  # nydusd's --bootstrap (fscached pulls the same bytes itself with `ref=`)
    nydusd_backend: dict[str, Any]
    fscached_image: Callable[[Path], str]  # mountpoint -> its --image spec


def local_source(image: Path) -> Source:
    def spec(mnt: Path) -> str:
        return f"fsid=img,bootstrap={image / 'image.boot'},blobs={image / 'blobs'},mountpoint={mnt}"

    return Source("local blob", image / "image.boot",
                  {"type": "localfs", "config": {"dir": str(image / "blobs")}}, spec)


def registry_source(image: Path, registry: RegistryServer, repo: str, tag: str) -> Source:
    def spec(mnt: Path) -> str:
        return f"fsid=img,ref={registry.host}/{repo}:{tag},scheme=http,mountpoint={mnt}"

    return Source("loopback registry", image / "image.boot",
                  {"type": "registry", "config": {"scheme": "http", "host": registry.host, "repo": repo,
                                                  "timeout": 30, "connect_timeout": 10, "retry_limit": 2}}, spec)


class Side:
    """One daemon of either kind serving a source at a mountpoint: `mnt`, `kill()` for the
    watchdog; started and stopped by `serving`."""

    def __init__(self, mnt: Path, kill: Callable[[], None]) -> None:
        self.mnt, self.kill = mnt, kill


class Ctx:
    """The run: fb.Bench (fscached daemons, the registry, the work dir, the problems) and nydusd.
    `serving` starts either daemon; bench/nydusd_guest.py's GuestCtx starts both in cachefiles
    mode instead, where the kernel lets one process at a time hold /dev/cachefiles (`together`
    False: the warm row then serves one daemon after the other)."""

    together = True  # may both daemons serve at once?

    def __init__(self, bench: fb.Bench, exe: Path) -> None:
        self.bench, self.exe = bench, exe
        self.nydusds: list[Nydusd] = []

    def problem(self, text: str) -> None:
        self.bench.problem(text)

    def close(self) -> None:
        for n in self.nydusds:
            try:
                n.kill()
            except Exception as exc:  # the rest is cleaned up all the same
                console.print(f"cleanup of nydusd: {exc}")
        self.bench.close()

    def start_nydusd(self, run: Path, source: Source) -> Nydusd:
        """A nydusd of this run's kind, not started yet (FUSE here)."""
        return Nydusd(self.exe, run, source.bootstrap, source.nydusd_backend)

    @contextmanager
    def serving(self, side: str, run: str, source: Source) -> Iterator[Side]:
        """A fresh daemon of `side` on a fresh cache, serving `source`; stopped after (SIGTERM), its
        exit code and log errors reported, its run dir removed."""
        what = f"{run} ({side})"
        if side == "nydusd":
            n = self.start_nydusd(self.bench.work / "runs" / run, source)
            self.nydusds.append(n)
            try:
                n.start()
            except BaseException:
                n.kill()  # what it said is in the DaemonError
                raise
            try:
                yield Side(n.mnt, n.kill)
            finally:
                said = n.stop()
                if said:
                    self.problem(f"{what}: {said}")
                errors = n.errors()
                if errors:
                    self.problem(f"{what}: {len(errors)} error line(s) in nydusd's log, first: {errors[0]}")
                self.nydusds.remove(n)
        else:
            mnt = self.bench.work / "runs" / run / "mnt"
            try:
                proc = self.bench.daemon(run, [source.fscached_image(mnt)], [mnt])
            except AssertionError as exc:
                raise DaemonError(f"fscached did not start: {str(exc).splitlines()[0]}") from None
            try:
                yield Side(mnt, functools.partial(self.bench.cleanup_daemon, proc))
            finally:
                self.bench.stop(proc, what)
        self.bench.remove_run(run)


def timed(ctx: Ctx, side: Side, what: str, read: Callable[[], T]) -> T:
    """drop_caches, then `read()` under the watchdog (a hang kills the daemon: fb.Hang)."""
    drop_caches()
    with fb.watchdog(fb.READ_TIMEOUT, side.kill) as fired:
        try:
            out = read()
        except OSError as exc:
            if not fired.is_set():
                ctx.problem(f"{what}: the read failed: {exc}")
                raise ReadFailed(what) from exc
    if fired.is_set():
        ctx.problem(f"{what}: a read hung for {fb.READ_TIMEOUT:.0f} s; daemon killed")
        raise fb.Hang(what)
    return out


def pair(times: dict[str, list[float]]) -> dict[str, Any]:
    """Both sides' runs, their bests and nydusd / fscached (best over best, and per run)."""
    n, f = times["nydusd"], times["fscached"]
    return {"nydusd_seconds": n, "fscached_seconds": f, "nydusd_best": min(n), "fscached_best": min(f),
            "ratio": min(n) / min(f), "ratios": [a / b for a, b in zip(n, f)]}


# -- the rows ------------------------------------------------------------------------------------
def cold_read(ctx: Ctx, name: str, source: Source, rel: str, expected: str, runs: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for i in range(runs):
        for side in order(i):
            with ctx.serving(side, f"{name}-{side}-{i}", source) as d:
                what = f"{name} run {i + 1}, {side}"
                times[side].append(timed(ctx, d, what, functools.partial(fb.read_seconds, d.mnt / rel)))
                fb.check_bytes(ctx.bench, d.mnt / rel, expected, what)
    return pair(times) | {"source": source.name}


def cold_walk(ctx: Ctx, source: Source, want: str, runs: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for i in range(runs):
        for side in order(i):
            with ctx.serving(side, f"walk-{side}-{i}", source) as d:
                what = f"tree walk run {i + 1}, {side}"
                seconds, got = timed(ctx, d, what, functools.partial(fb.walk_seconds, d.mnt))
                if got != want:
                    ctx.problem(f"{what}: WRONG BYTES (the walk's digest differs from the source tree's)")
                times[side].append(seconds)
    return pair(times) | {"source": source.name}


def warm(ctx: Ctx, source: Source, rel: str, expected: str, runs: int) -> dict[str, Any]:
    """Each daemon fills its cache with one read of the file (checked), then the timed reads, the
    page cache dropped before each: both daemons up at once and the reads interleaved, or, where
    only one can serve at a time (`ctx.together` False), a fresh daemon on a fresh cache per run
    and side, interleaved as the cold rows are, each filled then read once."""
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    fill: dict[str, float] = {}

    def filled(side: str, d: Side) -> None:
        fill[side] = timed(ctx, d, f"warm fill, {side}", functools.partial(fb.read_seconds, d.mnt / rel))
        fb.check_bytes(ctx.bench, d.mnt / rel, expected, f"warm fill, {side}")

    def read(side: str, d: Side, i: int) -> None:
        times[side].append(timed(ctx, d, f"warm run {i + 1}, {side}", functools.partial(fb.read_seconds, d.mnt / rel)))

    if ctx.together:
        with ExitStack() as stack:
            daemons = {side: stack.enter_context(ctx.serving(side, f"warm-{side}", source)) for side in SIDES}
            for side, d in daemons.items():
                filled(side, d)
            for i in range(runs):
                for side in order(i):
                    read(side, daemons[side], i)
            for side, d in daemons.items():
                fb.check_bytes(ctx.bench, d.mnt / rel, expected, f"warm, {side}")
    else:
        for i in range(runs):
            for side in order(i):
                with ctx.serving(side, f"warm-{side}-{i}", source) as d:
                    filled(side, d)
                    read(side, d, i)
                    fb.check_bytes(ctx.bench, d.mnt / rel, expected, f"warm run {i + 1}, {side}")
    return pair(times) | {"fill_seconds": fill, "source": source.name, "together": ctx.together}


def random_reads(ctx: Ctx, source: Source, rel: str, original: Path, size: int, reads: int,
                 runs: int) -> dict[str, Any]:
    """`reads` cold 4 KiB preads at the same random offsets through each daemon, fresh each run."""
    rng = random.Random(4096)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(reads)]
    with open(original, "rb", buffering=0) as f:
        want = [os.pread(f.fileno(), 4096, off) for off in offsets]
    out: dict[str, Any] = {"reads": reads, "source": source.name}
    for side in SIDES:
        out[side] = {"p50_us": [], "p99_us": [], "seconds": []}
    for i in range(runs):
        for side in order(i):
            with ctx.serving(side, f"random-{side}-{i}", source) as d:
                what = f"random reads run {i + 1}, {side}"
                lat, datas = timed(ctx, d, what, functools.partial(fb.random_preads, d.mnt / rel, offsets))
                out[side]["seconds"].append(sum(lat) / 1e6)
                wrong = sum(a != b for a, b in zip(datas, want))
                if wrong:
                    ctx.problem(f"{what}: {wrong} of {reads} preads returned WRONG BYTES")
                out[side]["p50_us"].append(fb.percentile(lat, 50))
                out[side]["p99_us"].append(fb.percentile(lat, 99))
    for q in ("p50_us", "p99_us"):
        n, f = out["nydusd"][q], out["fscached"][q]
        out[q] = {"nydusd_best": min(n), "fscached_best": min(f), "ratio": min(n) / min(f),
                  "ratios": [a / b for a, b in zip(n, f)]}
    return out


# -- report ---------------------------------------------------------------------------------------
def headers(r: dict[str, Any]) -> list[str]:
    """The columns; the daemons' modes as `r` names them (the host's: FUSE and fanotify)."""
    return ["measurement", f"nydusd ({r.get('nydusd_mode', 'FUSE')})", f"fscached ({r.get('fscached_mode', 'fanotify')})",
            "nydusd / fscached", "per-run ratios", "fscached ahead"]


def rows(r: dict[str, Any]) -> list[list[str]]:
    """One row per measurement: the two bests, their ratio (above 1: fscached ahead), the spread
    of the per-run ratios, and whether fscached is ahead."""

    def s(x: float) -> str:
        return f"{x:.3f} s"

    def spread(ratios: list[float]) -> str:
        return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"

    def ahead(ratio: float) -> str:
        return f"yes, {ratio:.2f}x" if ratio > 1 else "NO"

    size = r.get("size_mib", "?")
    out = []
    for key, label in (("cold_local", f"cold read {size} MiB, local blob"),
                       ("cold_registry", f"cold read {size} MiB, loopback registry")):
        if key in r:
            c = r[key]
            out.append([label, s(c["nydusd_best"]), s(c["fscached_best"]), f"{c['ratio']:.2f}",
                        spread(c["ratios"]), ahead(c["ratio"])])
    if "walk" in r:
        w = r["walk"]
        out.append([f"cold walk, {w['files']:,} files {w['mib']} MiB, {w['source']}", s(w["nydusd_best"]),
                    s(w["fscached_best"]), f"{w['ratio']:.2f}", spread(w["ratios"]), ahead(w["ratio"])])
    if "warm" in r:
        w = r["warm"]
        out.append([f"warm read {size} MiB (cache filled, page cache dropped)", s(w["nydusd_best"]),
                    s(w["fscached_best"]), f"{w['ratio']:.2f}", spread(w["ratios"]), ahead(w["ratio"])])
    if "random" in r:
        x = r["random"]
        for q in ("p50", "p99"):
            m = x[f"{q}_us"]
            out.append([f"random 4 KiB cold preads ({x['reads']:,}), {q}", f"{m['nydusd_best']:.0f} us",
                        f"{m['fscached_best']:.0f} us", f"{m['ratio']:.2f}", spread(m["ratios"]), ahead(m["ratio"])])
    return out


def summary(r: dict[str, Any]) -> str:
    table = rows(r)
    if not table:
        return "nothing measured"
    behind = [row[0] for row in table if not row[-1].startswith("yes")]
    least = min(table, key=lambda row: float(row[3]))
    if behind:
        return f"fscached ahead on {len(table) - len(behind)} of {len(table)} rows; not ahead: {'; '.join(behind)}"
    return f"fscached ahead on all {len(table)} rows, by {float(least[3]):.2f}x at least ({least[0]})"


def title(r: dict[str, Any]) -> str:
    if "title" in r:  # another table's (bench/nydusd_guest.py)
        return str(r["title"])
    return (f"nydusd {r.get('nydusd_version', '?')} (FUSE) vs fscached (fanotify + EROFS), kernel "
            f"{r.get('kernel', '?')}, {r.get('cpus', '?')} CPUs, {r.get('compressor', '?')} image, "
            f"best of {r.get('runs', '?')} interleaved runs, page cache dropped before every timed read")


def print_report(r: dict[str, Any], problems: list[str]) -> None:
    table = Table(title=title(r))
    for h in headers(r):
        table.add_column(h, justify="left" if h in ("measurement", "fscached ahead") else "right")
    for row in rows(r):
        table.add_row(*row)
    console.print(table)
    console.print(summary(r))
    if problems:
        console.print("[bold red]problems seen:[/]")
        for p in problems:
            console.print(f"  - {p}")
    else:
        console.print("bytes checked after every timed read, both daemons: all correct; no daemon errors")


def markdown(r: dict[str, Any], problems: list[str]) -> str:
    lines = [title(r), "", "| " + " | ".join(headers(r)) + " |", "|---|" + "---:|" * 4 + "---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(r)]
    lines += ["", summary(r), ""]
    lines += [f"- problem: {p}" for p in problems] or ["bytes checked after every timed read, both daemons: all correct"]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------
def stopped(ctx: Ctx, exc: BaseException) -> bool:
    """What stopped the measurements, reported as a problem (what was measured is printed all
    the same); False for what must go on up (SystemExit)."""
    if isinstance(exc, KeyboardInterrupt):
        console.print("interrupted: cleaning up")
        ctx.bench.problems.append("interrupted")
    elif isinstance(exc, (fb.Hang, ReadFailed)):
        pass  # reported already
    elif isinstance(exc, DaemonError):
        ctx.problem(str(exc))
    elif isinstance(exc, Exception):
        ctx.problem(f"{type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
    else:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--walk-files", type=int, default=2000, help="files of the cold tree walk")
    parser.add_argument("--walk-mib", type=int, default=50, help="MiB of the cold tree walk's files")
    parser.add_argument("--walk-source", choices=("registry", "local"), default="registry")
    parser.add_argument("--reads", type=int, default=2000, help="random 4 KiB cold preads per run")
    parser.add_argument("--compressor", choices=("zstd", "none"), default="zstd", help="of the big file's image")
    parser.add_argument("--nydusd", type=Path, help="default: the nydus-rs peer (python -m coldstart.peers install nydus-rs)")
    parser.add_argument("--json", type=Path, metavar="OUT.json")
    parser.add_argument("--markdown", type=Path, metavar="OUT.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/nydusd.py needs root (mounts, drop_caches)", file=sys.stderr)
        return 1
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            print(f"bench/nydusd.py needs {tool}", file=sys.stderr)
            return 1
    if not os.path.exists("/dev/fuse"):
        print("bench/nydusd.py needs /dev/fuse (nydusd is a FUSE daemon)", file=sys.stderr)
        return 1
    try:
        exe = args.nydusd or peers.binary(PEER, "nydusd")
    except peers.PeerError as exc:
        print(f"bench/nydusd.py: {exc}", file=sys.stderr)
        return 1

    def terminated(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)

    work = Path(tempfile.mkdtemp(prefix="fscn-", dir="/var/tmp"))  # short: the keeper socket path is limited
    ctx = Ctx(fb.Bench(work), exe)
    version = f"{peers.PEERS[PEER].version} from crates.io" if args.nydusd is None else str(args.nydusd)
    results: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(), "size_mib": args.size_mib,
                               "runs": args.runs, "compressor": args.compressor, "nydusd": str(exe),
                               "nydusd_version": version}
    started = time.monotonic()
    try:
        console.print(f"building a {args.size_mib} MiB image ({args.compressor}) in {work} ...")
        image, original, expected = fb.make_big(work, args.size_mib, args.compressor)
        ctx.bench.registry = registry = RegistryServer(work / "registry").start()
        fb.skopeo_push(image, registry, "bench/big:v1")
        local = local_source(image)
        console.print("1/5 cold read, local blob ...")
        results["cold_local"] = cold_read(ctx, "cold-local", local, original.name, expected, args.runs)
        console.print("2/5 cold read, loopback registry ...")
        results["cold_registry"] = cold_read(ctx, "cold-reg", registry_source(image, registry, "bench/big", "v1"),
                                             original.name, expected, args.runs)
        console.print("3/5 warm read ...")
        results["warm"] = warm(ctx, local, original.name, expected, args.runs)
        console.print(f"4/5 random 4 KiB cold preads ({args.reads}) ...")
        results["random"] = random_reads(ctx, local, original.name, original, original.stat().st_size,
                                         args.reads, args.runs)
        console.print(f"5/5 cold walk of a {args.walk_files}-file tree, {args.walk_source} ...")
        tree, walk_image = fb.make_tree(work, args.walk_files, args.walk_mib)
        if args.walk_source == "registry":
            fb.skopeo_push(walk_image, registry, "bench/walk:v1")
            walk_src = registry_source(walk_image, registry, "bench/walk", "v1")
        else:
            walk_src = local_source(walk_image)
        results["walk"] = cold_walk(ctx, walk_src, fb.walk_seconds(tree)[1], args.runs)
        results["walk"].update(files=args.walk_files, mib=args.walk_mib)
    except BaseException as exc:
        if not stopped(ctx, exc):
            raise
    finally:
        ctx.close()
    results["seconds_total"] = time.monotonic() - started
    results["problems"] = ctx.bench.problems
    print_report(results, ctx.bench.problems)
    console.print(f"whole run: {results['seconds_total']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(results, ctx.bench.problems))
    return 1 if ctx.bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
