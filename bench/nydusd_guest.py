#!/usr/bin/env python3
"""Issue 17's second side-by-side table: fscached and nydusd (nydus-rs 2.2.0 from crates.io), both
in cachefiles on-demand mode (fscache), on the same image, in the 6.12 guest (QEMU, software
emulation: only the ratio between the two daemons means anything, never a time on its own).

The host builds the images as bench/nydusd.py does (its pieces, and bench/fanotify.py's, are
imported here, not copied): a SIZE MiB file of random bytes and a 2,000-file ~50 MiB tree, each
converted by `fscached-image convert` (zstd). The guest (2 vCPUs) copies the blobs and bootstraps
to its own ext4 disk, like a node's blob store, and runs bench/nydusd.py's rows with both
daemons in cachefiles mode:
  nydusd    `nydusd singleton --fscache <fresh dir> --apisock ...`, then what nydus-snapshotter
            does: PUT /api/v2/blobs with the bind entry (legacy config, `localfs` backend on the
            blobs dir, or `registry` on the loopback registry), `mount -t erofs -o fsid=`; at
            the end umount, DELETE /api/v2/blobs?domain_id=, SIGTERM (exit 0 expected);
  fscached  `fscached --kernel-path cachefiles` with `mountpoint=`, a fresh cache dir.
Only one process at a time can hold /dev/cachefiles, so the two never serve together: each cold
run starts a fresh daemon on a fresh cache dir and stops it, nydusd first in odd runs and
fscached first in even ones; so does each warm run, which fills the cache with one read first. The page cache is dropped before every timed read; every byte is
checked against the source every run; wrong bytes, a hang (180 s: the daemon is killed), a
daemon that does not start or error lines in a daemon's log are listed and make the exit code 1.
Timings are never asserted.

  cold local     sequential read of the SIZE MiB file (1 MiB reads), local blob
  cold registry  the same from a docker-registry inside the guest (skopeo push in the guest)
  cold walk      every file of the tree, local blob
  warm           the SIZE MiB file again once the daemon's cache is filled (page cache dropped)
  random 4 KiB   cold preads at the same random offsets of the file, local blob: p50 and p99

Usage: bench/nydusd_guest.py [--size-mib 256] [--runs 3] [--walk-files 2000] [--walk-mib 50]
       [--reads 2000] [--no-registry] [--kernel 6.12] [--nydusd PATH] [--json OUT.json] [--markdown OUT.md]
Needs root, qemu-system-x86 and e2fsprogs, the 6.12 test kernel (vm-tests/vmharness/kernels.py
says where it is looked for), and nydusd (`python -m coldstart.peers install nydus-rs`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "vm-tests")]

from bench import fanotify as fb  # noqa: E402
from bench import nydusd as nb  # noqa: E402  (bench/nydusd.py: the rows, the daemons' life, the report)
from coldstart import peers  # noqa: E402
from fscached.util import mounts  # noqa: E402
from registry_server import RegistryServer  # noqa: E402
from scenarios.unix_http import request  # noqa: E402

console = fb.console
SCENARIO = "bench_nydusd"  # vm-tests/scenarios/bench_nydusd.py: calls guest_run in the guest
TITLE = ("{series} guest (cachefiles, emulated: only the ratio means anything): nydusd {version} (fscache) vs "
         "fscached (cachefiles), kernel {kernel}, {cpus} CPU(s) up in the guest (QEMU -smp 2), {compressor} image, best of {runs} runs, one "
         "daemon at a time, page cache dropped before every timed read")
API_TIMEOUT = 120.0


# -- nydusd in fscache mode (guest side) -----------------------------------------------------------
def api(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, str]:
    """One request to nydusd's API socket: (status, body text)."""
    status, raw = request(sock, method, path, body, API_TIMEOUT)
    return status, raw.decode(errors="replace")


