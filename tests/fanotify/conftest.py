"""Fixtures for the tests of the fanotify kernel path on the host kernel (generic: any test here).

  fanotify_host    session: skips unless root on a kernel whose /var/tmp takes pre-content marks
  fanotify_work    a fresh directory on /var/tmp (ext4: pre-content marks need it), removed after
  fscached_daemons a factory: start(cache_dir, images, **FscachedProcess kwargs) -> started
                   FscachedProcess; after the test, pass or fail, every daemon it started is
                   stopped (SIGTERM, then -9), and their mounts (the `mountpoint=` of their
                   images, plus any `mountpoints=` given) and keepers are gone
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from daemon_proc import WORK_ROOT, FscachedProcess


@pytest.fixture(scope="session")
def fanotify_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (fanotify pre-content marks, mount)")
    from fanotify.group import probe

    reason = probe(WORK_ROOT)
    if reason is not None:
        pytest.fail(f"no fanotify pre-content events here: {reason}")


@pytest.fixture
def fanotify_work(fanotify_host: None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fsc-", dir=WORK_ROOT))  # short: the keeper socket lives below
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def image_mountpoints(images: list[str]) -> list[Path]:
    """The `mountpoint=` of each `--image` spec that has one."""
    found = []
    for spec in images:
        fields = dict(part.partition("=")[::2] for part in spec.split(","))
        if fields.get("mountpoint"):
            found.append(Path(fields["mountpoint"]).resolve())
    return found


@pytest.fixture
def fscached_daemons(fanotify_host: None) -> Iterator[Callable[..., FscachedProcess]]:
    started: list[tuple[FscachedProcess, list[Path]]] = []

    def start(cache_dir: Path, images: list[str], *, mountpoints: list[Path] = (), timeout: float = 60,
              **kwargs) -> FscachedProcess:
        proc = FscachedProcess(cache_dir, images, **kwargs)
        started.append((proc, image_mountpoints(images) + list(mountpoints)))
        return proc.start(timeout)

    try:
        yield start
    finally:
        for proc, mountpoints in reversed(started):
            if proc.proc is not None and proc.proc.poll() is None:
                try:
                    proc.stop(timeout=20)  # a clean stop unmounts what it mounted
                except subprocess.TimeoutExpired:
                    pass
            proc.cleanup(mountpoints)  # -9 if still alive, lazy unmounts, keeper dismissed
