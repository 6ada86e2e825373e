"""native/: aligned buffers, O_DIRECT writes, copy_range, the READ_COMPLETE ioctl."""
import errno
import os
import threading
import time

import pytest

import native
from native import AlignedBuffer


@pytest.fixture
def direct_file(tmp_path):
    """A file opened O_WRONLY|O_DIRECT on a non-tmpfs dir (like a cachefiles anon fd)."""
    if native.fs_type(tmp_path) == 0x01021994:
        pytest.fail("tmp_path is tmpfs: no O_DIRECT (set TMPDIR to a disk filesystem)")
    path = tmp_path / "direct"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    yield path, fd
    os.close(fd)


def test_aligned_buffer_alignment_and_capacity():
    for size in (1, 4095, 4096, 4097, 1 << 20):
        b = AlignedBuffer(size)
        assert b.address % 4096 == 0
        assert len(b) == size
        assert b.capacity % 4096 == 0 and b.capacity >= size
        assert bytes(b.full_view()) == bytes(b.capacity)


def test_aligned_buffer_write_and_zero():
    b = AlignedBuffer(8192)
    b.write(b"abc", at=10)
    assert bytes(b.view()[10:13]) == b"abc"
    b.zero(11, 12)
    assert bytes(b.view()[10:13]) == b"a\0c"
    with pytest.raises(ValueError):
        b.write(b"x", at=8192)


def test_pwrite_full_to_o_direct_file(direct_file):
    path, fd = direct_file
    b = AlignedBuffer(3 * 4096)
    data = os.urandom(3 * 4096)
    b.write(data)
    assert native.pwrite_full(fd, b, len(data), 4096) == len(data)
    assert native.write_aligned(fd, b, 8 * 4096, 4096) == 4096
    got = path.read_bytes()
    assert got[4096 : 4 * 4096] == data
    assert got[8 * 4096 :] == data[:4096]


def test_o_direct_refuses_unaligned_python_bytes(direct_file):
    # What the kernel's cache file does with a plain bytes object or a short length.
    _, fd = direct_file
    with pytest.raises(OSError) as e:
        native.pwrite_full(fd, AlignedBuffer(4096), 100, 0)
    assert e.value.errno == errno.EINVAL


def test_write_aligned_rejects_partial_blocks(direct_file):
    _, fd = direct_file
    with pytest.raises(ValueError):
        native.write_aligned(fd, AlignedBuffer(4096), 512, 4096)
    with pytest.raises(ValueError):
        native.write_aligned(fd, AlignedBuffer(4096), 0, 1000)


def test_pwrite_full_bad_fd_raises_oserror():
    with pytest.raises(OSError) as e:
        native.pwrite_full(987654, b"x", 1, 0)
    assert e.value.errno == errno.EBADF


def test_read_complete_on_regular_file_is_enotty(tmp_path):
    # ENOTTY proves the ioctl really reached the kernel (a regular file has no such ioctl).
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as e:
            native.read_complete(fd, 7)
        assert e.value.errno == errno.ENOTTY
    finally:
        os.close(fd)
    assert native.CACHEFILES_IOC_READ_COMPLETE == (1 << 30) | (4 << 16) | (0x98 << 8) | 1


def test_copy_range_with_unaligned_tail(tmp_path, direct_file):
    path, dst = direct_file
    src_data = os.urandom(3 * 4096 + 1000 + 77)
    (tmp_path / "src").write_bytes(src_data)
    src = os.open(tmp_path / "src", os.O_RDONLY | os.O_CLOEXEC)
    try:
        length = 2 * 4096 + 1000  # unaligned tail, read from an unaligned source offset
        assert native.copy_range(src, 77, dst, 4096, length) == 3 * 4096
    finally:
        os.close(src)
    got = path.read_bytes()
    assert len(got) == 4 * 4096
    assert got[:4096] == bytes(4096)
    assert got[4096 : 4096 + length] == src_data[77 : 77 + length]
    assert got[4096 + length :] == bytes(4 * 4096 - 4096 - length)


def test_copy_range_large_crosses_internal_chunks(tmp_path, direct_file):
    path, dst = direct_file
    src_data = os.urandom(3 * (1 << 20) + 5)
    (tmp_path / "src").write_bytes(src_data)
    src = os.open(tmp_path / "src", os.O_RDONLY | os.O_CLOEXEC)
    try:
        native.copy_range(src, 0, dst, 0, len(src_data))
    finally:
        os.close(src)
    got = path.read_bytes()
    assert got[: len(src_data)] == src_data and len(got) % 4096 == 0


def test_copy_range_errors(tmp_path, direct_file):
    _, dst = direct_file
    (tmp_path / "src").write_bytes(b"x" * 5000)
    src = os.open(tmp_path / "src", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as e:
            native.copy_range(src, 0, dst, 100, 4096)  # misaligned destination
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            native.copy_range(src, 4096, dst, 0, 4096)  # source ends inside the range
        assert e.value.errno == errno.ENODATA
    finally:
        os.close(src)


def test_copy_ranges_batched(tmp_path, direct_file):
    path, dst = direct_file
    src_data = os.urandom(20000)
    (tmp_path / "src").write_bytes(src_data)
    src = os.open(tmp_path / "src", os.O_RDONLY | os.O_CLOEXEC)
    try:
        n = native.copy_ranges(src, dst, [(0, 8192, 4096), (5000, 0, 3000)])
        assert n == 8192
        with pytest.raises(OSError) as e:
            native.copy_ranges(src, dst, [(0, 16384, 10), (19000, 4096, 4096)])
        assert e.value.ranges_done == 1
    finally:
        os.close(src)
    got = path.read_bytes()
    assert got[:3000] == src_data[5000:8000]
    assert got[3000:4096] == bytes(1096)
    assert got[8192 : 8192 + 4096] == src_data[:4096]


def test_fs_type(tmp_path):
    assert native.fs_type(tmp_path) > 0
    with pytest.raises(OSError) as e:
        native.fs_type(tmp_path / "missing")
    assert e.value.errno == errno.ENOENT


def test_c_calls_release_the_gil(tmp_path):
    """Python keeps running in another thread while one C copy is in progress."""
    size = 64 << 20
    src_path = tmp_path / "big"
    with open(src_path, "wb") as f:
        f.truncate(size)
    src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    dst = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    window = {}
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.monotonic())

    def copier():
        window["start"] = time.monotonic()
        for _ in range(4):
            native.copy_range(src, 0, dst, 0, size)
        window["end"] = time.monotonic()

    t = threading.Thread(target=ticker)
    t.start()
    try:
        c = threading.Thread(target=copier)
        c.start()
        c.join()
    finally:
        stop.set()
        t.join()
        os.close(src)
        os.close(dst)
    inside = [x for x in ticks if window["start"] < x < window["end"]]
    # With the GIL held for the whole C call the ticker could only run at the few
    # bytecode boundaries between the 4 calls; it runs thousands of times instead.
    assert len(inside) > 1000
