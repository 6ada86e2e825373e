"""The real nydusd (nydus-rs 2.2.0) as the real nydus-snapshotter's `nydusd_path` (fusedev,
shared daemon mode), on the small workload: the wiring of issue 17's side-by-side
(`bench/coldstart.py --nydusd-runs N`), so that it cannot rot unnoticed.

The run test needs the nydus-rs peer, which make test builds (`python -m coldstart.peers
install nydus-rs`: 5 to 8 minutes once per machine); it is marked `nydus_rs`, to run alone:

    .venv/bin/python -m pytest -m nydus_rs tests/coldstart/test_snapshotter_nydusd.py

Without the peer it fails, naming the install command."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from coldstart import ColdstartError, mounts_under, unmount_under
from coldstart.scenario import NYDUSD_MODE, Scenario
from coldstart.snapshotter import nydus_rs_nydusd, nydusd_rlimit_wrapper
from coldstart.workload import Workload


def test_wrapper_adds_rlimit_nofile_to_daemons_only(tmp_path: Path) -> None:
    """`fuse` and `singleton` get `--rlimit-nofile 0` after the snapshotter's own arguments;
    `--version` (which the snapshotter parses) and anything else go through as they are;
    arguments with blanks survive."""
    fake = tmp_path / "bin dir" / "nydusd"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    wrapper = nydusd_rlimit_wrapper(fake, tmp_path / "wrap")

    def argv(*args: str) -> list[str]:
        return subprocess.run([str(wrapper), *args], capture_output=True, text=True, check=True).stdout.splitlines()

    assert argv("fuse", "--mountpoint", "/a b", "--apisock", "/s") == \
        ["fuse", "--mountpoint", "/a b", "--apisock", "/s", "--rlimit-nofile", "0"]
    assert argv("singleton", "--fscache", "/c") == ["singleton", "--fscache", "/c", "--rlimit-nofile", "0"]
    assert argv("--version") == ["--version"]
    assert os.access(wrapper, os.X_OK)


@pytest.fixture(scope="module")
def real_nydusd() -> Path:
    try:
        return nydus_rs_nydusd()
    except ColdstartError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def scenario_dir(coldstart_host: None) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="fscd-cs-nyd-", dir="/var/tmp"))  # ext4, not tmpfs
    try:
        yield work
    finally:
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.root
@pytest.mark.nydus_rs
def test_real_nydusd_as_the_snapshotters_nydusd(real_nydusd: Path, small_workload: Workload,
                                                scenario_dir: Path) -> None:
    """nerdctl run through the snapshotter with nydusd as nydusd_path prints the workload's
    line (the scenario checks it too, and that the daemon the snapshotter ran is the real
    nydusd with a FUSE mount: else it raises), lazily: less than the whole image fetched."""
    with Scenario(small_workload, "unshaped", workdir=scenario_dir, snapshotter_daemon_mode="shared") as sc:
        r = sc.snapshotter_nydusd()
    assert r.mode == NYDUSD_MODE
    assert r.output and r.output[0] == small_workload.expected_line, r.output
    assert r.note.startswith("served by nydusd (pid "), r.note
    assert "logged an error" not in r.note, r.note
    assert 0 < r.bytes_fetched < r.image_bytes, r.summary()
    assert not mounts_under(scenario_dir), "the scenario left mounts behind"
