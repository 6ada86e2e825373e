"""N nodes cold-starting one container image at the same moment, through a real Dragonfly cluster
and, in the same run, straight from the registry (issue 16). Writes JSON, a Markdown table and a
PNG chart (registry egress and start times against N).

    .venv/bin/python bench/dragonfly.py [--size small] [--nodes 1,2,4,8] [--no-profile]
        [--json bench-dragonfly.json] [--markdown bench-dragonfly.md] [--chart bench-dragonfly.png]

Root, a 6.14+ kernel with fanotify pre-content events, Debian's containerd/runc/skopeo/
docker-registry (`make deps`), the built peers (`python -m coldstart.peers install`). Every run
is a fresh cluster (coldstart.fleet.run_fleet): the registry behind a 100 Mbit/s, 2 ms uplink,
N nodes on a 1 Gbit/s LAN, lazy starts of the workload (`small` by default: Debian + numpy, the
one `make test` builds) with and without a start-up profile (recorded once, first). Ratios are
against runs of this same invocation; goals are printed as met / MISSED, never asserted:

- at N = 8 through Dragonfly the registry sends at most 1.5x what one node fetches (one node
  through Dragonfly; straight from the registry 8 nodes fetch about 8x what one does);
- the worst of the 8 nodes' starts is within 2x of a single node's start (through Dragonfly).

`warm` is each run's N containers started again at once on the filled caches (no network): the
part of the spread that is this machine's CPUs and disk (all N nodes share its cores).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from coldstart import ColdstartError  # noqa: E402
from coldstart.fleet import VIAS, record_profile, run_fleet  # noqa: E402
from coldstart.scenario import WORK_ROOT  # noqa: E402
from coldstart.workload import build_workload  # noqa: E402

MiB = 1 << 20
LABELS = {("dragonfly", False): "Dragonfly, lazy", ("dragonfly", True): "Dragonfly, lazy + profile",
          ("registry", False): "registry, lazy", ("registry", True): "registry, lazy + profile"}


def find(runs: list[dict[str, Any]], nodes: int, via: str, profile: bool) -> dict[str, Any] | None:
    for r in runs:
        if r["nodes"] == nodes and r["via"] == via and r["profile"] == profile:
            return r
    return None


def goals(runs: list[dict[str, Any]], top: int) -> list[tuple[str, str, float | None, bool | None]]:
    """(what, target, value, met) for the two goals, at N = top through Dragonfly, lazy."""
    one, many = find(runs, 1, "dragonfly", False), find(runs, top, "dragonfly", False)
    if one is None or many is None:
        return [(f"N = {top} Dragonfly registry egress / one node's", "<= 1.5x", None, None),
                (f"N = {top} Dragonfly worst start / one node's", "<= 2x", None, None)]
    egress = many["registry_egress"] / one["registry_egress"]
    worst = many["worst"] / one["median"]
    return [(f"N = {top} Dragonfly registry egress / one node's (N = 1, Dragonfly)", "<= 1.5x", egress, egress <= 1.5),
            (f"N = {top} Dragonfly worst start / one node's start (N = 1, Dragonfly)", "<= 2x", worst, worst <= 2.0)]


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    direct_one = find(runs, 1, "registry", False)
    base = direct_one["registry_egress"] if direct_one else None
    lines = [f"## N nodes cold-starting one image: {meta['workload']['size']} workload "
             f"({meta['workload']['nydus_blob_bytes'] / MiB:.0f} MiB of nydus blobs), 100 Mbit/s uplink, "
             "1 Gbit/s LAN, host kernel (fanotify)", "",
             "| N | how | registry egress | x one node | median start | worst start | LAN | warm median / worst |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({r["nodes"] for r in runs}):
        for via in VIAS:
            for profile in (False, True):
                r = find(runs, n, via, profile)
                if r is None:
                    continue
                x = f"{r['registry_egress'] / base:.2f}x" if base else "-"
                warm = (f"{r['warm_median']:.2f} / {r['warm_worst']:.2f} s" if r.get("warm") else "-")
                lines.append(f"| {n} | {LABELS[via, profile]} | {r['registry_egress'] / MiB:.1f} MiB | {x} | "
                             f"{r['median']:.2f} s | {r['worst']:.2f} s | {r['lan_bytes'] / MiB:.1f} MiB | {warm} |")
    top = max(r["nodes"] for r in runs)
    lines += ["", "`x one node`: the registry's egress against one node starting straight from the registry "
              "(lazy), in this run. `warm`: the same N containers again on the filled caches, no network.", "",
              "Goals:", ""]
    for what, target, value, met in goals(runs, top):
        shown = f"{value:.2f}x" if value is not None else "not measured"
        verdict = "met" if met else ("MISSED" if met is not None else "-")
        lines.append(f"- {what}: {shown} (goal {target}): **{verdict}**")
    lines += ["", cpu_note(runs, top)]
    return "\n".join(lines) + "\n"


def cpu_note(runs: list[dict[str, Any]], top: int) -> str:
    """How much of the top N's cold starts is this machine's CPUs: the warm starts (the same N
    containers at once, every byte in the caches: no network) against one node's warm start."""
    parts = []
    for via in VIAS:
        r, one = find(runs, top, via, False), find(runs, 1, via, False)
        if r is None or not r.get("warm"):
            continue
        cold = [s["seconds"] for s in r["starts"]]
        cold_spread, warm_spread = max(cold) - min(cold), max(r["warm"]) - min(r["warm"])
        single = f" against {one['warm'][0]:.2f} s for one node" if one and one.get("warm") else ""
        share = min(1.0, warm_spread / cold_spread) if cold_spread > 0 else 1.0
        parts.append(f"{via}: the {top} cold starts took {min(cold):.2f}-{max(cold):.2f} s; with no network at all "
                     f"(warm) the same {top} starts took {min(r['warm']):.2f}-{max(r['warm']):.2f} s{single}, so "
                     f"CPU and disk make {warm_spread:.2f} s of spread, {100 * share:.0f} % of the cold spread "
                     f"({cold_spread:.2f} s)")
    return ("CPU (all nodes share this machine's cores): " + "; ".join(parts) + ".") if parts else ""


