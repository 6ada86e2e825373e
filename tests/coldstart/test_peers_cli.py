"""`python -m coldstart.peers list` and `path`, as the README shows them: every pinned peer listed
with its version and cache directory, the ones make test needs built (make test installs them
before the suite), `path` naming an executable, an unknown name refused in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from coldstart.peers import FOR_TEST, PEERS, peer_dir


def peers_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coldstart.peers", *args], capture_output=True, text=True,
                          timeout=60)


def test_list_names_every_pinned_peer_and_the_test_peers_are_built() -> None:
    done = peers_cli("list")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    assert set(rows) == set(PEERS), rows
    for name, peer in PEERS.items():
        assert rows[name][1] == peer.version and rows[name][3] == str(peer_dir(peer)), rows[name]
    for name in FOR_TEST:
        assert rows[name][2] == "built", f"{name} is not built: make test installs it before the suite"


def test_path_names_an_executable_and_an_unknown_peer_is_refused() -> None:
    done = peers_cli("path", "containerd-nydus-grpc")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.name == "containerd-nydus-grpc" and os.access(path, os.X_OK), path
    bad = peers_cli("path", "no-such-peer")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("peers: error: no peer named 'no-such-peer'") and bad.stderr.count("\n") == 1, \
        bad.stderr
