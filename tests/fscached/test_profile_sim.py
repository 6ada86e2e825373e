"""Start-up profiles on the cachefiles path, through the kernel simulator: recording READs into a
profile file (record_profile), replaying a profile at the mount (profile=), and refusing a
profile that does not fit the image, with one warning, while the image is still served."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import uvloop

import fscached.core.fill
from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from erofs_image.tree import ChunkRef
from fscached.core.chunkmap import chunks_by_blob
from fscached.config import Config, ImageSpec, ProfileSpec, parse_image_flag
from fscached.daemon import Daemon
from fscached.api.bind_entry import BadBind, parse_bind_entry
from erofs_image.profile import ProfileRange, StartupProfile, bootstrap_digest
from simdaemon import expected_blob_space
from standins.kernel_simulator import KernelSimulator
from test_daemon_lifetimes import BlobFront, wait_for

CHUNK = 64 << 10


class Image:
    def __init__(self, work: Path, size: int = 2 << 20) -> None:
        tree = work / "tree"
        tree.mkdir()
        (tree / "data").write_bytes(os.urandom(size))
        out = work / "built"
        convert(tree, out, compressor="none", chunk_size=CHUNK)
        self.boot = out / "image.boot"
        self.blobs = out / "blobs"
        bootstrap = Bootstrap.open(self.boot)
        self.blob_id = bootstrap.blobs[0].blob_id
        self.size = bootstrap.blobs[0].uncompressed_size
        self.chunks: list[ChunkRef] = sorted(chunks_by_blob(bootstrap.image)[0], key=lambda c: c.uncompressed_offset)
        self.want = expected_blob_space(bootstrap, self.blobs, 0)

    def chunk(self, n: int) -> ChunkRef:
        return self.chunks[n]


class Daemonized:
    """fscached's Daemon on its own uvloop thread with a whole Config (work_dir, profiles)."""

    def __init__(self, sim: KernelSimulator, config: Config) -> None:
        self.daemon = Daemon(config, device=sim.device())
        self.daemon.take_kernel_path()
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "exit_code", uvloop.run(self.daemon.run())),
                                       daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.daemon.serving or self.exit_code is not None, 30)

    @property
    def stats(self) -> dict[str, int]:
        assert self.daemon.frontend is not None
        return self.daemon.frontend.stats

    def stop(self) -> int | None:
        self.daemon.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.exit_code


@pytest.fixture
def image(work: Path) -> Image:
    return Image(work)


@pytest.fixture
def front(image: Image) -> Iterator[BlobFront]:
    f = BlobFront({image.blob_id: (image.blobs / image.blob_id).read_bytes()})
    try:
        yield f
    finally:
        f.close()


def remote_spec(image: Image, front: BlobFront) -> ImageSpec:
    return ImageSpec("a", image.boot, None, registry=front.registry())


# -- recording -----------------------------------------------------------------------------------
def test_record_lists_reads_in_first_read_order_and_stops_after_its_seconds(image: Image, front: BlobFront,
                                                                           work: Path) -> None:
    seconds = 2.0
    config = Config(cache_dir=work / "cache", work_dir=work / "wd", images=[remote_spec(image, front)],
                    profiles={("a", "a"): ProfileSpec(record_seconds=seconds)})
    order = [5, 2, 9, 10, 11, 5, 3, 10]  # 5 and 10 read again: recorded once, where first read
    with KernelSimulator(work / "kernel") as sim:
        d = Daemonized(sim, config)
        out = work / "wd" / "profiles" / "a.json"
        try:
            sim.mount("erofs,a", b"a")  # the mount: the kernel opens the bootstrap, the clock starts
            mounted = time.monotonic()
            blob = sim.mount("erofs,a", image.blob_id.encode())
            for n in order:
                c = image.chunk(n)
                assert sim.read(blob, c.uncompressed_offset + 100, 4000) == \
                    image.want[c.uncompressed_offset + 100:c.uncompressed_offset + 4100]
            # read window 1 MiB, but while recording a READ fetches only its own chunks: the
            # kernel has to ask for (and the recording sees) every chunk it reads
            assert d.stats["fetched_chunks"] == len(set(order)), d.stats
            assert d.stats["readahead_windows"] == 0
            assert wait_for(out.exists, seconds + 5), "no profile written after its seconds"
            took = time.monotonic() - mounted
            assert seconds - 0.1 < took < seconds + 2, f"profile written {took:.2f} s after the mount"
            late = image.chunk(20)
            sim.read(blob, late.uncompressed_offset, 4096)  # after N seconds: not recorded
            assert d.stats["fetched_chunks"] > len(set(order))  # ...and served with its whole window again
        finally:
            assert d.stop() == 0
        sim.check()
    assert out.stat().st_mode & 0o777 == 0o644 and out.parent.stat().st_mode & 0o777 == 0o700
    raw = json.loads(out.read_text())
    assert raw["format"] == "fscached-startup-profile" and raw["version"] == 1
    profile = StartupProfile.from_json(out.read_bytes())
    assert profile.bootstrap_digest == bootstrap_digest(image.boot)
    assert profile.recorded_seconds == seconds
    c = image.chunk
    assert [(r.blob_id, r.offset, r.length) for r in profile.ranges] == [
        (image.blob_id, c(5).uncompressed_offset, CHUNK),
        (image.blob_id, c(2).uncompressed_offset, CHUNK),
        (image.blob_id, c(9).uncompressed_offset, 3 * CHUNK),  # 9, 10, 11 merged: one range
        (image.blob_id, c(3).uncompressed_offset, CHUNK),
    ]
    assert [r.at_ms for r in profile.ranges] == sorted(r.at_ms for r in profile.ranges)
    assert profile.ranges[-1].at_ms < seconds * 1000
    profile.check_against(bootstrap_digest(image.boot), {image.blob_id: image.size})


