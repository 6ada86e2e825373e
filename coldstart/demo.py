"""`python -m coldstart.demo` (make demo): a container's cold start, five ways, measured.

1. Build (first run: a few minutes; later runs reuse it) a real workload image: Debian bookworm
   minbase + python3 (debootstrap) + numpy from PyPI, three gzip layers, and its nydus form made
   by `fscached-image convert`; cached in /var/cache/fscached/workload.
2. Start docker-registry in a network namespace of its own, behind a veth pair shaped like a
   node's network (default 100 Mbit/s, 2 ms round trip), and push both forms with skopeo.
3. Start a container of `python3 /app/start.py` (import numpy, print a line) with Debian's
   containerd and runc (state of their own), five ways:
   - classic: `ctr images pull` (download and unpack every layer), then `ctr run`;
   - lazy: fscached, already running, binds the image (pulls the bootstrap, mounts it), then
     `ctr run --rootfs` on an overlay over the mount: bytes arrive as the container reads them;
   - nerdctl + nydus-snapshotter: what a containerd user types, `nerdctl run --snapshotter
     nydus`, with the real nydus-snapshotter (fusedev driver) driving fscached's `nydusd`, which
     answers with a lazily filled EROFS mount (not FUSE) on the fanotify path;
   - lazy + start-up profile: a first node records what start-up read, `fscached-image profile
     push` attaches it to the image in the registry, and a fresh node fetches exactly that, in
     large requests, as soon as the image is mounted;
   - nydus-snapshotter + profile: the same through nerdctl (the snapshotter's nydusd finds the
     profile by the image's bootstrap).
   The snapshotter modes need the peers containerd-nydus-grpc and nerdctl (built by `make demo`
   from the Go module proxy into /var/cache/fscached/peers, a few minutes the first time). In
   the QEMU guest the demo runs the three direct modes.
4. Print the table (time to first output, bytes fetched, share of the image, speed-up over
   classic) and write a chart of bytes over time (PNG), JSON and Markdown.

The kernel path: fanotify pre-content events on the host when it has them (6.14+), else
cachefiles on-demand on the host when /dev/cachefiles exists, else the cachefiles path in a QEMU
guest with a ready-built kernel (../shared/vm or $FSCACHED_KERNEL_DIR), where times are
emulated (compare them only with each other).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coldstart import ColdstartError, report
from coldstart.netns import PROFILES

DEFAULT_OUT = Path(os.environ.get("FSCACHED_DEMO_DIR", "/var/tmp/fscached-demo"))
SIZE = "small"  # the test suite's workload too: one cached build serves both
TOOLS = ("containerd", "ctr", "runc", "skopeo", "docker-registry", "debootstrap")
REPO_ROOT = Path(__file__).resolve().parent.parent


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def kernel_path() -> tuple[str, str]:
    """("fanotify" | "cachefiles" | "vm", why)."""
    from fanotify.group import probe

    probe_dir = Path(tempfile.mkdtemp(prefix="fscached-probe-", dir="/var/tmp"))
    try:
        reason = probe(probe_dir)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if reason is None:
        return "fanotify", "this kernel has fanotify pre-content events"
    if os.path.exists("/dev/cachefiles"):
        return "cachefiles", f"no fanotify pre-content events ({reason}); /dev/cachefiles exists"
    return "vm", f"this kernel has neither path ({reason}; no /dev/cachefiles): a QEMU guest serves instead"


def run_on_host(workload: Any, network: str, path: str, say: Any) -> list[dict[str, Any]]:
    from coldstart.scenario import MODES, Scenario

    results = []
    with Scenario(workload, network, kernel_path=path) as sc:
        for mode in MODES:
            say(f"[bold]{report.SCENARIO_MODES[mode]}[/]: starting the container ...")
            result = getattr(sc, mode)()
            say(f"  {result.summary()}")
            results.append(result.to_json())
    return results


def run_in_vm(workload: Any, network: str, say: Any) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO_ROOT / "vm-tests"))
    from vmharness import get_kernel, run_scenario  # type: ignore[import-not-found]  # the test suite's QEMU harness

    say("booting the 6.12 kernel under QEMU (software emulation: minutes) ...")
    res = run_scenario(get_kernel("6.12"), "coldstart", {"workload_dir": str(workload.path), "network": network},
                       timeout=3000, memory_mb=3072, scratch_size="6G", share=[workload.path],
                       extra_qemu_args=["-cpu", "max"])  # numpy needs x86-64-v2
    return list(res.result["results"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coldstart.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="100mbit", choices=sorted(PROFILES),
                   help="the registry's link (default 100mbit: 100 Mbit/s, 2 ms round trip)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where the chart and tables go ({DEFAULT_OUT})")
    args = p.parse_args(argv)
    console = Console(highlight=False)
    say = console.print
    if os.geteuid() != 0:
        say("fscached demo: error: run it as root (containerd, mounts, network namespaces, fanotify)")
        return 1
    missing = missing_tools()
    if missing:
        say(f"fscached demo: error: {', '.join(missing)} missing: `make deps` installs them "
            "(Debian packages containerd runc skopeo docker-registry debootstrap)")
        return 1
    path, why = kernel_path()
    say(f"[bold]kernel path[/]: {path}: {why}")
    started = time.monotonic()
    try:
        from coldstart.workload import build_workload

        workload = build_workload(SIZE, progress=lambda m: say(f"  [dim]{m}[/]"))
        say(f"[bold]image[/]: Debian bookworm + python3 + {', '.join(workload.packages)}: "
            f"{workload.layer_bytes / report.MiB:.0f} MiB as gzip layers, "
            f"{workload.uncompressed_bytes / report.MiB:.0f} MiB unpacked, "
            f"{workload.nydus_blob_bytes / report.MiB:.0f} MiB of nydus blobs")
        say(f"[bold]network[/]: the registry in its own network namespace, link {args.network}")
        results = (run_in_vm(workload, args.network, say) if path == "vm"
                   else run_on_host(workload, args.network, path, say))
    except ColdstartError as exc:
        say(f"fscached demo: error: {exc}")
        return 1
    runs = [report.run_record(r) for r in results if r.get("available", True)]
    show_table(console, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    chart = report.chart(runs, args.out / "coldstart.png",
                         title=f"Cold start of `python3 -c 'import numpy'` ({path})")
    (args.out / "coldstart.json").write_text(report.to_json(runs, {"kernel_path": path, "network": args.network}, None))
    (args.out / "coldstart.md").write_text(report.markdown(runs, None, title=f"Cold start ({path}, {args.network})"))
    say(f"\nchart: [bold]{chart}[/] (bytes fetched over time, a dot at the first output)")
    say(f"tables: {args.out / 'coldstart.md'}, {args.out / 'coldstart.json'}")
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


def show_table(console: Console, runs: list[dict[str, Any]]) -> None:
    ratios = report.ratios(runs)
    table = Table(title="time to the container's first output")
    for col in ("network", "mode", "first output", "vs classic", "fetched", "share of image"):
        table.add_column(col, justify="left" if col in ("network", "mode") else "right")
    for run in runs:
        r = ratios[run["network"]]
        speed = r.get(f"{run['mode']}_speedup")
        table.add_row(run["network"], report.MODE_LABELS[run["mode"]], f"{run['seconds']:.2f} s",
                      "baseline" if run["mode"] == "classic" else (f"{speed:.1f}x" if speed else "-"),
                      f"{run['bytes'] / report.MiB:.1f} MiB", f"{100 * run['bytes'] / run['image_bytes']:.1f} %")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
