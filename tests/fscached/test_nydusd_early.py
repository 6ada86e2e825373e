"""`nydusd singleton`'s early start (fscached.nydusd_cli.start_early): before its imports it
listens on its API socket and, at a failover restart or a hot upgrade, takes the state the
supervisor offers. nydus-snapshotter gives a restarted daemon about 2 s to listen and 10 s from
before its exec to take the state; fscached's imports took longer than both in a TCG guest
(vm-tests/test_vm_snapshotter.py: the snapshotter's own failover failed there without this).

The real process is slowed down here where it imports the daemon (a sitecustomize on its
PYTHONPATH sleeps at `import fscached.daemon`): what must come first is seen to come first."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fscached.nydusd_cli import FLAG_OPTIONS, VALUE_OPTIONS, _scan, build_parser, start_early
from standins.supervisor import Supervisor, call

NYDUSD = [sys.executable, "-m", "fscached.nydusd_cli"]
SLOW_IMPORT = 4.0  # s the daemon's import is held back
SLOW_SITE = """\
import os, sys, time


class _Slow:
    def find_spec(self, name, path=None, target=None):
        if name == "fscached.daemon":
            sys.meta_path.remove(self)
            time.sleep(float(os.environ["FSCACHED_TEST_SLOW_IMPORT"]))
        return None


sys.meta_path.insert(0, _Slow())
"""


def test_the_early_scan_knows_every_option_of_the_parser() -> None:
    """start_early reads nydusd's command line without argparse (too slow to import that early):
    its tables must be the parser's, or a value could be taken for the mode."""
    actions = [a for a in build_parser()._actions if any(s.startswith("--") for s in a.option_strings)]
    takes_value = {s for a in actions if a.nargs is None for s in a.option_strings if s.startswith("--")}
    flags = {s for a in actions if a.nargs == 0 for s in a.option_strings if s.startswith("--")}
    assert VALUE_OPTIONS == takes_value
    assert FLAG_OPTIONS == flags - {"--version", "--help"}


def test_the_early_scan_reads_the_snapshotters_command_line() -> None:
    argv = ["singleton", "--fscache", "/r/cache", "--id", "d1", "--apisock", "/r/socket/d1/api.sock", "--log-level",
            "debug", "--log-rotation-size", "100", "--supervisor", "/r/supervisor/d1.sock", "--log-file", "/r/l"]
    found = _scan(argv)
    assert found is not None and found["modes"] == ["singleton"]
    assert found["--apisock"] == "/r/socket/d1/api.sock" and found["--supervisor"] == "/r/supervisor/d1.sock"
    assert _scan(["singleton", "--upgrade", *argv[1:]])["--upgrade"] is True  # type: ignore[index]
    # anything else is the real parser's to answer
    for other in (["singleton", "--version"], ["singleton", "--apisock=/x"], ["singleton", "--apis", "/x"],
                  ["singleton", "--apisock"], ["-h"]):
        assert _scan(other) is None, other
    assert start_early(["fuse", "--mountpoint", "/m", "--apisock", "/x"]) is None
    assert start_early(["singleton", "--fscache", "/c"]) is None


def test_early_start_without_a_supervisor_binds_and_lets_go(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "api.sock"
    early = start_early(["singleton", "--fscache", str(tmp_path / "c"), "--apisock", str(sock)])
    assert early is not None and early.listener is not None and not early.stale and early.offer is None
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600" and oct(os.stat(sock.parent).st_mode & 0o777) == "0o700"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(str(sock))  # in the backlog: nobody serves yet
    probe.close()
    early.close()
    assert not sock.exists(), "a socket nobody will serve is not left behind"


def test_restarted_nydusd_listens_and_takes_the_state_before_its_imports(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "FSCACHED_TEST_SLOW_IMPORT": str(SLOW_IMPORT)}
    sock = tmp_path / "run" / "api1.sock"
    sup_path = tmp_path / "supervisor" / "d1.sock"
    supervisor = Supervisor(sup_path)
    held_r, held_w = os.pipe()
    supervisor.save(b"not a state fscached wrote", held_r)  # what a dead daemon left with it
    supervisor.send_states(timeout=10)  # as the snapshotter does, before it starts the new process
    t0 = time.monotonic()
    proc = subprocess.Popen([*NYDUSD, "singleton", "--fscache", str(tmp_path / "cache"), "--upgrade", "--id", "d1",
                             "--apisock", str(sock), "--supervisor", str(sup_path),
                             "--log-file", str(tmp_path / "nydusd.log")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        listening = None
        while listening is None:
            assert proc.poll() is None and time.monotonic() - t0 < 30, "nydusd never listened"
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(sock))
                listening = time.monotonic() - t0
            except OSError:
                time.sleep(0.01)
            finally:
                probe.close()
        status, info = call(sock, "GET", "/api/v1/daemon")  # waits in the backlog until the daemon serves
        answered = time.monotonic() - t0
        assert status == 200 and info["state"] == "INIT", info
        assert answered - listening > SLOW_IMPORT - 1, (listening, answered)
        assert supervisor.sent == 1, "the state was not taken before the daemon served its API"
        # the takeover uses what was taken: no second connection (the supervisor listens no more)
        status, body = call(sock, "PUT", "/api/v1/daemon/fuse/takeover")
        assert status == 400 and "no supervisor socket" not in body["message"], body
        assert supervisor.sent == 1 and supervisor.errors == []
        assert call(sock, "PUT", "/api/v1/daemon/exit")[0] == 204
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        supervisor.close()
        os.close(held_w)
    assert not sock.exists()
    log = (tmp_path / "nydusd.log").read_text()
    assert "took the state (26 bytes, 1 fd(s))" in log and "taken from the supervisor" in log, log


@pytest.mark.parametrize("stale", [False, True])
def test_a_failed_start_leaves_no_socket(tmp_path: Path, stale: bool) -> None:
    sock = tmp_path / "run" / "api.sock"
    sock.parent.mkdir(mode=0o700)
    if stale:
        old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old.bind(str(sock))
        old.close()
    (tmp_path / "file").write_text("")
    proc = subprocess.run([*NYDUSD, "singleton", "--fscache", str(tmp_path / "file"), "--apisock", str(sock)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "is not a directory" in proc.stderr, proc.stderr
    assert not sock.exists()
