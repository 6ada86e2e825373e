"""The real peers the tests and benches run beside fscached, built from their registries by name
(the Go module proxy, crates.io), pinned, into a cache outside the checkout.

    python -m coldstart.peers install [NAME...]     build what is missing (all of `make test`'s)
    python -m coldstart.peers path NAME             where its binary is (exit 1: not built)
    python -m coldstart.peers list                  what is pinned, and what is built

Each peer is built once per version into `<cache>/<name>-<version>/bin/` (`<cache>` is
$FSCACHED_PEER_CACHE, else /var/cache/fscached/peers), staged in a directory of its own and
renamed into place when complete, under a lock: an interrupted build is never taken for a built
one, and two runs never build the same peer twice.

Go peers are built inside their own module (`go mod download` of the exact version, then `go
build` there): `go install module/cmd/x@version` does not work for these two reasons, both seen
on the Go module proxy these machines reach: nydus-snapshotter's go.mod has `exclude` lines
(refused for a module that is not the main one), and the proxy refuses the version *list* of
some modules (nerdctl, Dragonfly) that `go install` asks for. Rust peers are `cargo install`ed,
or, where `cargo install` cannot build the version (`source_build`), built from the crate's own
source: fetched by name through cargo (a throwaway manifest depending on `crate = "=version"`,
`cargo fetch`, the unpacked crate taken from CARGO_HOME/registry/src), copied to
`<cache>/build/<crate>-<version>`, its lock file changed only by the `precise` pins (`cargo
update -p NAME --precise V`; the lock diff goes to the build log), then `cargo build --release
--locked` per binary (`cargo rustc ... -- --cap-lints=warn` with `cap_lints`: a crate's own
`#![deny(warnings)]` against lints newer than it), target dir `<cache>/build/<crate>-<version>.target`.
"""
from __future__ import annotations

import argparse
import difflib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/fscached/peers")


@dataclass(frozen=True)
class GoPeer:
    name: str
    module: str
    version: str
    package: str  # inside the module
    ldflags: str = ""


@dataclass(frozen=True)
class CargoPeer:
    name: str
    crate: str
    version: str
    bins: tuple[str, ...]
    locked: bool = True
    debian: tuple[str, ...] = ()  # Debian packages the build needs
    env: dict[str, str] = field(default_factory=dict)
    source_build: bool = False  # built from the crate's source, not `cargo install` (module doc)
    precise: tuple[tuple[str, str], ...] = ()  # (package, version): the lock file changes
    cap_lints: bool = False  # the crate's binaries built with --cap-lints=warn

    @property
    def dir_name(self) -> str:
        """`<crate>-<version>`: the cache directory is named by what `cargo install` installs
        (several binaries of one crate share one build), not by the binary we run."""
        return f"{self.crate}-{self.version}"


Peer = GoPeer | CargoPeer

PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    GoPeer("containerd-nydus-grpc", "github.com/containerd/nydus-snapshotter", "v0.15.15",
           "./cmd/containerd-nydus-grpc",
           "-X github.com/containerd/nydus-snapshotter/version.Version=v0.15.15"),
    GoPeer("nerdctl", "github.com/containerd/nerdctl", "v1.7.7", "./cmd/nerdctl",
           "-X github.com/containerd/nerdctl/pkg/version.Version=v1.7.7"),
    GoPeer("crictl", "sigs.k8s.io/cri-tools", "v1.34.0", "./cmd/crictl",
           "-X sigs.k8s.io/cri-tools/pkg/version.Version=v1.34.0"),
    GoPeer("scheduler", "d7y.io/dragonfly/v2", "v2.5.1", "./cmd/scheduler"),
    # nydusd, the peer bench/nydusd.py and bench/nydusd_guest.py compare fscached with, and what
    # vm-tests/test_vm_nydusd_fscache.py runs in fscache mode on an image fscached-image built
    # (the one test where nydus's own reader serves our chunks to the kernel). 2.2.0 is the newest nydus-rs on crates.io, and `cargo install` cannot build it:
    # --locked pins `time` 0.3.14, which Rust 1.80 and later reject (time before 0.3.35 no
    # longer type-checks); unlocked, nydus-rafs 0.2.2 gets nydus-storage 0.6.4 (published after
    # nydus-rs 2.2.0, its BlobChunkInfo has `is_encrypted`: E0046) and nydus-api 0.3.1 beside
    # 0.2.2 (E0308). So it is built from its own source with its own lock file and one pin, time
    # 0.3.36 (cargo moves what that time needs with it: time-macros, serde, proc-macro2, quote;
    # the build log has the lock diff), the crate's `#![deny(warnings)]` capped to warnings
    # (rustc 1.95's dead_code and noop_method_call lints fire in nydus-image), and
    # RUSTUP_TOOLCHAIN=stable (the crate's rust-toolchain file names 1.66.1: not installed, and
    # time 0.3.36 needs 1.67). 5 to 8 minutes on 2 busy cores: from an empty cache, downloads
    # included, 316 s at nice 19 (277 s of CPU; nydusd with every dependency 291 s, nydus-image
    # 20 s more).
    CargoPeer("nydus-rs", "nydus-rs", "2.2.0", ("nydusd", "nydus-image"), source_build=True,
              precise=(("time", "0.3.36"),), cap_lints=True, env={"RUSTUP_TOOLCHAIN": "stable"},
              debian=("pkg-config", "libssl-dev", "cmake", "clang", "libclang-dev")),
    # Dragonfly's peer daemon (seed peer and peers). --locked: the versions upstream tested
    # (without it cargo re-resolves ~540 dependencies). A first build takes 25-35 min on 2 cores,
    # most of it RocksDB's C++ (librocksdb-sys); Debian's librocksdb (7.8) cannot replace it.
    CargoPeer("dfdaemon", "dragonfly-client", "1.5.10", bins=("dfdaemon",), locked=True,
              debian=("protobuf-compiler", "libclang-dev", "clang", "cmake")),
)}
# what `make test` needs; nydus-rs adds about 5 minutes to a fresh machine's first run (cached
# after): that is what keeps the real nydusd reading fscached-image's images tested
FOR_TEST = ["containerd-nydus-grpc", "nerdctl", "crictl", "scheduler", "dfdaemon", "nydus-rs"]


class PeerError(Exception):
    """A peer that cannot be built or found, in one line."""


def cache_root() -> Path:
    return Path(os.environ.get("FSCACHED_PEER_CACHE") or DEFAULT_CACHE)


def peer_dir(peer: Peer) -> Path:
    if isinstance(peer, CargoPeer):
        return cache_root() / peer.dir_name
    return cache_root() / f"{peer.name}-{peer.version}"


def _built(peer: Peer) -> bool:
    """Built: the build's `.complete` marker, or a Rust peer installed by hand into its
    directory (`cargo install --root` copies the binaries only once the whole build succeeded:
    every binary of `bins` there and executable is a complete build; `install` adopts it)."""
    final = peer_dir(peer)
    if (final / ".complete").exists():
        return True
    return isinstance(peer, CargoPeer) and all(os.access(final / "bin" / b, os.X_OK) for b in peer.bins)


def binary(name: str, program: str | None = None) -> Path:
    """The built binary of a peer (PeerError naming how to build it when it is not)."""
    peer = PEERS.get(name)
    if peer is None:
        raise PeerError(f"no peer named {name!r}: {', '.join(PEERS)}")
    path = peer_dir(peer) / "bin" / (program or name)
    if not os.access(path, os.X_OK):
        raise PeerError(f"{name} {peer.version} is not built ({path} missing): run "
                        f"`python -m coldstart.peers install {name}` (make test does)")
    return path


@contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], *, cwd: Path | None, env: dict[str, str], log: Path, what: str) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise PeerError(f"{what}: `{' '.join(cmd[:3])}` exited {done.returncode} (log {log}): "
                        + " | ".join(tail))


