"""Faults of the real Dragonfly cluster under fscached's readers: a node's dfdaemon killed
mid-read (fscached goes to the registry: 0 EIO, the right bytes) and restarted while fscached
keeps serving (used again), the seed peer killed mid-download, the scheduler stopped (the peers
go to the origin themselves, as Dragonfly does). In this order, on one cluster: each test
reads images of its own (fresh blobs, fresh P2P tasks)."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from daemon_proc import FscachedProcess, drop_caches
from dfnodes import push_layout
from test_fanotify_trees import assert_served, assert_tree, counter
from trees import convert, manifest, whole_second_mtimes

from erofs_image.reader import Bootstrap

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

MiB = 1 << 20


def random_image(cluster: Any, name: str, files: int = 6, size: int = 6 * MiB) -> dict[str, Any]:
    """A tree of incompressible files (a few seconds through the 100 Mbit/s uplink), its
    manifest, pushed as <name>:v1."""
    base = Path(cluster.work) / name
    tree = base / "tree"
    (tree / "data").mkdir(parents=True)
    for i in range(files):
        (tree / "data" / f"f{i}.bin").write_bytes(os.urandom(size + i * 4097))
    (tree / "small.txt").write_text(f"{name}\n" * 1000)
    whole_second_mtimes(tree)
    built = convert(tree, base / "built", "zstd")
    ref = push_layout(cluster, built / "oci", f"faults/{name}")
    blobs = {b.blob_id: (built / "blobs" / b.blob_id).stat().st_size
             for b in Bootstrap.open(built / "image.boot").blobs}
    return {"tree": tree, "manifest": manifest(tree, base / "m.json"), "ref": ref, "repo": f"faults/{name}",
            "blobs": blobs}


def spec(cluster: Any, node: str, image: dict[str, Any], fsid: str) -> str:
    mnt = Path(cluster.work) / f"mnt-{fsid}"
    image["mnt"] = mnt
    return f"fsid={fsid},ref={image['ref']},scheme=http,dragonfly={cluster.socket(node)},mountpoint={mnt}"


def reading(daemon: FscachedProcess, image: dict[str, Any]) -> tuple[threading.Thread, list[BaseException]]:
    """assert_tree of the image's mount in a thread (its reader in a child process)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            assert_tree(image["mnt"], image["tree"], image["manifest"], daemon)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def test_a_node_peer_killed_mid_read_then_restarted_while_fscached_serves(cluster: Any, node_daemons: Any) -> None:
    first, second = random_image(cluster, "kill-a"), random_image(cluster, "kill-b")
    daemon = node_daemons(cluster, "node1", [spec(cluster, "node1", first, "a"), spec(cluster, "node1", second, "b")])
    peer = f"source:dragonfly {cluster.socket('node1')}"
    drop_caches()
    reader, errors = reading(daemon, first)
    wait_for(lambda: counter(daemon.counters(), "fetched_bytes") > 0, 60, "fscached fetched through its peer")
    cluster.kill_dfdaemon("node1", signal.SIGKILL)
    reader.join()
    assert not errors, errors  # every file right, read through the kill
    stats = daemon.counters()
    assert_served(stats)  # 0 EIO
    registry = f"source:registry {cluster.registry_host}/{first['repo']}"
    assert counter(stats, f"{peer}:ok") > 0 and counter(stats, f"{peer}:failed") > 0, stats
    assert counter(stats, f"{registry}:ok") > 0, stats  # the rest came from the registry

    # restarted while fscached serves: retried while its storage port is still held (EADDRINUSE)
    started = cluster.start_dfdaemon("node1")
    print(f"\nnode1's dfdaemon restarted after a kill -9: {started['attempts']} attempt(s), "
          f"{started['seconds']:.1f} s")
    time.sleep(3.5)  # fscached's channel retries the socket within 3 s (capped reconnect backoff)
    before = daemon.counters()
    drop_caches()
    assert_tree(second["mnt"], second["tree"], second["manifest"], daemon)
    after = daemon.counters()
    assert_served(after)
    assert counter(after, f"{peer}:ok") > counter(before, f"{peer}:ok"), (before, after)
    second_registry = f"source:registry {cluster.registry_host}/{second['repo']}"
    assert counter(after, f"{second_registry}:ok") == 0, after  # all through the restarted peer


def test_the_seed_peer_killed_mid_download(cluster: Any, node_daemons: Any) -> None:
    image = random_image(cluster, "seed", files=8)
    daemons = {node: node_daemons(cluster, node, [spec(cluster, node, image, f"seed-{node}")], name=f"seed-{node}")
               for node in ("node2", "node3")}
    # two mounts of one image: each node's its own
    mounts = {node: Path(cluster.work) / f"mnt-seed-{node}" for node in daemons}
    drop_caches()
    readers = {}
    for node, daemon in daemons.items():
        readers[node] = reading(daemon, {**image, "mnt": mounts[node]})
    wait_for(lambda: counter(daemons["node2"].counters(), "fetched_bytes") > 0, 60, "the nodes fetched")
    cluster.kill_dfdaemon("seed", signal.SIGKILL)
    for node, (thread, errors) in readers.items():
        thread.join()
        assert not errors, (node, errors)
        assert_served(daemons[node].counters())  # 0 EIO: the peers went to the origin themselves
    sent = cluster.registry_blob_bytes()
    for blob_id, size in image["blobs"].items():
        got = sum(sent.get(blob_id, {}).values())
        # the seed's share, then each node's own back-to-source of what it lacked: not more
        # than every node fetching it all, and the seed once
        assert size <= got <= (len(daemons) + 1) * size, (blob_id, size, sent.get(blob_id))
        print(f"\nseed killed mid-download: the registry sent the blob {got / size:.2f}x")
    restarted = cluster.start_dfdaemon("seed")
    print(f"seed restarted after a kill -9: {restarted['attempts']} attempt(s), {restarted['seconds']:.1f} s")


def test_the_scheduler_stopped_peers_go_to_the_origin(cluster: Any, node_daemons: Any) -> None:
    image = random_image(cluster, "nosched", files=3)
    cluster.stop_scheduler()
    try:
        daemon = node_daemons(cluster, "node3", [spec(cluster, "node3", image, "nosched")], name="nosched")
        drop_caches()
        assert_tree(image["mnt"], image["tree"], image["manifest"], daemon)
        stats = daemon.counters()
        assert_served(stats)
        # through the peer all the same: dfdaemon fetched the blob from the registry itself
        assert counter(stats, f"source:dragonfly {cluster.socket('node3')}:ok") > 0, stats
        assert counter(stats, f"source:registry {cluster.registry_host}/{image['repo']}:ok") == 0, stats
    finally:
        cluster.start_scheduler()
