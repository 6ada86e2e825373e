"""The cold-start modes on the host kernel, small workload, unshaped network: the right output,
lazy fetches less than classic (directly bound, and through nerdctl and the real
nydus-snapshotter), a pushed profile is found and replayed on both paths, and nothing of the
machine's containerd is touched."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from coldstart import mounts_under, unmount_under
from coldstart.containerd import Containerd
from coldstart import ColdstartError
from coldstart.scenario import ModeResult, Scenario
from coldstart.workload import Workload

pytestmark = pytest.mark.root

MACHINE_PATHS = [Path("/run/containerd"), Path("/var/lib/containerd"), Path("/opt/containerd")]


@pytest.fixture(scope="module")
def machine_before() -> dict[Path, bool]:
    return {p: p.exists() for p in MACHINE_PATHS}


@pytest.fixture(scope="module")
def scenario_dir(coldstart_host: None) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="fscd-cs-test-", dir="/var/tmp"))  # ext4, not tmpfs
    try:
        yield work
    finally:
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def results(small_workload: Workload, machine_before: dict[Path, bool], scenario_dir: Path) -> dict[str, ModeResult]:
    with Scenario(small_workload, "unshaped", workdir=scenario_dir) as sc:
        found = {"classic": sc.classic(), "lazy": sc.lazy(), "snapshotter": sc.snapshotter(),
                 "lazy_profile": sc.lazy_profile(), "snapshotter_profile": sc.snapshotter_profile()}
        with pytest.raises(ColdstartError, match="runs before lazy_profile"):
            sc.snapshotter()  # a pushed profile would be replayed: refused, not measured wrongly
    assert not mounts_under(scenario_dir), "the scenario left mounts behind"
    return found


def test_classic_and_lazy_print_the_workloads_line(results: dict[str, ModeResult], small_workload: Workload) -> None:
    for mode in ("classic", "lazy"):
        r = results[mode]
        assert r.output[0] == small_workload.expected_line
        assert r.seconds is not None and 0 < r.seconds < 120
        assert r.samples and r.samples[-1][1] >= r.bytes_fetched  # the last sample comes after


def test_classic_fetches_the_whole_image(results: dict[str, ModeResult], small_workload: Workload) -> None:
    r = results["classic"]
    assert r.bytes_fetched >= small_workload.layer_bytes  # every layer, plus headers
    assert r.bytes_fetched < small_workload.layer_bytes * 1.1


def test_lazy_fetches_less_than_classic(results: dict[str, ModeResult]) -> None:
    classic, lazy = results["classic"], results["lazy"]
    assert 0 < lazy.bytes_fetched < classic.bytes_fetched, (lazy.summary(), classic.summary())
    assert lazy.share < 0.8


def test_lazy_with_a_profile(results: dict[str, ModeResult], small_workload: Workload) -> None:
    r = results["lazy_profile"]
    assert r.available and r.output[0] == small_workload.expected_line
    assert 0 < r.bytes_fetched < results["classic"].bytes_fetched
    # the replay fetched what start-up reads, not what the read-ahead guessed
    assert r.bytes_fetched < results["lazy"].bytes_fetched, (r.summary(), results["lazy"].summary())


def test_through_the_snapshotter(results: dict[str, ModeResult], small_workload: Workload) -> None:
    """nerdctl run --snapshotter nydus: the workload's line, lazily (the data blobs are not
    pulled), and no profile replayed: none was pushed yet."""
    r, classic, lazy = results["snapshotter"], results["classic"], results["lazy"]
    assert r.output[0] == small_workload.expected_line, r.output
    assert r.seconds is not None and 0 < r.seconds < 120
    assert 0 < r.bytes_fetched < classic.bytes_fetched / 2, (r.summary(), classic.summary())
    # the same reads as the direct bind, plus what nerdctl fetches (manifest, config, the
    # bootstrap layer once more as a containerd layer): well below twice the direct bind
    assert r.bytes_fetched < 2 * lazy.bytes_fetched, (r.summary(), lazy.summary())
    assert "the registry has no start-up profile" in r.note, r.note


def test_through_the_snapshotter_with_a_profile(results: dict[str, ModeResult], small_workload: Workload) -> None:
    """The profile lazy_profile pushed is found by the snapshotter's nydusd (profile=auto, by the
    bootstrap's digest: the snapshotter passes no manifest) and replayed: fewer bytes than
    the snapshotter's run without it."""
    r, plain = results["snapshotter_profile"], results["snapshotter"]
    assert r.output[0] == small_workload.expected_line, r.output
    assert "start-up profile of" in r.note, r.note
    assert 0 < r.bytes_fetched < plain.bytes_fetched, (r.summary(), plain.summary())


def test_machines_containerd_untouched_and_all_torn_down(results: dict[str, ModeResult],
                                                         machine_before: dict[Path, bool], scenario_dir: Path) -> None:
    for path, existed in machine_before.items():
        if not existed:
            assert not path.exists(), f"{path} was created by the harness"
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit():
            try:
                cmd = (pid_dir / "cmdline").read_bytes()
            except OSError:
                continue
            assert str(scenario_dir).encode() not in cmd, f"left running: {cmd!r}"
    from pyroute2 import netns

    assert not [n for n in netns.listnetns() if n == f"fscd-{os.getpid()}"], "the registry's netns is left"


def test_containerd_own_socket_and_failed_start(coldstart_host: None, tmp_path: Path) -> None:
    from coldstart import ColdstartError

    work = Path("/var/tmp") / tmp_path.name
    try:
        with Containerd(work / "ctd") as ctd:
            assert ctd.socket.stat().st_mode & 0o777 == 0o600
            assert ctd.socket.parent.stat().st_mode & 0o777 == 0o700
            assert "Server:" in ctd.ctr("version")
            pid = ctd.proc.pid if ctd.proc else 0
        assert not Path(f"/proc/{pid}").exists() or b"containerd" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not mounts_under(work)
        with pytest.raises(ColdstartError, match="too long"):
            Containerd(work / ("x" * 120)).start()
    finally:
        shutil.rmtree(work, ignore_errors=True)