def test_record_is_written_at_unbind_and_at_stop_before_its_time(image: Image, front: BlobFront,
                                                                 work: Path) -> None:
    b_dir = work / "b"
    b_dir.mkdir()
    config = Config(cache_dir=work / "cache", work_dir=work / "wd", images=[remote_spec(image, front)],
                    profiles={("a", "a"): ProfileSpec(record_seconds=600)})
    with KernelSimulator(work / "kernel") as sim:
        d = Daemonized(sim, config)
        try:
            sim.mount("erofs,a", b"a")
            blob = sim.mount("erofs,a", image.blob_id.encode())
            sim.read(blob, image.chunk(7).uncompressed_offset, 4096)
            # a second image bound at run time (the API's path), recording too; then unbound
            spec_b = ImageSpec("b", image.boot, None, domain="dom", registry=front.registry())
            d.daemon.submit(d.daemon.bind_image(spec_b, ProfileSpec(record_seconds=600))).result(30)
            sim.mount("erofs,dom", b"b")
            blob_b = sim.mount("erofs,dom", image.blob_id.encode())
            sim.read(blob_b, image.chunk(1).uncompressed_offset, 4096)
            d.daemon.submit(d.daemon.unbind_image("dom", "b")).result(30)
            out_b = work / "wd" / "profiles" / "b.json"
            assert out_b.exists(), "no profile written at unbind"
            assert [(r.offset, r.length) for r in StartupProfile.load(out_b).ranges] == \
                [(image.chunk(1).uncompressed_offset, CHUNK)]
            assert not (work / "wd" / "profiles" / "a.json").exists()
        finally:
            assert d.stop() == 0
    profile = StartupProfile.load(work / "wd" / "profiles" / "a.json")  # written at the stop
    assert [(r.offset, r.length) for r in profile.ranges] == [(image.chunk(7).uncompressed_offset, CHUNK)]


# -- replay ---------------------------------------------------------------------------------------
def write_profile(path: Path, image: Image, chunk_runs: list[tuple[int, int]], digest: str | None = None) -> Path:
    ranges = [ProfileRange(image.blob_id, image.chunk(first).uncompressed_offset, count * CHUNK, n)
              for n, (first, count) in enumerate(chunk_runs)]
    path.write_bytes(StartupProfile(digest or bootstrap_digest(image.boot), ranges, 30.0, "a").to_json())
    return path


