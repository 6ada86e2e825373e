"""fscached.util.leases on the host kernel: what "held elsewhere" means for a blob cache file
(a file-backed EROFS mount, mounted or detached with `umount -l`), and that a lease broken by
someone's open(2) never ends the process holding it (the kernel's default is SIGIO: fatal)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from fscached.util import mounts
from fscached.util.leases import exclusive_lease, held_elsewhere, path_held_elsewhere

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = Path(tmp_path_factory.mktemp("leases", numbered=True))
    (work / "src").mkdir()
    (work / "src" / "small").write_bytes(b"hello\n")
    (work / "src" / "big").write_bytes(os.urandom(3 << 20))
    convert(work / "src", work / "out", compressor="none")
    boot = work / "out" / "image.boot"
    blob = work / "out" / "blobs" / Bootstrap.open(boot).blobs[0].blob_id
    return boot, blob


def test_our_own_fds_are_not_someone_else(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    writer = os.open(path, os.O_RDWR)
    copy = os.dup(writer)  # a copy (as the keeper holds one) is the same open file
    try:
        assert not held_elsewhere(writer)
        reader = os.open(path, os.O_RDONLY)
        assert held_elsewhere(writer), "an O_RDONLY open by another is someone else"
        os.close(reader)
        other_writer = os.open(path, os.O_RDWR)
        assert held_elsewhere(writer), "another O_RDWR open is someone else"
        os.close(other_writer)
        assert not held_elsewhere(writer)
    finally:
        os.close(copy)
        os.close(writer)
    assert path_held_elsewhere(path, write=True) is False
    assert path_held_elsewhere(tmp_path / "gone") is None


@pytest.mark.root
def test_a_mounted_or_detached_image_holds_its_blob_files(image: tuple[Path, Path], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (mount): make test runs as root")
    boot, blob = image
    mnt = tmp_path / "mnt"
    writer = os.open(blob, os.O_RDWR)
    try:
        assert not held_elsewhere(writer)
        mounts.mount_erofs(str(boot), mnt, f"device={blob}")
        try:
            assert held_elsewhere(writer), "a mounted superblock holds its device files"
            reader = os.open(mnt / "small", os.O_RDONLY)
            subprocess.run(["umount", "-l", str(mnt)], check=True)
            assert str(mnt) not in mounts.erofs_mounts()
            assert held_elsewhere(writer), "a detached superblock with an open file still holds them"
            os.close(reader)
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        assert not held_elsewhere(writer), "the last reader gone, the superblock lets go"
    finally:
        os.close(writer)


def test_a_broken_lease_does_not_end_its_holder(tmp_path: Path) -> None:
    """An open(2) by another process while the lease is held breaks it; the kernel signals
    the holder. With the default signal (SIGIO) the holder dies: a daemon or a keeper taking a
    lease at the wrong moment would be killed, and the keeper's group would go with it."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    holder = textwrap.dedent(f"""
        import os, subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from fscached.util.leases import exclusive_lease
        fd = os.open({str(path)!r}, os.O_RDONLY)
        with exclusive_lease(fd) as granted:
            assert granted
            opener = subprocess.Popen([sys.executable, "-c", "open({str(path)!r}).close()"])
            time.sleep(0.5)  # the opener waits for the lease: the kernel signals us meanwhile
        opener.wait(10)
        print("survived", opener.returncode)
    """)
    done = subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "survived 0", (done.returncode, done.stdout, done.stderr)
    with exclusive_lease(os.open(path, os.O_RDONLY)) as granted:
        assert granted