def chart(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (egress_ax, start_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for (via, profile), label in LABELS.items():
        points = sorted((r["nodes"], r) for r in runs if r["via"] == via and r["profile"] == profile)
        if not points:
            continue
        ns = [n for n, _ in points]
        style = "-" if via == "dragonfly" else "--"
        marker = "s" if profile else "o"
        egress_ax.plot(ns, [r["registry_egress"] / MiB for _, r in points], style, marker=marker, label=label)
        start_ax.plot(ns, [r["worst"] for _, r in points], style, marker=marker, label=f"{label}: worst")
    egress_ax.set(xlabel="nodes starting at once", ylabel="registry egress (MiB)", title="What the registry sends")
    start_ax.set(xlabel="nodes starting at once", ylabel="seconds to the first output",
                 title="The slowest node's start")
    for ax in (egress_ax, start_ax):
        ax.set_xticks(sorted({r["nodes"] for r in runs}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", help="workload size: small (default) or full")
    p.add_argument("--nodes", default="1,2,4,8")
    p.add_argument("--no-profile", action="store_true", help="only lazy starts, no start-up profile")
    p.add_argument("--no-warm", action="store_true", help="no warm (no network) rerun")
    p.add_argument("--json", type=Path, default=Path("bench-dragonfly.json"))
    p.add_argument("--markdown", type=Path, default=Path("bench-dragonfly.md"))
    p.add_argument("--chart", type=Path, default=Path("bench-dragonfly.png"))
    args = p.parse_args(argv)
    counts = [int(n) for n in args.nodes.split(",") if n]
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    runs: list[dict[str, Any]] = []
    t_start = time.monotonic()
    base: Path | None = None
    try:
        workload = build_workload(args.size, progress=say)
        base = Path(tempfile.mkdtemp(prefix="fscd-df-", dir=WORK_ROOT))
        profile = None if args.no_profile else record_profile(workload, base / "record")
        for n in counts:
            for via in VIAS:
                for with_profile in ((False,) if profile is None else (False, True)):
                    t = time.monotonic()
                    result = run_fleet(workload, n, via, base / f"n{n}-{via}-{int(with_profile)}",
                                       profile=profile if with_profile else None, warm=not args.no_warm,
                                       progress=say).to_json()
                    runs.append(result)
                    print(f"N={n} {LABELS[via, with_profile]:28} median {result['median']:.2f} s, worst "
                          f"{result['worst']:.2f} s, registry {result['registry_egress'] / MiB:.1f} MiB, "
                          f"LAN {result['lan_bytes'] / MiB:.1f} MiB   [{time.monotonic() - t:.0f} s]", flush=True)
    except ColdstartError as exc:
        print(f"dragonfly bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    meta = {"workload": {"size": workload.size, "packages": workload.packages, "versions": workload.versions,
                         "nydus_blob_bytes": workload.nydus_blob_bytes, "bootstrap_bytes": workload.bootstrap_bytes,
                         "command": workload.command},
            "network": {"uplink": "100mbit, 2 ms RTT", "lan": "1gbit"}, "kernel_path": "fanotify",
            "peers": {"scheduler": "d7y.io/dragonfly/v2 v2.5.1", "dfdaemon": "dragonfly-client 1.5.10"},
            "seconds": round(time.monotonic() - t_start), "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    top = max(counts)
    args.json.write_text(json.dumps({"meta": meta, "runs": runs,
                                     "goals": [{"what": w, "target": t, "value": v, "met": m}
                                               for w, t, v, m in goals(runs, top)]}, indent=1) + "\n")
    md = markdown(runs, meta)
    args.markdown.write_text(md)
    chart(runs, args.chart)
    print()
    print(md)
    print(f"wrote {args.json}, {args.markdown} and the chart {args.chart.resolve()} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