def test_replay_fetches_the_profile_first_in_order_in_few_large_requests(image: Image, front: BlobFront,
                                                                        work: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fscached.core.fill, "PROFILE_FETCHES", 1)  # one at a time: the order is visible
    # chunks 20-23, then 2-3, then 10, 12 (not adjacent: two requests), then 3 again (a duplicate)
    path = write_profile(work / "p.json", image, [(20, 4), (2, 2), (10, 1), (12, 1), (3, 1)])
    config = Config(cache_dir=work / "cache", work_dir=work / "wd", images=[remote_spec(image, front)],
                    profiles={("a", "a"): ProfileSpec(replay=str(path))})
    profile_chunks = [*range(20, 24), 2, 3, 10, 12]
    with KernelSimulator(work / "kernel") as sim:
        d = Daemonized(sim, config)
        try:
            assert d.stats["profile_ranges_loaded"] == 5
            sim.mount("erofs,a", b"a")
            blob = sim.mount("erofs,a", image.blob_id.encode())  # OPEN: the replay starts
            assert wait_for(lambda: d.stats["profile_chunks_prefetched"] == len(profile_chunks), 10), d.stats
            assert d.stats["read"] == 0  # before any READ
            c = image.chunk
            assert front.requests == [  # in profile order, each contiguous stretch one request
                (image.blob_id, f"bytes={c(20).compressed_offset}-{c(23).compressed_offset + CHUNK - 1}"),
                (image.blob_id, f"bytes={c(2).compressed_offset}-{c(3).compressed_offset + CHUNK - 1}"),
                (image.blob_id, f"bytes={c(10).compressed_offset}-{c(10).compressed_offset + CHUNK - 1}"),
                (image.blob_id, f"bytes={c(12).compressed_offset}-{c(12).compressed_offset + CHUNK - 1}"),
            ]
            assert d.stats["fetches"] == 4 < len(profile_chunks)
            assert {(s, e) for s, e in sim.cached_extents(blob)} == {
                (c(20).uncompressed_offset, c(24).uncompressed_offset),
                (c(2).uncompressed_offset, c(4).uncompressed_offset),
                (c(10).uncompressed_offset, c(11).uncompressed_offset),
                (c(12).uncompressed_offset, c(13).uncompressed_offset)}
            server = d.daemon.frontend
            assert server is not None
            for n in profile_chunks:  # the reader finds them there: answered without a fetch
                off = c(n).uncompressed_offset
                assert sim.read(blob, off, CHUNK) == image.want[off:off + CHUNK]
            assert server.requests.total("cached") == len(profile_chunks)
            assert server.requests.total("filled") == 0
            assert sim.read(blob, 0, image.size) == image.want  # the rest on demand, correct
        finally:
            assert d.stop() == 0
        sim.check()


