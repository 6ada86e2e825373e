"""bench/nydusd.py's report from made-up runs (ratios, spreads, who is ahead, the summary), the
order of the interleaved runs, nydusd's config, and the command line. The bench itself is not
part of make test: it takes minutes and its timings are never asserted."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import nydusd as bench  # noqa: E402  (bench/nydusd.py)


def made_up(walk_nydusd: list[float]) -> dict[str, Any]:
    r: dict[str, Any] = {"size_mib": 256, "runs": 2, "kernel": "6.18", "cpus": 2, "compressor": "zstd",
                         "nydusd_version": "2.2.0 from crates.io"}
    r["cold_local"] = bench.pair({"nydusd": [3.0, 2.0], "fscached": [1.0, 1.25]}) | {"source": "local blob"}
    r["cold_registry"] = bench.pair({"nydusd": [4.0, 5.0], "fscached": [2.0, 2.0]}) | {"source": "loopback registry"}
    r["walk"] = bench.pair({"nydusd": walk_nydusd, "fscached": [1.0, 1.1]}) | {
        "source": "loopback registry", "files": 2000, "mib": 50}
    r["warm"] = bench.pair({"nydusd": [0.5, 0.6], "fscached": [0.4, 0.4]}) | {"source": "local blob"}
    r["random"] = {"reads": 2000, "source": "local blob",
                   "p50_us": {"nydusd_best": 30.0, "fscached_best": 10.0, "ratio": 3.0, "ratios": [3.0, 2.5]},
                   "p99_us": {"nydusd_best": 9000.0, "fscached_best": 6000.0, "ratio": 1.5, "ratios": [1.5, 1.2]}}
    return r


def test_pair_is_best_over_best_and_per_run() -> None:
    p = bench.pair({"nydusd": [3.0, 2.0], "fscached": [1.0, 1.25]})
    assert (p["nydusd_best"], p["fscached_best"], p["ratio"]) == (2.0, 1.0, 2.0)
    assert p["ratios"] == [3.0, 1.6]


def test_rows_and_summary_when_fscached_is_ahead_everywhere() -> None:
    r = made_up([2.0, 2.4])
    rows = bench.rows(r)
    assert rows[0] == ["cold read 256 MiB, local blob", "2.000 s", "1.000 s", "2.00", "1.60-3.00", "yes, 2.00x"]
    assert rows[2] == ["cold walk, 2,000 files 50 MiB, loopback registry", "2.000 s", "1.000 s", "2.00",
                       "2.00-2.18", "yes, 2.00x"]
    assert rows[4][1:] == ["30 us", "10 us", "3.00", "2.50-3.00", "yes, 3.00x"]
    assert len(rows) == 6
    assert bench.summary(r) == ("fscached ahead on all 6 rows, by 1.25x at least "
                                "(warm read 256 MiB (cache filled, page cache dropped))")


def test_a_row_where_nydusd_is_ahead_is_named() -> None:
    r = made_up([0.9, 1.0])
    walk = bench.rows(r)[2]
    assert walk[3:] == ["0.90", "0.90-0.91", "NO"]
    assert bench.summary(r) == ("fscached ahead on 5 of 6 rows; not ahead: "
                                "cold walk, 2,000 files 50 MiB, loopback registry")
    md = bench.markdown(r, ["tree walk run 1, nydusd: WRONG BYTES"])
    assert "| cold walk, 2,000 files 50 MiB, loopback registry | 0.900 s | 1.000 s | 0.90 | 0.90-0.91 | NO |" in md
    assert "- problem: tree walk run 1, nydusd: WRONG BYTES" in md


def test_a_run_cut_short_reports_what_it_measured() -> None:
    r = made_up([2.0, 2.4])
    for key in ("walk", "warm", "random", "cold_registry"):
        del r[key]
    assert [row[0] for row in bench.rows(r)] == ["cold read 256 MiB, local blob"]
    assert bench.summary({}) == "nothing measured"


def test_runs_alternate_who_goes_first() -> None:
    assert [bench.order(i) for i in range(3)] == [("nydusd", "fscached"), ("fscached", "nydusd"),
                                                  ("nydusd", "fscached")]


def test_nydusd_config_is_the_snapshotters_fusedev_one(tmp_path: Path) -> None:
    cfg = bench.nydusd_config({"type": "localfs", "config": {"dir": "/blobs"}}, tmp_path)
    assert cfg == {"device": {"backend": {"type": "localfs", "config": {"dir": "/blobs"}},
                              "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path)}}},
                   "mode": "direct", "digest_validate": False, "enable_xattr": True, "fs_prefetch": {"enable": False}}


def test_command_line() -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "nydusd.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for option in ("--size-mib", "--runs", "--walk-files", "--walk-source", "--reads", "--nydusd", "--json",
                   "--markdown"):
        assert option in r.stdout
