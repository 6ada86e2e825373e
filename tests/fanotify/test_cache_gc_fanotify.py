"""Culling and the cache budget on the host kernel's fanotify path, through the real command line
and the API socket: `fscached --backend fanotify --apisock PATH [--config TOML]`, images bound
at run time (mounted by the daemon), `DELETE /api/v2/blobs?blob_id=`.

A blob's sparse cache file `<cache>/blobs/<volume>/<blob id>` is culled once no bound image uses
it and nothing has it open (a file-backed EROFS mount made by hand holds it: busy until
unmounted); the budget culls unbound blobs least recently used first and keeps bound ones."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


from apiclient import call, entry
from daemon_proc import FscachedProcess, drop_caches
from erofs_image.builder import convert
from fscached import cache_gc
from fscached.util import mounts


def build(work: Path, name: str, size: int = 3 << 20) -> tuple[Path, dict[str, bytes], str]:
    tree = work / f"tree-{name}"
    (tree / "dir").mkdir(parents=True)
    files = {"big.bin": os.urandom(size) + name.encode(), "dir/note.txt": f"image {name}\n".encode() * 3000}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    built = work / f"built-{name}"
    convert(tree, built, compressor="zstd")
    (blob,) = [p.name for p in (built / "blobs").iterdir()]
    return built, files, blob


def read_all(mountpoint: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (mountpoint / rel).read_bytes() == data, rel


def test_cull_through_the_api(fanotify_work: Path, fscached_daemons: Callable[..., FscachedProcess]) -> None:
    one, files_one, blob_one = build(fanotify_work, "one")
    two, files_two, blob_two = build(fanotify_work, "two")
    mnt_one, mnt_two, by_hand = (fanotify_work / n for n in ("mnt-one", "mnt-two", "mnt-hand"))
    sock = fanotify_work / "api" / "api.sock"
    cache = fanotify_work / "cache"
    daemon = fscached_daemons(cache, [], extra=["--apisock", str(sock)], mountpoints=[mnt_one, mnt_two, by_hand])
    assert call(sock, "PUT", "/api/v2/blobs", entry("one", one, fanotify_work, mnt_one)) == (204, None)
    assert call(sock, "PUT", "/api/v2/blobs", entry("two", two, fanotify_work, mnt_two, "dom")) == (204, None)
    drop_caches()
    read_all(mnt_one, files_one)
    read_all(mnt_two, files_two)
    cache_one = cache / "blobs" / "one" / blob_one
    assert cache_one.stat().st_blocks * 512 >= 3 << 20  # filled
    # bound: busy, the file stays
    status, body = call(sock, "DELETE", f"/api/v2/blobs?blob_id={blob_one}")
    assert status == 409 and body["code"] == "BUSY" and "bound (image one)" in body["message"], body
    assert cache_one.exists()
    # unbound (the daemon unmounts it): the file stays until culled, but here a file-backed
    # mount made by hand still uses it: busy
    assert call(sock, "DELETE", "/api/v2/blobs?domain_id=one") == (204, None)
    assert cache_one.exists() and str(mnt_one) not in mounts.erofs_mounts()
    mounts.mount_erofs(str((one / "image.boot").resolve()), by_hand, f"device={cache_one}")
    try:
        status, body = call(sock, "DELETE", f"/api/v2/blobs?blob_id={blob_one}")
        assert status == 409 and "open (mounted)" in body["message"], body
        assert cache_one.exists()
    finally:
        assert mounts.unmount(by_hand)
    assert call(sock, "DELETE", f"/api/v2/blobs?blob_id={blob_one}") == (204, None)
    assert not cache_one.exists()
    assert list((cache / ".fscached" / "trash").iterdir()) == []  # unlinked, not parked
    status, body = call(sock, "DELETE", f"/api/v2/blobs?blob_id={blob_one}")
    assert status == 404 and "blob_cache: cache entry not found" in body["message"], body
    # the image's own volume directory, empty now, goes on a cull of its id
    assert (cache / "blobs" / "one").is_dir()
    assert call(sock, "DELETE", "/api/v2/blobs?blob_id=one") == (204, None)
    assert not (cache / "blobs" / "one").exists()
    assert call(sock, "DELETE", "/api/v2/blobs?blob_id=one")[0] == 404
    for bad in ("..%2F..%2Fetc", "sha256:" + blob_two, "a%20b"):
        status, body = call(sock, "DELETE", f"/api/v2/blobs?blob_id={bad}")
        assert status == 400 and body["code"] == "BAD_REQUEST", (bad, body)
    # the other image: untouched, still served cold
    assert call(sock, "DELETE", f"/api/v2/blobs?blob_id={blob_two}")[0] == 409
    drop_caches()
    read_all(mnt_two, files_two)
    counters = daemon.counters()
    assert counters.get("read_failed", 0) == 0 and counters.get("verify_failures", 0) == 0, counters
    assert daemon.stop() == 0


def test_budget_culls_unbound_blobs_least_recently_used_first(fanotify_work: Path,
                                                              fscached_daemons: Callable[..., FscachedProcess]) -> None:
    names = ("a", "b", "c")
    images = {name: build(fanotify_work, name) for name in names}
    config = fanotify_work / "fscached.toml"
    # three filled blobs of 3 MiB and the daemon's state (its 2.5 MiB event journal) do not fit,
    # two blobs and the state do
    config.write_text('cache_budget = "9M"\n')
    sock = fanotify_work / "api" / "api.sock"
    cache = fanotify_work / "cache"
    mnt = {name: fanotify_work / f"mnt-{name}" for name in names}
    daemon = fscached_daemons(cache, [], extra=["--apisock", str(sock), "--config", str(config)],
                              mountpoints=list(mnt.values()))
    for name, (built, files, _) in images.items():
        assert call(sock, "PUT", "/api/v2/blobs", entry(name, built, fanotify_work, mnt[name])) == (204, None)
        read_all(mnt[name], files)
    cache_file = {name: cache / "blobs" / name / blob for name, (_, _, blob) in images.items()}
    usage = cache_gc.allocated_bytes(cache)  # what the budget counts: everything in the cache dir
    assert 9 << 20 < usage < 12 << 20 and all(p.exists() for p in cache_file.values()), usage
    # a is let go of first, then b: one pass after them culls a (least recently used) only
    assert call(sock, "DELETE", "/api/v2/blobs?domain_id=a") == (204, None)
    time.sleep(0.05)
    assert call(sock, "DELETE", "/api/v2/blobs?domain_id=b") == (204, None)
    deadline = time.monotonic() + 15
    while cache_file["a"].exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert not cache_file["a"].exists(), daemon.log_text()[-3000:]
    assert cache_file["b"].exists() and cache_file["c"].exists(), (usage, daemon.log_text()[-3000:])
    assert "over its limit: culled 1 unused file(s)" in daemon.log_text(), daemon.log_text()[-3000:]
    # c is still bound and served
    drop_caches()
    read_all(mnt["c"], images["c"][1])
    assert daemon.stop() == 0
