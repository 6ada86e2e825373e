"""bench/dragonfly.py's report (its goals, table and chart) from made-up runs, and its command
line: the bench itself is not part of make test (a fresh cluster per run, about 15 minutes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import dragonfly as bench  # noqa: E402  (bench/dragonfly.py)

MiB = 1 << 20


def run(nodes: int, via: str, profile: bool, egress: float, seconds: list[float], warm: list[float]) -> dict[str, Any]:
    starts = [{"node": f"node{i + 1}", "seconds": s, "bind_seconds": 0.3, "exit_seconds": s + 0.1}
              for i, s in enumerate(seconds)]
    return {"nodes": nodes, "via": via, "profile": profile, "starts": starts, "registry_egress": int(egress * MiB),
            "lan_bytes": int(nodes * egress * MiB), "image_bytes": 90 * MiB, "warm": warm,
            "median": sorted(seconds)[len(seconds) // 2], "worst": max(seconds),
            "warm_median": sorted(warm)[len(warm) // 2], "warm_worst": max(warm)}


def runs(egress8: float, worst8: float) -> list[dict[str, Any]]:
    return [run(1, "dragonfly", False, 90, [9.0], [0.3]), run(1, "registry", False, 27, [2.7], [0.3]),
            run(8, "dragonfly", False, egress8, [8.0] * 7 + [worst8], [0.9] * 7 + [1.5]),
            run(8, "registry", False, 8 * 27, [12.0] * 7 + [19.0], [0.9] * 7 + [1.4])]


def test_goals_met_and_missed() -> None:
    met = bench.goals(runs(100, 12.0), 8)
    assert [m for *_, m in met] == [True, True]
    assert abs(met[0][2] - 100 / 90) < 0.01 and abs(met[1][2] - 12.0 / 9.0) < 0.01
    missed = bench.goals(runs(200, 30.0), 8)
    assert [m for *_, m in missed] == [False, False]
    assert [m for *_, m in bench.goals(runs(100, 12.0)[1:], 8)] == [None, None]  # no N = 1 through Dragonfly


def test_table_chart_and_cpu_note(tmp_path: Path) -> None:
    meta = {"workload": {"size": "small", "nydus_blob_bytes": 90 * MiB}}
    md = bench.markdown(runs(200, 30.0), meta)
    assert "| 8 | Dragonfly, lazy | 200.0 MiB | 7.41x | 8.00 s | 30.00 s |" in md
    assert "| 1 | registry, lazy | 27.0 MiB | 1.00x |" in md
    assert md.count("**MISSED**") == 2
    assert ("(warm) the same 8 starts took 0.90-1.50 s against 0.30 s for one node, so CPU and disk make 0.60 s "
            "of spread, 3 % of the cold spread (22.00 s)") in md
    bench.chart(runs(100, 12.0), tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line() -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "dragonfly.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--nodes" in r.stdout and "--no-profile" in r.stdout, r.stderr