def bind_entry(fsid: str, bootstrap: Path, backend: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """PUT /api/v2/blobs's body as nydus-snapshotter's fscache driver writes it (the legacy
    config; nydus-compat.md): the backend as bench/nydusd.py gives it to the FUSE daemon
    ({type, config}), no prefetch. nydusd 2.2 refuses a prefetch_config without every field."""
    return {"type": "bootstrap", "id": fsid, "domain_id": fsid,
            "config": {"id": fsid, "backend_type": backend["type"], "backend_config": backend["config"],
                       "cache_type": "fscache", "cache_config": {"work_dir": str(work_dir)},
                       "prefetch_config": {"enable": False, "threads_count": 8, "merging_size": 1 << 20,
                                           "bandwidth_rate": 0, "prefetch_all": False},
                       "metadata_path": str(bootstrap)}}


def erofs_mounted(path: Path) -> bool:
    return str(path) in mounts.erofs_mounts()


def dmesg_tail(lines: int = 5) -> str:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout.splitlines()
    return " | ".join(line.strip() for line in out[-lines:])


class FscacheNydusd(nb.Nydusd):
    """`nydusd singleton --fscache` serving one bootstrap at `mnt` the way nydus-snapshotter's
    fscache driver has it served: start, bind, `mount -t erofs -o fsid=`; stop: umount, unbind,
    SIGTERM. Everything in `run`; the log and its error lines as bench/nydusd.py's Nydusd."""

    def __init__(self, exe: Path, run: Path, bootstrap: Path, backend: dict[str, Any], fsid: str = "img") -> None:
        super().__init__(exe, run, bootstrap, backend)
        self.bootstrap, self.fsid = bootstrap, fsid
        self.fscache, self.sock = run / "fscache", run / "api.sock"
        # nydusd canonicalizes --fscache: the directory must exist (start() makes it)
        self.argv = [str(exe), "singleton", "--fscache", str(self.fscache), "--apisock", str(self.sock),
                     "--log-level", "warn", "--log-file", str(self.log), "--rlimit-nofile", "0"]

    def start(self, timeout: float = 120) -> FscacheNydusd:
        for d in (self.mnt, self.cache, self.fscache):
            d.mkdir(parents=True, exist_ok=True)
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:  # the socket, then RUNNING
            if self.proc.poll() is not None:
                raise nb.DaemonError(f"nydusd exited {self.proc.returncode} before serving: {self.first_error()}")
            if time.monotonic() > deadline:
                raise nb.DaemonError(f"nydusd did not serve within {timeout:.0f} s: {self.first_error()}")
            if self.sock.exists():
                status, body = api(self.sock, "GET", "/api/v1/daemon")
                if status == 200 and json.loads(body).get("state") == "RUNNING":
                    break
            time.sleep(0.05)
        status, body = api(self.sock, "PUT", "/api/v2/blobs",
                           bind_entry(self.fsid, self.bootstrap, self.backend, self.cache))
        if status != 204:
            raise nb.DaemonError(f"nydusd refused the bind: {status} {body}")
        proc = subprocess.run(["mount", "-t", "erofs", "none", "-o", f"fsid={self.fsid}", str(self.mnt)],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise nb.DaemonError(f"mount -o fsid={self.fsid} through nydusd failed: {proc.stderr.strip()}; "
                                 f"dmesg: {dmesg_tail()}; nydusd: {self.first_error()}")
        os.listdir(self.mnt)  # the root answers: serving
        return self

    def stop(self, timeout: float = 30) -> str | None:
        """The snapshotter's unmount (umount, DELETE the bind), then SIGTERM: what went wrong."""
        if self.proc is None or self.killed:
            self.kill()
            return None
        said = None
        if self.proc.poll() is not None:
            said = f"nydusd had exited {self.proc.returncode} before it was stopped"
        else:
            umount = subprocess.run(["umount", str(self.mnt)], capture_output=True, text=True, check=False)
            if umount.returncode != 0:
                said = f"umount of nydusd's mount failed: {umount.stderr.strip()}"
            status, body = api(self.sock, "DELETE", f"/api/v2/blobs?domain_id={self.fsid}")
            if status != 204 and said is None:
                said = f"nydusd's unbind answered {status} {body}"
            stopped = self.terminate(timeout)  # sent whatever the unmount said
            said = said or stopped
        self.kill()
        return said

    def mounted(self) -> bool:
        return erofs_mounted(self.mnt)


class GuestCtx(nb.Ctx):
    """bench/nydusd.py's run with both daemons in cachefiles mode, one at a time."""

    together = False  # one holder of /dev/cachefiles at a time

    def start_nydusd(self, run: Path, source: nb.Source) -> nb.Nydusd:
        return FscacheNydusd(self.exe, run, source.bootstrap, source.nydusd_backend)


def guest_clock() -> dict[str, Any]:
    """The guest's clocksource now and what the kernel said about clocksources: every time in the
    table is read from it (under QEMU TCG the TSC can be declared unstable, leaving jiffies)."""
    sysfs = Path("/sys/devices/system/clocksource/clocksource0")
    said = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {"current": (sysfs / "current_clocksource").read_text().strip(),
            "available": (sysfs / "available_clocksource").read_text().strip(),
            "resolution_ns": time.clock_getres(time.CLOCK_MONOTONIC) * 1e9,
            "kernel_said": [line for line in said if "clocksource" in line.lower() or "tsc" in line.lower()][-10:]}


def host_tsc_khz() -> int:
    """The host CPU's rate in kHz (/proc/cpuinfo), the rate of the guest's TSC under TCG (QEMU's
    rdtsc reads the host's): given to the guest kernel as tsc_early_khz=, because its own
    calibration against the PIT fails on a busy host, and with no HPET or ACPI PM timer in the
    test kernels it then falls back to jiffies, a 4 ms clock. A rate slightly off scales every
    time alike: the ratios stay."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return round(float(line.split(":")[1]) * 1000)
    raise RuntimeError("no `cpu MHz` line in /proc/cpuinfo: the guest's TSC rate is unknown")


def local_copy(image: Path, to: Path) -> Path:
    """The image's bootstrap and blobs on the guest's own disk (a node's blob store), not 9p."""
    to.mkdir(parents=True)
    shutil.copy2(image / "image.boot", to / "image.boot")
    shutil.copytree(image / "blobs", to / "blobs")
    return to


def guest_run(args: dict[str, Any]) -> dict[str, Any]:
    """In the guest: every row, both daemons; {"results", "problems"}."""
    from vmharness.guest import scratch_dir

    work = scratch_dir() / "b"  # short: fscached's keeper socket path is limited
    work.mkdir()
    ctx = GuestCtx(fb.Bench(work, backend="cachefiles"), Path(args["nydusd"]))
    runs, size = int(args["runs"]), int(args["size_mib"])
    results: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(), "size_mib": size, "runs": runs,
                               "compressor": args["compressor"], "nydusd": args["nydusd"]}
    started = time.monotonic()
    clock = guest_clock()
    if clock["current"] != "tsc":
        ctx.close()
        return {"results": results | {"guest_clock": clock},
                "problems": [f"the guest's clock is {clock['current']} ({clock['resolution_ns'] / 1e6:g} ms), not the "
                             f"TSC: no row measured; the kernel said: {' | '.join(clock['kernel_said'][-3:])}"]}
    try:
        original, expected = Path(args["big"]["source"]), args["big"]["sha256"]
        big = local_copy(Path(args["big"]["image"]), work / "big")
        local = nb.local_source(big)
        console.print("1/5 cold read, local blob ...")
        results["cold_local"] = nb.cold_read(ctx, "cold-local", local, original.name, expected, runs)
        if args["registry"]:
            console.print("2/5 cold read, loopback registry (in the guest) ...")
            ctx.bench.registry = registry = RegistryServer(work / "registry").start()
            fb.skopeo_push(Path(args["big"]["image"]), registry, "bench/big:v1")
            results["cold_registry"] = nb.cold_read(ctx, "cold-reg", nb.registry_source(big, registry, "bench/big", "v1"),
                                                    original.name, expected, runs)
        console.print("3/5 warm read ...")
        results["warm"] = nb.warm(ctx, local, original.name, expected, runs)
        console.print(f"4/5 random 4 KiB cold preads ({args['reads']}) ...")
        results["random"] = nb.random_reads(ctx, local, original.name, original, original.stat().st_size,
                                            int(args["reads"]), runs)
        console.print("5/5 cold walk, local blob ...")
        walk = local_copy(Path(args["walk"]["image"]), work / "walk")
        results["walk"] = nb.cold_walk(ctx, nb.local_source(walk), args["walk"]["digest"], runs)
        results["walk"].update(files=args["walk"]["files"], mib=args["walk"]["mib"])
    except BaseException as exc:
        if not nb.stopped(ctx, exc):
            raise
    finally:
        ctx.close()
    results["guest_seconds"] = time.monotonic() - started
    results["guest_clock"] = guest_clock()
    return {"results": results, "problems": ctx.bench.problems}


# -- host side -------------------------------------------------------------------------------------
def main() -> int:
    from vmharness import VmError, get_kernel, run_scenario

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--walk-files", type=int, default=2000, help="files of the cold tree walk")
    parser.add_argument("--walk-mib", type=int, default=50, help="MiB of the cold tree walk's files")
    parser.add_argument("--reads", type=int, default=2000, help="random 4 KiB cold preads per run")
    parser.add_argument("--compressor", choices=("zstd", "none"), default="zstd", help="of the big file's image")
    parser.add_argument("--no-registry", action="store_true", help="leave out the cold read from the registry")
    parser.add_argument("--kernel", default="6.12", choices=("6.12", "6.1"), help="the guest kernel's series")
    parser.add_argument("--memory-mb", type=int, default=2048, help="of the guest")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds the whole guest run may take")
    parser.add_argument("--nydusd", type=Path, help="default: the nydus-rs peer (python -m coldstart.peers install nydus-rs)")
    parser.add_argument("--json", type=Path, metavar="OUT.json")
    parser.add_argument("--markdown", type=Path, metavar="OUT.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/nydusd_guest.py needs root (QEMU, the guest's mounts)", file=sys.stderr)
        return 1
    try:
        exe = args.nydusd or peers.binary(nb.PEER, "nydusd")
    except peers.PeerError as exc:
        print(f"bench/nydusd_guest.py: {exc}", file=sys.stderr)
        return 1
    version = f"{peers.PEERS[nb.PEER].version} from crates.io" if args.nydusd is None else str(args.nydusd)
    work = Path(tempfile.mkdtemp(prefix="fscng-", dir="/var/tmp"))
    started = time.monotonic()
    results: dict[str, Any] = {}
    problems: list[str] = []
    try:
        kernel = get_kernel(args.kernel)
        console.print(f"building a {args.size_mib} MiB image ({args.compressor}) and a {args.walk_files}-file "
                      f"tree in {work} ...")
        image, original, expected = fb.make_big(work, args.size_mib, args.compressor)
        tree, walk_image = fb.make_tree(work, args.walk_files, args.walk_mib)
        walk = {"image": str(walk_image), "digest": fb.walk_seconds(tree)[1], "files": args.walk_files,
                "mib": args.walk_mib}
        shutil.rmtree(tree)
        guest_args = {"nydusd": str(exe), "runs": args.runs, "size_mib": args.size_mib, "reads": args.reads,
                      "compressor": args.compressor, "registry": not args.no_registry, "walk": walk,
                      "big": {"image": str(image), "source": str(original), "sha256": expected}}
        # the guest's disk holds a copy of both images, the registry's copy, and one daemon's cache
        disk_mib = 4 * args.size_mib + 3 * args.walk_mib + 1024
        console.print(f"booting the {kernel} guest (QEMU -smp 2, {args.memory_mb} MiB) ...")
        res = run_scenario(kernel, SCENARIO, guest_args, timeout=args.timeout, check=False, share=[work],
                           scratch_size=f"{disk_mib}M", memory_mb=args.memory_mb, smp=2,
                           kernel_args=[f"tsc_early_khz={host_tsc_khz()}", "tsc=reliable"])
        out = res.result
        results = out.get("results", {})
        problems = list(out.get("problems", []))
        if res.returncode != 0 or "_error" in out:
            problems.append(f"the guest run failed (exit {res.returncode}): {out.get('_error', '(no result)')}; "
                            f"console tail:\n{res.console_tail(20)}")
        results["vm_seconds"] = res.duration
    except (VmError, OSError, subprocess.CalledProcessError, LookupError, RuntimeError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        problems.append("interrupted")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.update(nydusd_version=version, nydusd_mode="fscache", fscached_mode="cachefiles",
                   host_kernel=platform.release(), problems=problems, seconds_total=time.monotonic() - started)
    results["title"] = TITLE.format(series=args.kernel, version=version, kernel=results.get("kernel", "?"),
                                    cpus=results.get("cpus", "?"), compressor=args.compressor, runs=args.runs)
    nb.print_report(results, problems)
    console.print(f"whole run: {results['seconds_total']:.0f} s (the guest's part: {results.get('vm_seconds', 0):.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.markdown:
        args.markdown.write_text(nb.markdown(results, problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
