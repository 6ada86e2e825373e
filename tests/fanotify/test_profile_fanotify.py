"""Start-up profiles on the host kernel's fanotify path, through the real `fscached` command:
a daemon records which blob ranges the reads of a real mount asked for (record_profile), and a
second daemon with a fresh cache and that profile (profile=FILE) has exactly those chunks in its
cache file before a reader touches the mount."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from daemon_proc import FscachedProcess
from erofs_image.reader import Bootstrap
from fscached.core.chunkmap import ChunkMap, chunks_by_blob
from erofs_image.profile import StartupProfile, bootstrap_digest

MiB = 1 << 20


def build(work: Path) -> Path:
    src = work / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 * MiB + 5000))
    (src / "b.bin").write_bytes(os.urandom(2 * MiB))
    (src / "c.txt").write_bytes(b"fscached profile\n" * 300_000)
    (src / "d.bin").write_bytes(os.urandom(10_000))
    subprocess.run([sys.executable, "-m", "erofs_image.cli", "convert", str(src), str(work / "img"),
                    "--compressor", "zstd"], check=True, capture_output=True)
    return work / "img" / "image.boot"


def file_chunks(boot: Bootstrap, name: str) -> list[tuple[str, int]]:
    node = boot.image.root.children[name.encode()]
    return [(boot.blobs[c.blob_index].blob_id, c.uncompressed_offset) for c in node.chunks if c is not None]


def profile_chunks(profile: StartupProfile, boot: Bootstrap) -> list[tuple[str, int]]:
    maps = {boot.blobs[i].blob_id: ChunkMap(chunks, boot.blobs[i].uncompressed_size)
            for i, chunks in chunks_by_blob(boot.image).items()}
    out: list[tuple[str, int]] = []
    for r in profile.ranges:
        out += [(r.blob_id, c.uncompressed_offset) for c in maps[r.blob_id].chunks_in(r.offset, r.offset + r.length)]
    return out


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The cache file's data extents (SEEK_DATA / SEEK_HOLE): what it holds, without reading."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, size = 0, os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def holds(extents: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e in extents)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recorded_profile_is_replayed_into_a_fresh_cache_before_the_reader(
        fanotify_work: Path, fscached_daemons: Callable[..., FscachedProcess]) -> None:
    work = fanotify_work
    boot_path = build(work)
    boot = Bootstrap.open(boot_path)
    assert len(boot.blobs) == 1
    blob_id = boot.blobs[0].blob_id
    seconds = 3.0
    mnt1, mnt2 = work / "mnt1", work / "mnt2"

    # 1. record: a.bin, then d.bin (each read twice: recorded once, where first read)
    first = fscached_daemons(work / "cache1", [f"fsid=img,bootstrap={boot_path},mountpoint={mnt1},"
                                               f"record_profile={seconds}"])
    mounted = time.monotonic()
    assert sha(mnt1 / "a.bin") == sha(work / "src" / "a.bin")
    assert sha(mnt1 / "d.bin") == sha(work / "src" / "d.bin")
    assert sha(mnt1 / "a.bin") == sha(work / "src" / "a.bin")
    out = work / "work" / "profiles" / "img.json"
    deadline = mounted + seconds + 10
    while not out.exists():
        assert time.monotonic() < deadline, f"no profile written:\n{first.log_text()}"
        time.sleep(0.05)
    took = time.monotonic() - mounted
    assert took > seconds - 0.5, f"written {took:.1f} s after the mount, before its {seconds} s"
    (mnt1 / "c.txt").read_bytes()  # after its seconds: not recorded
    assert first.stop() == 0
    assert f"start-up profile written to {out}" in first.log_text()

    profile = StartupProfile.load(out)
    assert profile.bootstrap_digest == bootstrap_digest(boot_path)
    profile.check_against(profile.bootstrap_digest, {blob_id: boot.blobs[0].uncompressed_size})
    want = file_chunks(boot, "a.bin") + file_chunks(boot, "d.bin")
    assert len(want) == 5
    assert profile_chunks(profile, boot) == want  # exactly those files' chunks, in first-read order

    # 2. replay: a fresh cache, the profile file; nothing reads the mount yet
    second = fscached_daemons(work / "cache2", [f"fsid=img,bootstrap={boot_path},mountpoint={mnt2},"
                                                f"profile={out}"])
    deadline = time.monotonic() + 20
    while (counters := second.counters()).get("profile_chunks_prefetched", 0) < len(want):
        assert time.monotonic() < deadline, f"the profile was not replayed: {counters}\n{second.log_text()}"
        time.sleep(0.05)
    assert counters["profile_ranges_loaded"] == len(profile.ranges)
    assert counters.get("read", 0) == 0, "the replay ran before any read"
    assert counters["fetches"] < len(want), counters  # merged requests, not one per chunk
    cache_file = work / "cache2" / "blobs" / "img" / blob_id
    extents = data_ranges(cache_file)
    chunk_size = {c.uncompressed_offset: c.uncompressed_size for c in chunks_by_blob(boot.image)[0]}
    for _, offset in want:
        assert holds(extents, offset, offset + chunk_size[offset]), (offset, extents)
    for _, offset in file_chunks(boot, "b.bin") + file_chunks(boot, "c.txt"):
        assert not any(s < offset + chunk_size[offset] and offset < e for s, e in extents), \
            f"chunk at {offset}, not in the profile, was fetched"
    fetched = counters["fetched_chunks"]
    assert fetched == len(want)

    # 3. the reader finds its bytes there, correct
    assert sha(mnt2 / "a.bin") == sha(work / "src" / "a.bin")
    assert sha(mnt2 / "d.bin") == sha(work / "src" / "d.bin")
    after = second.counters()
    assert after["fetched_chunks"] == fetched, "the reader had to fetch what the profile named"
    assert after.get("read_failed", 0) == 0 and after["read_cached"] > 0
    assert sha(mnt2 / "b.bin") == sha(work / "src" / "b.bin")  # the rest on demand
    assert second.stop() == 0
