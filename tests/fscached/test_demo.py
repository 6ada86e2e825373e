"""`make demo` end to end: `python -m coldstart.demo` as the Makefile runs it, judged by what it
prints and writes: five cold starts of a real container (classic, lazy, nerdctl through the real
nydus-snapshotter, and both lazy ways with a start-up profile) with the right output, lazy
fetching less than classic, a real PNG chart and tables, nothing left behind (network
namespaces, mounts, processes, snapshotter stacks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coldstart.demo import missing_tools

REPO = Path(__file__).resolve().parents[2]


def run_demo(*args: str, timeout: float = 900) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env["COLUMNS"] = "140"
    r = subprocess.run([sys.executable, "-m", "coldstart.demo", *args], cwd=REPO, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return r.returncode, r.stdout


def leftovers() -> list[str]:
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if line.startswith("fscd-")]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if "/fscd-cs-" in line.split()[4]]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "/fscd-cs-" in cmd or "/fsn-" in cmd:
            found.append(f"process {pid}: {cmd[:200]}")
    return found


@pytest.mark.root
@pytest.mark.timeout(1200)
def test_make_demo_starts_a_container_five_ways(tmp_path: Path) -> None:
    if missing_tools():
        pytest.fail(f"{missing_tools()} missing: `make test` installs them (make deps)")
    before = leftovers()
    code, output = run_demo("--network", "unshaped", "--out", str(tmp_path))
    assert code == 0, output
    doc = json.loads((tmp_path / "coldstart.json").read_text())
    runs = {r["mode"]: r for r in doc["runs"]}
    assert set(runs) == {"classic", "lazy", "profile", "snapshotter", "snapshotter_profile"}, output
    expected = runs["classic"]["output"][0]
    assert expected.startswith("numpy ") and "sum=499500" in expected, runs["classic"]
    for mode, run in runs.items():
        assert run["output"][0] == expected, (mode, run["output"])
        assert run["seconds"] > 0 and run["bytes"] > 0, run
    assert runs["lazy"]["bytes"] < runs["classic"]["bytes"], output
    assert runs["profile"]["bytes"] < runs["classic"]["bytes"], output
    assert runs["snapshotter"]["bytes"] < runs["classic"]["bytes"], output
    assert runs["snapshotter_profile"]["bytes"] < runs["snapshotter"]["bytes"], output
    png = (tmp_path / "coldstart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert str(tmp_path / "coldstart.png") in output  # the user is told where the chart is
    for label in ("classic pull", "lazy (fscached)", "lazy + start-up profile", "nerdctl + nydus-snapshotter",
                  "nydus-snapshotter + profile"):
        assert label in output and label in (tmp_path / "coldstart.md").read_text(), label
    # nothing of its own left (it may clean up what a killed run left before it: that is not new)
    assert [item for item in leftovers() if item not in before] == [], output


def test_demo_refuses_an_unknown_network() -> None:
    code, output = run_demo("--network", "56k", timeout=60)
    assert code == 2 and "invalid choice: '56k'" in output, output
