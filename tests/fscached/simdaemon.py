"""Test helpers: fscached's Daemon on a uvloop thread, answering the kernel simulator."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import uvloop

from erofs_image.reader import Bootstrap
from fscached.core.chunkmap import chunks_by_blob
from fscached.config import Config, ImageSpec
from fscached.daemon import Daemon
from standins.kernel_simulator import KernelSimulator

WORK_ROOT = Path("/var/tmp")  # O_DIRECT cache files need a real filesystem, not tmpfs


def make_tree(root: Path) -> Path:
    root.mkdir()
    (root / "a.bin").write_bytes(os.urandom(300_000))
    (root / "same.bin").write_bytes((root / "a.bin").read_bytes())  # deduplicated
    (root / "text.txt").write_bytes(b"hello fscached\n" * 20_000)
    (root / "small").write_bytes(b"x" * 100)
    (root / "sub").mkdir()
    (root / "sub" / "zeros").write_bytes(bytes(200_000) + b"end")
    return root


def expected_blob_space(boot: Bootstrap, blobs_dir: Path, index: int) -> bytes:
    info = boot.blobs[index]
    space = bytearray(info.uncompressed_size)
    for ref in chunks_by_blob(boot.image).get(index, []):
        data = boot.read_chunk(ref, blobs_dir / info.blob_id)
        space[ref.uncompressed_offset:ref.uncompressed_offset + len(data)] = data
    return bytes(space)


class Running:
    """A Daemon on its own uvloop thread, bound to a simulator."""

    def __init__(self, sim: KernelSimulator, images: list[ImageSpec], cache: Path, read_window: int = 1 << 20) -> None:
        self.daemon = Daemon(Config(cache_dir=cache, images=images, read_window=read_window), device=sim.device())
        self.daemon.take_kernel_path()
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30  # serving: its images are bound and the device is read
        while not self.daemon.serving and self.exit_code is None:
            assert time.monotonic() < deadline, "the daemon did not start serving"
            time.sleep(0.005)

    def _run(self) -> None:
        self.exit_code = uvloop.run(self.daemon.run())

    def stop(self) -> int | None:
        self.daemon.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "daemon did not stop"
        return self.exit_code

    @property
    def stats(self) -> dict[str, int]:
        return self.daemon.frontend.stats

    def counters(self) -> dict[str, int]:
        return self.daemon.counters()


