"""Cold start of a real container: classic pull vs lazy (fscached) vs lazy with a start-up
profile vs `nerdctl run` through the real nydus-snapshotter (with and without the profile), per
network, on the host kernel (fanotify). Writes JSON, a Markdown table and a PNG.

    .venv/bin/python bench/coldstart.py [--size full] [--networks 100mbit,1gbit,unshaped]
        [--modes classic,lazy,snapshotter,lazy_profile,snapshotter_profile]
        [--snapshotter-daemon-mode shared|dedicated] [--nydusd-runs N]
        [--json bench-coldstart.json] [--markdown bench-coldstart.md] [--chart bench-coldstart.png]

Root, a 6.14+ kernel with fanotify pre-content events, Debian's containerd/runc/debootstrap/
skopeo/docker-registry (`make deps`), the snapshotter modes the peers containerd-nydus-grpc
and nerdctl (`make peers`). The workload image is built once (debootstrap + PyPI
wheels, minutes) and cached in /var/cache/fscached/workload. Every ratio is against the classic
pull of the same network in this run. Goals are printed as met / MISSED, never asserted.

--nydusd-runs N (issue 17's side-by-side; needs the real nydusd, `python -m coldstart.peers
install nydus-rs`, which make bench does not build): on each network, before the modes, N pairs
of cold `nerdctl run`s through the real snapshotter (fusedev, the daemon mode above), one with
the real nydusd as nydusd_path (scenario mode snapshotter_nydusd), one with fscached's (mode
snapshotter), interleaved (nydusd first in odd runs); an extra table: best of runs each, their
ratio and the spread of the per-run ratios. Each run checks the container's output and that the
daemon the snapshotter ran is the one named. `--modes ''` runs the pairs alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from coldstart import ColdstartError  # noqa: E402
from coldstart import report  # noqa: E402
from coldstart.scenario import MODES, NYDUSD_MODE, Scenario  # noqa: E402
from coldstart.snapshotter import DAEMON_MODES  # noqa: E402
from coldstart.workload import build_workload  # noqa: E402
from erofs_image.profile import StartupProfile  # noqa: E402

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="full", help="workload size: small or full (default)")
    p.add_argument("--networks", default="100mbit,1gbit,unshaped")
    p.add_argument("--modes", default=",".join(MODES),
                   help="in this order: snapshotter before lazy_profile (which pushes the profile)")
    p.add_argument("--snapshotter-daemon-mode", default="shared", choices=DAEMON_MODES,
                   help="nydus-snapshotter's daemon_mode (shared: one nydusd started before t0)")
    p.add_argument("--nydusd-runs", type=int, default=0, metavar="N",
                   help="pairs of snapshotter runs, the real nydusd vs fscached as nydusd_path (default 0: none)")
    p.add_argument("--json", type=Path, default=Path("bench-coldstart.json"))
    p.add_argument("--markdown", type=Path, default=Path("bench-coldstart.md"))
    p.add_argument("--chart", type=Path, default=Path("bench-coldstart.png"))
    args = p.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes: {', '.join(unknown)} unknown (choose {', '.join(MODES)}"
                + (f"; {NYDUSD_MODE} runs with --nydusd-runs N)" if NYDUSD_MODE in unknown else ")"))
    if args.nydusd_runs < 0:
        p.error("--nydusd-runs: 0 or more")
    pairs: list[dict[str, Any]] = []
    try:
        workload = build_workload(args.size, progress=lambda m: print(m, file=sys.stderr, flush=True))
        runs: list[dict] = []
        working_set: int | None = None
        for network in [n for n in args.networks.split(",") if n]:
            with Scenario(workload, network, snapshotter_daemon_mode=args.snapshotter_daemon_mode) as sc:
                # before the modes: fscached's snapshotter run must not find a pushed profile
                for n in range(args.nydusd_runs):
                    pairs.append(side_by_side(sc, n))
                for mode in modes:
                    t = time.monotonic()
                    result = getattr(sc, mode)()
                    print(f"{result.summary()}   [{time.monotonic() - t:.0f} s]", flush=True)
                    if result.available:
                        runs.append(report.run_record(result.to_json()))
                    if mode == "lazy_profile" and result.available and working_set is None and sc.profile_path:
                        working_set = report.bootstrap_layer_bytes(workload.nydus / "oci") + report.working_set_bytes(
                            StartupProfile.load(sc.profile_path), workload.bootstrap)
    except ColdstartError as exc:
        print(f"coldstart: error: {exc}", file=sys.stderr)
        return 1
    meta = {"workload": {"size": workload.size, "packages": workload.packages, "versions": workload.versions,
                         "layer_bytes": workload.layer_bytes, "uncompressed_bytes": workload.uncompressed_bytes,
                         "nydus_blob_bytes": workload.nydus_blob_bytes, "bootstrap_bytes": workload.bootstrap_bytes,
                         "command": workload.command},
            "kernel_path": "fanotify", "snapshotter_daemon_mode": args.snapshotter_daemon_mode, "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if pairs:
        meta["nydusd_side_by_side"] = pairs
    args.json.write_text(report.to_json(runs, meta, working_set))
    md = ""
    if runs:
        md = report.markdown(runs, working_set, title=f"Cold start, {workload.size} workload "
                             f"({workload.uncompressed_bytes / report.MiB:.0f} MiB unpacked), host kernel (fanotify)")
    if pairs:
        md += ("\n" if md else "") + report.nydusd_pairs_markdown(pairs, args.snapshotter_daemon_mode)
    args.markdown.write_text(md)
    wrote = f"{args.json} and {args.markdown}"
    if runs:
        report.chart(runs, args.chart)
        wrote = f"{args.json}, {args.markdown} and the chart {args.chart.resolve()}"
    print()
    print(md)
    print(f"wrote {wrote}")
    return 0


def side_by_side(sc: Scenario, n: int) -> dict[str, Any]:
    """Run `n` (0-based) of the side-by-side: both daemons once, nydusd first in even `n`."""
    order = ("nydusd", "fscached") if n % 2 == 0 else ("fscached", "nydusd")
    got: dict[str, Any] = {"network": sc.network_name, "run": n + 1, "order": list(order)}
    for daemon in order:
        t = time.monotonic()
        result = sc.snapshotter_nydusd() if daemon == "nydusd" else sc.snapshotter()
        print(f"{result.summary()}   [{daemon}, pair {n + 1}; {time.monotonic() - t:.0f} s]  {result.note}", flush=True)
        got[daemon] = {"mode": result.mode, "seconds": result.seconds,
                       "bytes": result.bytes_fetched, "image_bytes": result.image_bytes,
                       "output": result.output[:1], "phases": result.phases, "note": result.note}
    return got


if __name__ == "__main__":
    sys.exit(main())
