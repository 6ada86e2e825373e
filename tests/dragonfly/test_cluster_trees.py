"""The hold-out tree served on three nodes of a real Dragonfly cluster at once, each node's
fscached fetching through its own dfdaemon: node1 over the gRPC socket (the image key
`dragonfly=`), node2 over the gRPC socket too but bound at run time through the API (the bind
entry's `dragonfly`), node3 through the HTTP proxy (`proxy=`, `ping_url=`): every file equal on
every node, one P2P task per blob, and the registry sent each blob about once, not three times."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from dfnodes import push_layout
from apiclient import call
from daemon_proc import drop_caches
from test_fanotify_trees import add_edge_files, assert_served, assert_tree, counter
from trees import convert, make_real_tree, manifest

from erofs_image.reader import Bootstrap

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def holdout(cluster: Any) -> dict[str, Any]:
    """The VM tests' real tree (thousands of files, hard links, a sparse file, xattrs, odd modes,
    a device, a fifo) plus edge files, zstd, 256 KiB chunks, pushed to the cluster's registry."""
    base = Path(cluster.work) / "holdout"
    base.mkdir()
    tree = make_real_tree(base / "tree")
    add_edge_files(tree)
    built = convert(tree, base / "zstd", "zstd", chunk_size="256K")
    m = manifest(tree, base / "tree.json")
    data = json.loads(Path(m).read_text())
    assert len(data["entries"]) >= 2000 and len(data["hardlinks"]) >= 3  # test premise
    ref = push_layout(cluster, built / "oci", "holdout/tree")
    blobs = {b.blob_id: (built / "blobs" / b.blob_id).stat().st_size
             for b in Bootstrap.open(built / "image.boot").blobs}
    yield {"tree": tree, "manifest": m, "ref": ref, "blobs": blobs}
    shutil.rmtree(base, ignore_errors=True)


def test_three_nodes_share_one_task_per_blob(cluster: Any, holdout: dict[str, Any], node_daemons: Any) -> None:
    ref, blobs = holdout["ref"], holdout["blobs"]
    assert sum(blobs.values()) > 4 << 20, blobs  # premise: several pieces to share
    egress0, lan0 = cluster.registry_egress(), cluster.lan_bytes()
    sources = {"node1": f"dragonfly={cluster.socket('node1')}", "node2": "the API",
               "node3": f"proxy={cluster.proxy_url('node3')},ping_url={cluster.health_url('node3')}"}
    daemons, mounts = {}, {}
    for node, source in sources.items():
        mounts[node] = Path(cluster.work) / node / "mnt"
        if node == "node2":
            sock = Path(cluster.work) / node / "api.sock"
            daemons[node] = node_daemons(cluster, node, [], extra=["--apisock", str(sock)], mountpoints=[mounts[node]])
            entry = {"type": "bootstrap", "id": "tree", "ref": ref, "mountpoint": str(mounts[node]),
                     "dragonfly": str(cluster.socket(node)),
                     "config": {"id": "tree", "backend_type": "registry", "backend_config": {"scheme": "http"},
                                "cache_type": "fscache", "cache_config": {"work_dir": str(sock.parent / "work")}}}
            status, answer = call(sock, "PUT", "/api/v2/blobs", entry)
            assert status == 204, (status, answer)
            continue
        daemons[node] = node_daemons(cluster, node, [f"fsid=tree,ref={ref},scheme=http,{source},"
                                                     f"mountpoint={mounts[node]}"])
    drop_caches()
    failures: dict[str, BaseException] = {}

    def check(node: str) -> None:
        try:
            assert_tree(mounts[node], holdout["tree"], holdout["manifest"], daemons[node])
        except BaseException as exc:
            failures[node] = exc

    readers = [threading.Thread(target=check, args=(node,)) for node in sources]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert not failures, failures  # every entry equal on every node: content, metadata, links
    egress, lan = cluster.registry_egress() - egress0, cluster.lan_bytes() - lan0

    registry_name = f"registry {cluster.registry_host}/holdout/tree"
    for node, daemon in daemons.items():
        stats = daemon.counters()
        assert_served(stats)  # no EIO, no chunk failed its digest
        peer = f"dragonfly proxy {cluster.proxy_url(node)}" if node == "node3" else f"dragonfly {cluster.socket(node)}"
        assert counter(stats, f"source:{peer}:ok") > 0, (node, stats)
        # nothing went around the peer: every blob byte came through Dragonfly
        assert counter(stats, f"source:{registry_name}:ok") == 0, (node, stats)

    # the scheduler's view (its log: every RegisterPeerRequest names task, host and range): one
    # task per blob, its id the blob's digest (gRPC and proxy nodes alike), registered once per
    # host for the whole blob, and the seed peer triggered once
    tasks = cluster.tasks()
    node_hosts = {f"{cluster.ip(n)}-{n}" for n in sources}
    for blob_id in blobs:
        task = tasks.get(blob_id)
        assert task is not None, (blob_id, sorted(tasks))
        assert node_hosts <= task["hosts"], task
        assert task["ranges"] == {None} and task["seed_triggers"] == 1, task
    ours = {tid for tid, t in tasks.items() if any("/holdout/tree/blobs/" in u for u in t["urls"])}
    assert ours == set(blobs), (ours, set(blobs))

    # the registry sent each blob about once (its access log: body bytes per blob; fscached's own
    # registry reads are none, above, so these are the peers' back-to-source fetches)
    sent = cluster.registry_blob_bytes()
    for blob_id, size in blobs.items():
        by = sent.get(blob_id, {})
        assert size <= sum(by.values()) <= 1.2 * size + 4096, (blob_id, size, by)
    total = sum(blobs.values())
    # on the registry's veth (bootstraps and manifests included, three times: each node pulls its
    # own), far below three times the blobs
    assert egress < 1.5 * total + 3 * (4 << 20), (egress, total)
    assert lan >= 2 * total, (lan, total)  # the nodes got the blobs from the LAN, not the registry
    print(f"\nholdout: blobs {total} B, registry egress {egress} B ({egress / total:.2f}x), "
          f"LAN {lan} B ({lan / total:.2f}x), tasks {len(ours)}")
