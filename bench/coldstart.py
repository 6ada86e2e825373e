"""Cold start of a real container: classic pull vs lazy (fscached) vs lazy with a start-up
profile vs `nerdctl run` through the real nydus-snapshotter (with and without the profile), per
network, on the host kernel (fanotify). Writes JSON, a Markdown table and a PNG.

    .venv/bin/python bench/coldstart.py [--size full] [--networks 100mbit,1gbit,unshaped]
        [--modes classic,lazy,snapshotter,lazy_profile,snapshotter_profile]
        [--snapshotter-daemon-mode shared|dedicated]
        [--json bench-coldstart.json] [--markdown bench-coldstart.md] [--chart bench-coldstart.png]

Root, a 6.14+ kernel with fanotify pre-content events, Debian's containerd/runc/debootstrap/
skopeo/docker-registry (`make deps`), the snapshotter modes the peers containerd-nydus-grpc
and nerdctl (`make peers`). The workload image is built once (debootstrap + PyPI
wheels, minutes) and cached in /var/cache/fscached/workload. Every ratio is against the classic
pull of the same network in this run. Goals are printed as met / MISSED, never asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from coldstart import ColdstartError  # noqa: E402
from coldstart import report  # noqa: E402
from coldstart.scenario import MODES, Scenario  # noqa: E402
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
    p.add_argument("--json", type=Path, default=Path("bench-coldstart.json"))
    p.add_argument("--markdown", type=Path, default=Path("bench-coldstart.md"))
    p.add_argument("--chart", type=Path, default=Path("bench-coldstart.png"))
    args = p.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    try:
        workload = build_workload(args.size, progress=lambda m: print(m, file=sys.stderr, flush=True))
        runs: list[dict] = []
        working_set: int | None = None
        for network in [n for n in args.networks.split(",") if n]:
            with Scenario(workload, network, snapshotter_daemon_mode=args.snapshotter_daemon_mode) as sc:
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
    args.json.write_text(report.to_json(runs, meta, working_set))
    md = report.markdown(runs, working_set, title=f"Cold start, {workload.size} workload "
                         f"({workload.uncompressed_bytes / report.MiB:.0f} MiB unpacked), host kernel (fanotify)")
    args.markdown.write_text(md)
    report.chart(runs, args.chart)
    print()
    print(md)
    print(f"wrote {args.json}, {args.markdown} and the chart {args.chart.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
