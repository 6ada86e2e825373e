"""A real Dragonfly P2P cluster on this machine, with fscached on its nodes (host kernel, fanotify).

  cluster       module: coldstart.dragonfly.DragonflyCluster: the registry behind a 100 Mbit/s,
                2 ms uplink, the scheduler, a seed peer and 3 nodes on a 1 Gbit/s LAN, each in a
                network namespace of its own; started once per module (about 35 s: the
                scheduler takes the seed peer at its first 30 s health round), torn down after
  node_daemons  a factory: start(cluster, node, images, ...) -> FscachedProcess, the real
                `fscached` CLI started inside the node's network namespace (its dfdaemon
                socket, its proxy, its own cache dir); after the test every daemon it started
                is stopped, its mounts and keeper gone

A machine where these cannot run FAILS them: root, a kernel whose /var/tmp takes fanotify
pre-content marks, skopeo, docker-registry, the built peers (`python -m coldstart.peers
install`, which make test runs first).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

TESTS = Path(__file__).resolve().parents[1]
for extra in (TESTS / "fanotify", TESTS.parent / "vm-tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from daemon_proc import WORK_ROOT, FscachedProcess  # noqa: E402


def image_mountpoints(images: list[str]) -> list[Path]:
    """The `mountpoint=` of each `--image` spec that has one."""
    fields = [dict(part.partition("=")[::2] for part in spec.split(",")) for spec in images]
    return [Path(f["mountpoint"]).resolve() for f in fields if f.get("mountpoint")]


def _must_run() -> None:
    if os.geteuid() != 0:
        pytest.fail("the Dragonfly cluster tests need root (network namespaces, mounts, fanotify)")
    missing = [t for t in ("skopeo", "docker-registry") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (make deps)")
    from fanotify.group import probe

    reason = probe(WORK_ROOT)
    if reason is not None:
        pytest.fail(f"no fanotify pre-content events on {WORK_ROOT}: {reason}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    _must_run()
    from coldstart import ColdstartError
    from coldstart.dragonfly import DragonflyCluster
    from coldstart.peers import PeerError

    work = Path(tempfile.mkdtemp(prefix="fdf-", dir=WORK_ROOT))
    c = DragonflyCluster(work / "cluster", nodes=3, uplink="100mbit", lan="1gbit")
    try:
        try:
            c.start()
        except (ColdstartError, PeerError, RuntimeError, OSError) as exc:
            pytest.fail(f"the Dragonfly cluster did not start: {exc}")
        c.work = work  # type: ignore[attr-defined]  (the tests' own files, beside the cluster's)
        yield c
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def node_daemons() -> Iterator[Callable[..., FscachedProcess]]:
    started: list[tuple[FscachedProcess, list[Path]]] = []

    def start(cluster: Any, node: str, images: list[str], *, name: str | None = None,
              timeout: float = 120, mountpoints: list[Path] = (), **kwargs: Any) -> FscachedProcess:
        d = Path(cluster.work) / (name or node)
        d.mkdir(parents=True, exist_ok=True)
        proc = FscachedProcess(d / "cache", images, **kwargs)
        started.append((proc, image_mountpoints(images) + list(mountpoints)))
        with cluster.inside(node):  # its registry fallback goes out through the node's link
            return proc.start(timeout)

    try:
        yield start
    finally:
        for proc, mountpoints in reversed(started):
            if proc.proc is not None and proc.proc.poll() is None:
                try:
                    proc.stop(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            proc.cleanup(mountpoints)