def _go_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOPATH=str(root / "go"), GOCACHE=str(root / "go-build"), GOFLAGS="-modcacherw",
               GOTOOLCHAIN="local", CGO_ENABLED=os.environ.get("CGO_ENABLED", "0"))
    return env


def _build_go(peer: GoPeer, stage: Path, log: Path) -> None:
    if shutil.which("go") is None:
        raise PeerError(f"{peer.name}: no `go` on PATH (the machines have Go 1.26)")
    env = _go_env(cache_root())
    download = subprocess.run(["go", "mod", "download", "-json", f"{peer.module}@{peer.version}"],
                              env=env, capture_output=True, text=True)
    if download.returncode != 0:
        raise PeerError(f"{peer.name}: the Go module proxy did not give {peer.module}@{peer.version}: "
                        + " ".join((download.stdout + download.stderr).split())[:300])
    source = Path(json.loads(download.stdout)["Dir"])
    cmd = ["go", "build", "-trimpath", "-o", str(stage / "bin" / peer.name)]
    if peer.ldflags:
        cmd += ["-ldflags", peer.ldflags]
    _run(cmd + [peer.package], cwd=source, env=env, log=log, what=peer.name)


def _build_cargo(peer: CargoPeer, stage: Path, log: Path) -> None:
    if shutil.which("cargo") is None:
        raise PeerError(f"{peer.name}: no `cargo` on PATH (the machines have Rust by rustup)")
    missing = [p for p in peer.debian if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p],
                                                        capture_output=True, text=True).stdout.find("ok installed") < 0]
    if missing:
        _run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq", *missing], cwd=None,
             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, log=log, what=f"{peer.name}: apt-get")
    root = cache_root()
    env = dict(os.environ)
    env.update(CARGO_HOME=str(root / "cargo-home"), CARGO_TARGET_DIR=str(root / "cargo-target"), **peer.env)
    if peer.source_build:
        _build_cargo_source(peer, stage, env, log)
        return
    cmd = ["cargo", "install", peer.crate, "--version", peer.version, "--root", str(stage)]
    if peer.locked:
        cmd.append("--locked")
    for name in peer.bins:
        cmd += ["--bin", name]
    _run(cmd, cwd=None, env=env, log=log, what=peer.name)


def _crate_source(peer: CargoPeer, env: dict[str, str], log: Path) -> Path:
    """The crate's own source as crates.io serves it, by name through cargo: a throwaway
    manifest depending on exactly this version, `cargo fetch`, and the unpacked crate in
    CARGO_HOME/registry/src (already there: taken as it is)."""
    home = Path(env["CARGO_HOME"])

    def unpacked() -> Path | None:
        found = sorted(home.glob(f"registry/src/*/{peer.crate}-{peer.version}/Cargo.toml"))
        return found[0].parent if found else None

    source = unpacked()
    if source is None:
        fetch = cache_root() / "build" / f".fetch-{peer.dir_name}"
        (fetch / "src").mkdir(parents=True, exist_ok=True)
        (fetch / "src" / "lib.rs").write_text("")
        (fetch / "Cargo.toml").write_text(
            f'[package]\nname = "fetch-{peer.crate}"\nversion = "0.0.0"\nedition = "2021"\n'
            f'publish = false\n\n[dependencies]\n{peer.crate} = "={peer.version}"\n\n[workspace]\n')
        _run(["cargo", "fetch"], cwd=fetch, env=env, log=log, what=f"{peer.name}: fetching its source")
        source = unpacked()
        if source is None:
            raise PeerError(f"{peer.name}: `cargo fetch` of {peer.crate} ={peer.version} left no "
                            f"{peer.crate}-{peer.version} under {home}/registry/src (log {log})")
    return source


