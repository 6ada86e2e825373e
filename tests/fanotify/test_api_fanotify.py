"""The control API on the host kernel's fanotify path, through the real command line:
`fscached --backend fanotify --apisock PATH` started with no image, images bound at run time
with fscached's `"mountpoint"` field in the bind entry (the daemon mounts them), read byte-exact,
one unbound while the other stays mounted and read."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable


from apiclient import call, entry
from daemon_proc import FscachedProcess, drop_caches
from erofs_image.builder import convert
from fscached.util import mounts


def digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_bind_read_unbind_through_the_api(fanotify_work: Path,
                                          fscached_daemons: Callable[..., FscachedProcess]) -> None:
    trees = {}
    for name in ("one", "two"):
        tree = fanotify_work / f"tree-{name}"
        (tree / "dir").mkdir(parents=True)
        (tree / "big.bin").write_bytes(os.urandom(3 << 20) + name.encode())
        (tree / "dir" / "note.txt").write_text(f"image {name}\n" * 5000)
        (tree / "small").write_bytes(b"x" * 10)
        trees[name] = tree
        convert(tree, fanotify_work / f"built-{name}", compressor="zstd")
    mnt = {name: fanotify_work / f"mnt-{name}" for name in trees}
    sock = fanotify_work / "api" / "api.sock"
    daemon = fscached_daemons(fanotify_work / "cache", [], extra=["--apisock", str(sock)], mountpoints=list(mnt.values()))
    status, info = call(sock, "GET", "/api/v1/daemon")
    assert status == 200 and info["state"] == "RUNNING", info
    assert info["fscached"]["backend"] == "fanotify" and info["fscached"]["images"] == []
    # bind both, each mounted by the daemon where its entry says
    assert call(sock, "PUT", "/api/v2/blobs", entry("one", fanotify_work / "built-one", fanotify_work, mnt["one"])) \
        == (204, None)
    assert call(sock, "PUT", "/api/v2/blobs",
                entry("two", fanotify_work / "built-two", fanotify_work, mnt["two"], domain="dom")) == (204, None)
    present = mounts.erofs_mounts()
    assert str(mnt["one"]) in present and str(mnt["two"]) in present
    images = {i["id"]: i for i in call(sock, "GET", "/api/v1/daemon")[1]["fscached"]["images"]}
    assert images["one"]["mountpoint"] == str(mnt["one"])
    assert images["one"]["mount"]["source"] == str((fanotify_work / "built-one" / "image.boot").resolve())
    assert images["one"]["mount"]["fstype"] == "erofs" and "device=" in images["one"]["mount"]["options"]
    assert images["two"]["domain_id"] == "dom"
    drop_caches()
    for name in trees:
        assert digests(mnt[name]) == digests(trees[name]), name
    # a bind on a mountpoint already used by another image is refused
    status, body = call(sock, "PUT", "/api/v2/blobs",
                        entry("three", fanotify_work / "built-one", fanotify_work, mnt["one"]))
    assert status == 400 and "already the mountpoint" in body["message"], body
    # an image in use cannot be unbound; once free, unbinding unmounts it
    with open(mnt["one"] / "small", "rb"):
        status, body = call(sock, "DELETE", "/api/v2/blobs?domain_id=one")
        assert status == 409 and body["code"] == "BUSY", body
    assert str(mnt["one"]) in mounts.erofs_mounts()
    assert call(sock, "DELETE", "/api/v2/blobs?domain_id=one") == (204, None)
    assert str(mnt["one"]) not in mounts.erofs_mounts()
    status, body = call(sock, "DELETE", "/api/v2/blobs?domain_id=one&blob_id=one")
    assert status == 404 and "blob_cache: cache entry not found" in body["message"]
    # the other image is still mounted and served, cold
    drop_caches()
    assert digests(mnt["two"]) == digests(trees["two"])
    counters = daemon.counters()
    assert counters.get("read_failed", 0) == 0 and counters.get("verify_failures", 0) == 0
    # a clean stop unmounts what the daemon mounted and removes the socket
    assert daemon.stop() == 0
    assert str(mnt["two"]) not in mounts.erofs_mounts()
    assert not sock.exists()
