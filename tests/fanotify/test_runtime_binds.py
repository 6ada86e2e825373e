"""Images bound and unbound at run time on the fanotify path (the control API's daemon calls),
while other images stay mounted and are read: a blob shared in a domain outlives the first image
that used it, an unbound image's blobs lose their marks, errors are the snapshotter's."""
from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import uvloop

from daemon_proc import REPO, drop_caches

sys.path.insert(0, str(REPO / "vm-tests"))
from ocilayout import layer_tar, write_layout
from trees import convert

from fscached.util import mounts
from fscached.core.catalog import CatalogError
from fscached.config import Config, ImageSpec
from fscached.daemon import BusyError, Daemon


class InThread:
    """A fanotify Daemon on its own uvloop thread; `call` runs a coroutine there."""

    def __init__(self, config: Config) -> None:
        self.daemon = Daemon(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "daemon did not start"

    def _run(self) -> None:
        async def main() -> int:
            await self.daemon.load()
            self.daemon.take_kernel_path()
            self.loop = asyncio.get_running_loop()
            self.loop.call_soon(self.ready.set)
            return await self.daemon.run()

        self.exit_code = uvloop.run(main())

    def call(self, coro: Any, timeout: float = 60) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> int | None:
        self.daemon.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.exit_code


def tree_digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def two_images(fanotify_work: Path) -> Iterator[tuple[Path, Path, Path]]:
    src = fanotify_work / "src"
    for name in ("common", "a-only", "b-only"):
        (src / name).mkdir(parents=True)
        (src / name / "data.bin").write_bytes(os.urandom(3 << 20))
        (src / name / "note.txt").write_text(f"{name}\n" * 1000)
    common = layer_tar(src, include={"common"})
    built_a = convert(write_layout(fanotify_work / "oci-a", [common, layer_tar(src, include={"a-only"})]),
                      fanotify_work / "a", "zstd")
    built_b = convert(write_layout(fanotify_work / "oci-b", [common, layer_tar(src, include={"b-only"})]),
                      fanotify_work / "b", "zstd")
    yield src, built_a, built_b


def spec(fsid: str, built: Path, mountpoint: Path) -> ImageSpec:
    return ImageSpec(fsid, built / "image.boot", built / "blobs", domain="shared", mountpoint=mountpoint)


def test_bind_and_unbind_while_another_image_is_read(fanotify_work: Path, two_images: tuple[Path, Path, Path]) -> None:
    src, built_a, built_b = two_images
    mnt_a, mnt_b = fanotify_work / "mnt-a", fanotify_work / "mnt-b"
    want = tree_digests(src)
    cache = fanotify_work / "cache"
    daemon = InThread(Config(cache_dir=cache, images=[spec("a", built_a, mnt_a)], kernel_path="fanotify"))
    stop_reading = threading.Event()
    errors: list[str] = []

    def read_a_forever() -> None:
        while not stop_reading.is_set():
            for name in ("common/data.bin", "a-only/data.bin", "a-only/note.txt"):
                try:
                    if hashlib.sha256((mnt_a / name).read_bytes()).hexdigest() != want[name]:
                        errors.append(f"wrong bytes in {name}")
                except OSError as exc:
                    errors.append(f"{name}: {exc}")

    reader = threading.Thread(target=read_a_forever)
    try:
        drop_caches()
        reader.start()
        daemon.call(daemon.daemon.bind_image(spec("b", built_b, mnt_b)))
        assert str(mnt_b) in mounts.erofs_mounts()
        for name in ("common/data.bin", "b-only/data.bin", "b-only/note.txt"):
            assert hashlib.sha256((mnt_b / name).read_bytes()).hexdigest() == want[name]
        shared = sorted((cache / "blobs" / "shared").iterdir())
        assert len(shared) == 3, shared  # the common layer's blob once, one per image-only layer
        with pytest.raises(CatalogError, match="already served"):
            daemon.call(daemon.daemon.bind_image(spec("b", built_b, mnt_b)))
        # unbinding b unmounts it; the shared blob keeps serving a, b's own blob loses its mark
        daemon.call(daemon.daemon.unbind_image("shared", "b"))
        assert str(mnt_b) not in mounts.erofs_mounts()
        server = daemon.daemon.frontend
        names = {cf.blob.info.blob_id for cf in server.files.values()}  # type: ignore[union-attr]
        b_only = {p.name for p in (built_b / "blobs").iterdir()} - {p.name for p in (built_a / "blobs").iterdir()}
        assert b_only and not (b_only & names), "b's own blob is still served after its unbind"
        drop_caches()
        stop_reading.set()
        reader.join(60)
        assert not errors, errors[:5]
        assert tree_digests(mnt_a / "common") == {k[len("common/"):]: v for k, v in want.items() if k.startswith("common/")}
        with pytest.raises(CatalogError, match="blob_cache: cache entry not found"):
            daemon.call(daemon.daemon.unbind_image("shared", "b"))
        # a busy image is not dropped: its mount stays watched
        with open(mnt_a / "a-only" / "note.txt", "rb"):
            with pytest.raises(BusyError):
                daemon.call(daemon.daemon.unbind_image("shared", "a"))
        assert str(mnt_a) in mounts.erofs_mounts()
        daemon.call(daemon.daemon.unbind_image("shared", "a"))
        assert not server.files, "every blob dropped with the last image"  # type: ignore[union-attr]
        assert daemon.daemon.catalog.images == {}
    finally:
        stop_reading.set()
        if reader.is_alive():
            reader.join(60)
        assert daemon.stop() == 0
        for mnt in (mnt_a, mnt_b):
            if str(mnt) in mounts.erofs_mounts():
                os.system(f"umount -l {mnt}")
