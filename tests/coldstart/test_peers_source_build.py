"""coldstart.peers' `source_build` recipe (how nydus-rs 2.2.0 is built: `cargo install` cannot)
against a stand-in `cargo` on PATH that records what it is asked to do: the crate's source fetched
by name through cargo, its lock file changed only by the pins (and the diff in the build log),
one capped-lint build per binary, the binaries in the peer's cache dir; a second install builds
nothing. The real build (8 minutes) is `python -m coldstart.peers install nydus-rs`."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from coldstart import peers

FAKE_CARGO = r'''#!PYTHON
import json, os, re, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_CARGO_CALLS"], "a") as f:
    f.write(json.dumps({"args": args, "cwd": os.getcwd(), "toolchain": os.environ.get("RUSTUP_TOOLCHAIN"),
                        "target": os.environ.get("CARGO_TARGET_DIR")}) + "\n")
home = Path(os.environ["CARGO_HOME"])
if args[0] == "fetch":
    name, version = re.search(r'^(\S+) = "=([^"]+)"$', Path("Cargo.toml").read_text(), re.M).groups()
    src = home / "registry" / "src" / "index.example-0123" / f"{name}-{version}"
    src.mkdir(parents=True)
    (src / "Cargo.toml").write_text(f'[package]\nname = "{name}"\nversion = "{version}"\n')
    (src / "Cargo.lock").write_text('[[package]]\nname = "time"\nversion = "0.3.14"\n')
    (src / "rust-toolchain").write_text("1.66.1\n")
elif args[0] == "update":
    package, version = args[args.index("-p") + 1], args[args.index("--precise") + 1]
    lock = Path("Cargo.lock")
    lock.write_text(re.sub(rf'(name = "{package}"\nversion = )"[^"]+"', rf'\1"{version}"', lock.read_text()))
elif args[0] == "rustc":
    program = args[args.index("--bin") + 1]
    out = Path(os.environ["CARGO_TARGET_DIR"]) / "release"
    out.mkdir(parents=True, exist_ok=True)
    (out / program).write_text("#!/bin/sh\necho " + program + "\n")
    (out / program).chmod(0o755)
else:
    sys.exit(f"fake cargo: unexpected {args}")
'''


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cargo = bin_dir / "cargo"
    cargo.write_text(FAKE_CARGO.replace("PYTHON", sys.executable))
    cargo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CARGO_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FSCACHED_PEER_CACHE", str(tmp_path / "cache"))
    peer = peers.PEERS["nydus-rs"]
    assert isinstance(peer, peers.CargoPeer)
    monkeypatch.setitem(peers.PEERS, "nydus-rs", peers.CargoPeer(
        peer.name, peer.crate, peer.version, peer.bins, source_build=peer.source_build, precise=peer.precise,
        cap_lints=peer.cap_lints, env=peer.env, debian=()))  # no apt-get here
    return tmp_path


def calls(tmp: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (tmp / "calls.jsonl").read_text().splitlines()]


def test_nydus_rs_is_built_from_its_source_not_installed(fake: Path) -> None:
    assert "nydus-rs" in peers.FOR_TEST  # make test builds it: vm-tests/test_vm_nydusd_fscache.py
    path, seconds = peers.install("nydus-rs")
    cache = fake / "cache"
    assert path == cache / "nydus-rs-2.2.0" and seconds > 0
    assert json.loads((path / ".complete").read_text())["version"] == "2.2.0"
    for program in ("nydusd", "nydus-image"):
        assert peers.binary("nydus-rs", program) == path / "bin" / program
        assert os.access(path / "bin" / program, os.X_OK)
    got = calls(fake)
    build = cache / "build" / "nydus-rs-2.2.0"
    assert [c["args"] for c in got] == [
        ["fetch"],
        ["update", "-p", "time", "--precise", "0.3.36"],
        ["rustc", "--release", "--locked", "--bin", "nydusd", "--", "--cap-lints=warn"],
        ["rustc", "--release", "--locked", "--bin", "nydus-image", "--", "--cap-lints=warn"],
    ]
    # the fetch in a throwaway manifest of its own; the build in a copy, never in CARGO_HOME
    assert got[0]["cwd"] == str(cache / "build" / ".fetch-nydus-rs-2.2.0")
    assert {c["cwd"] for c in got[1:]} == {str(build)}
    assert {c["toolchain"] for c in got} == {"stable"}  # not the crate's rust-toolchain (1.66.1)
    assert got[2]["target"] == str(cache / "build" / "nydus-rs-2.2.0.target")
    registry_copy = next((cache / "cargo-home" / "registry" / "src").glob("*/nydus-rs-2.2.0"))
    assert '"0.3.14"' in (registry_copy / "Cargo.lock").read_text()  # untouched
    assert '"0.3.36"' in (build / "Cargo.lock").read_text()
    log = (cache / "nydus-rs-2.2.0.build.log").read_text()
    assert '-version = "0.3.14"\n+version = "0.3.36"' in log  # the lock diff, for the record
    # built: nothing runs again
    assert peers.install("nydus-rs") == (path, 0.0)
    assert len(calls(fake)) == 4


def test_an_unpacked_source_is_not_fetched_again(fake: Path) -> None:
    peers.install("nydus-rs")
    (fake / "calls.jsonl").unlink()
    (fake / "cache" / "nydus-rs-2.2.0" / ".complete").unlink()
    for program in ("nydusd", "nydus-image"):
        (fake / "cache" / "nydus-rs-2.2.0" / "bin" / program).unlink()
    peers.install("nydus-rs")
    assert [c["args"][0] for c in calls(fake)] == ["update", "rustc", "rustc"]


def test_a_failed_build_names_its_step_and_leaves_nothing_built(fake: Path) -> None:
    cargo = fake / "bin" / "cargo"
    cargo.write_text(cargo.read_text().replace('elif args[0] == "rustc":', 'elif args[0] == "rustc" and False:'))
    with pytest.raises(peers.PeerError, match=r"nydus-rs: nydusd: `cargo rustc --release` exited 1"):
        peers.install("nydus-rs")
    assert not (fake / "cache" / "nydus-rs-2.2.0").exists()
    assert not list((fake / "cache").glob(".stage-*"))