@pytest.mark.parametrize("problem", ["digest", "outside", "truncated", "foreign_blob", "missing"])
def test_a_bad_profile_is_one_warning_and_the_image_is_served(problem: str, image: Image, front: BlobFront,
                                                              work: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = work / "p.json"
    good = StartupProfile(bootstrap_digest(image.boot),
                          [ProfileRange(image.blob_id, image.chunk(3).uncompressed_offset, CHUNK)])
    if problem == "digest":
        write_profile(path, image, [(3, 1)], digest="sha256:" + "0" * 64)
        why = "recorded on bootstrap sha256:000"
    elif problem == "outside":
        good.ranges.append(ProfileRange(image.blob_id, image.size - 4096, 8192))
        path.write_bytes(good.to_json())
        why = "ends past blob"
    elif problem == "truncated":
        path.write_bytes(good.to_json()[:-20])
        why = "not JSON"
    elif problem == "foreign_blob":
        good.ranges.append(ProfileRange("f" * 64, 0, 4096))
        path.write_bytes(good.to_json())
        why = "which the image does not have"
    else:
        why = "No such file"
    caplog.set_level(logging.INFO)
    config = Config(cache_dir=work / "cache", work_dir=work / "wd", images=[remote_spec(image, front)],
                    profiles={("a", "a"): ProfileSpec(replay=str(path))})
    with KernelSimulator(work / "kernel") as sim:
        d = Daemonized(sim, config)
        try:
            assert d.exit_code is None and d.daemon.serving
            warnings = [r.getMessage() for r in caplog.records
                        if r.levelno == logging.WARNING and "start-up profile" in r.getMessage()]
            assert len(warnings) == 1 and why in warnings[0] and str(path) in warnings[0], warnings
            assert d.stats["profile_rejected"] == 1
            assert d.stats["profile_ranges_loaded"] == 0
            sim.mount("erofs,a", b"a")
            blob = sim.mount("erofs,a", image.blob_id.encode())
            time.sleep(0.3)
            assert d.stats["profile_chunks_prefetched"] == 0 and not front.requests  # nothing replayed
            assert sim.read(blob, 0, image.size) == image.want
        finally:
            assert d.stop() == 0
        sim.check()


# -- the keys ---------------------------------------------------------------------------------------
def test_profile_keys_in_the_flag_the_file_and_the_bind(tmp_path: Path) -> None:
    boot = tmp_path / "image.boot"
    spec, keys = parse_image_flag(f"fsid=a,bootstrap={boot},record_profile=30,profile=none")
    assert spec.fsid == "a" and keys == ProfileSpec(30.0, "none")
    _, keys = parse_image_flag(f"fsid=a,bootstrap={boot},profile=rel/p.json")
    assert keys == ProfileSpec(0.0, str(Path("rel/p.json").resolve()))
    assert parse_image_flag(f"fsid=a,bootstrap={boot}")[1] == ProfileSpec(0.0, "auto")
    from fscached.config import ConfigError, build_config

    config = build_config({"image": [{"fsid": "t", "bootstrap": str(boot), "record_profile": 12.5}]},
                          str(tmp_path / "c"), None, None, [f"fsid=f,bootstrap={boot}"], None, None, None)
    assert config.profiles == {("t", "t"): ProfileSpec(12.5, "auto")}  # f keeps the defaults
    for bad in ("record_profile=0", "record_profile=-1", "record_profile=soon", "record_profile=1e9"):
        with pytest.raises(ConfigError, match="record_profile"):
            parse_image_flag(f"fsid=a,bootstrap={boot},{bad}")

    entry = {"type": "bootstrap", "id": "img", "record_profile": 45, "profile": "/var/p.json",
             "config": {"cache_type": "fscache", "cache_config": {"work_dir": str(tmp_path)},
                        "backend_type": "localfs", "backend_config": {"dir": str(tmp_path)},
                        "metadata_path": str(boot)}}
    bind = parse_bind_entry(entry, check_files=False)
    assert bind.profile == ProfileSpec(45.0, "/var/p.json")
    assert parse_bind_entry({**entry, "record_profile": None, "profile": None} | {"profile": "auto"},
                            check_files=False).profile == ProfileSpec()
    for field, value in (("record_profile", "30"), ("record_profile", 0), ("profile", "rel.json"), ("profile", 3)):
        with pytest.raises(BadBind, match=field.split("_")[0]):
            parse_bind_entry({**entry, field: value}, check_files=False)


def test_profile_auto_asks_the_registry_for_a_pulled_image(image: Image, work: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """profile=auto: fetcher.referrers.fetch_profile with the manifest digest the pull gave."""
    import asyncio

    import fetcher.referrers
    from fscached.config import RegistrySpec

    good = StartupProfile(bootstrap_digest(image.boot),
                          [ProfileRange(image.blob_id, image.chunk(4).uncompressed_offset, 2 * CHUNK)]).to_json()
    asked: list[str] = []
    answers: list[bytes | Exception | None] = [good, None, OSError("registry down"), b"{}"]

    async def fake_fetch(source: object, manifest_digest: str) -> bytes | None:
        asked.append(manifest_digest)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(fetcher.referrers, "fetch_profile", fake_fetch)
    caplog.set_level(logging.INFO)

    async def main() -> list[tuple[int, int]]:
        daemon = Daemon(Config(cache_dir=work / "cache", work_dir=work / "wd"))
        results = []
        try:
            for n in range(4):
                spec = ImageSpec(f"r{n}", image.boot, None, ref="127.0.0.1:9/team/app:v1",
                                 registry=RegistrySpec("127.0.0.1:9", "team/app", "http"))
                daemon.catalog.add_image(spec, image.boot, daemon.pool.chain(spec))
                daemon.manifest_digests[(spec.volume, spec.fsid)] = f"sha256:{n:064x}"
                await daemon._start_profiles(spec, image.boot)
                blob = daemon.catalog.devices[(spec.volume, spec.fsid)][0]
                results.append((len(blob.profile_order), daemon.counters().get("profile_rejected", 0)))
        finally:
            await daemon.pool.close()
        return results

    assert asyncio.run(main()) == [(2, 0), (0, 0), (0, 0), (0, 1)]
    assert asked == [f"sha256:{n:064x}" for n in range(4)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "registry down" in warnings[0] and "not a start-up profile" in warnings[1]