def _build_cargo_source(peer: CargoPeer, stage: Path, env: dict[str, str], log: Path) -> None:
    """`source_build` (the module's doc): the crate's source in `<cache>/build`, the `precise`
    lock changes, `cargo build --release --locked` (or `cargo rustc ... --cap-lints=warn`) per
    binary, the binaries copied into the stage."""
    source = _crate_source(peer, env, log)
    build = cache_root() / "build" / peer.dir_name
    if build.exists():
        shutil.rmtree(build)
    shutil.copytree(source, build)
    for path in build.rglob("*"):  # registry sources may be read-only; the lock file is rewritten
        path.chmod(path.stat().st_mode | 0o200)
    env = {**env, "CARGO_TARGET_DIR": str(cache_root() / "build" / f"{peer.dir_name}.target")}
    lock_before = (build / "Cargo.lock").read_text() if (build / "Cargo.lock").exists() else ""
    for package, version in peer.precise:
        _run(["cargo", "update", "-p", package, "--precise", version], cwd=build, env=env, log=log,
             what=f"{peer.name}: pinning {package} {version}")
    if peer.precise:
        diff = difflib.unified_diff(lock_before.splitlines(), (build / "Cargo.lock").read_text().splitlines(),
                                    "Cargo.lock (the crate's)", "Cargo.lock (built with)", lineterm="", n=1)
        with open(log, "a") as out:
            out.write("\n".join(diff) + "\n")
    for program in peer.bins:
        if peer.cap_lints:
            cmd = ["cargo", "rustc", "--release", "--locked", "--bin", program, "--", "--cap-lints=warn"]
        else:
            cmd = ["cargo", "build", "--release", "--locked", "--bin", program]
        _run(cmd, cwd=build, env=env, log=log, what=f"{peer.name}: {program}")
        shutil.copy2(Path(env["CARGO_TARGET_DIR"]) / "release" / program, stage / "bin" / program)


def install(name: str) -> tuple[Path, float]:
    """Build `name` unless built; (its directory, seconds spent building: 0 when cached)."""
    peer = PEERS[name]
    final = peer_dir(peer)
    root = cache_root()
    with _locked(root, name):
        if _built(peer):
            if not (final / ".complete").exists():  # installed by hand: adopted, not rebuilt
                (final / ".complete").write_text(json.dumps({"version": peer.version, "adopted": True}))
            return final, 0.0
        stage = Path(tempfile.mkdtemp(prefix=f".stage-{name}-", dir=root))
        (stage / "bin").mkdir()
        log = root / f"{name}-{peer.version}.build.log"
        started = time.monotonic()
        try:
            if isinstance(peer, GoPeer):
                _build_go(peer, stage, log)
            else:
                _build_cargo(peer, stage, log)
            seconds = time.monotonic() - started
            (stage / ".complete").write_text(json.dumps({"version": peer.version, "seconds": round(seconds, 1)}))
            if final.exists():
                shutil.rmtree(final)
            os.rename(stage, final)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return final, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coldstart.peers", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="build what is missing")
    inst.add_argument("names", nargs="*", help=f"default: make test's ({', '.join(FOR_TEST)})")
    where = sub.add_parser("path", help="where a peer's binary is")
    where.add_argument("name")
    where.add_argument("program", nargs="?")
    sub.add_parser("list", help="what is pinned and what is built")
    args = parser.parse_args(argv)
    try:
        if args.command == "path":
            print(binary(args.name, args.program))
        elif args.command == "list":
            for peer in PEERS.values():
                built = _built(peer)
                print(f"{peer.name:24} {peer.version:10} {'built' if built else 'missing'}  {peer_dir(peer)}")
        else:
            for name in args.names or FOR_TEST:
                if name not in PEERS:
                    raise PeerError(f"no peer named {name!r}: {', '.join(PEERS)}")
                path, seconds = install(name)
                said = f"built in {seconds:.0f} s" if seconds else "cached"
                print(f"peer {name} {PEERS[name].version}: {said} ({path})", flush=True)
    except PeerError as exc:
        print(f"peers: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
