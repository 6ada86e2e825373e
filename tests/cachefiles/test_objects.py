"""cachefiles.objects: each anon fd is closed exactly once, none leaks."""
import os
import threading

import pytest

from cachefiles.objects import DuplicateObject, ObjectTable


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def new_fd(tmp_path, name):
    return os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)


def test_add_get_remove_closes_fd(tmp_path):
    before = open_fds()
    t = ObjectTable()
    fd = new_fd(tmp_path, "a")
    e = t.add(5, fd, "erofs,x", b"x", 123, payload="p")
    assert t.get(5) is e and 5 in t and len(t) == 1
    assert e.payload == "p" and e.size == 123
    assert t.remove(5) is e
    assert t.get(5) is None and t.remove(5) is None
    with pytest.raises(OSError):
        os.fstat(fd)
    assert open_fds() == before


def test_close_all_no_leak(tmp_path):
    before = open_fds()
    t = ObjectTable()
    for i in range(20):
        t.add(i, new_fd(tmp_path, f"f{i}"), "v", b"%d" % i, 0)
    t.close_all()
    assert len(t) == 0
    assert open_fds() == before


def test_duplicate_id_refused_and_fd_not_taken(tmp_path):
    t = ObjectTable()
    fd1, fd2 = new_fd(tmp_path, "a"), new_fd(tmp_path, "b")
    t.add(1, fd1, "v", b"k", 0)
    with pytest.raises(DuplicateObject):
        t.add(1, fd2, "v", b"k", 0)
    os.fstat(fd2)  # still ours
    os.close(fd2)
    t.close_all()


def test_untrusted_ids_are_only_numbers(tmp_path):
    t = ObjectTable()
    fd = new_fd(tmp_path, "a")
    for bad in (-1, 1 << 32, "1", 1.0):
        with pytest.raises(ValueError):
            t.add(bad, fd, "v", b"k", 0)
    os.close(fd)


def test_fd_stays_open_while_in_use(tmp_path):
    before = open_fds()
    t = ObjectTable()
    fd = new_fd(tmp_path, "a")
    t.add(3, fd, "v", b"k", 0)
    with t.use(3) as e:
        assert e.anon_fd == fd
        t.remove(3)  # CLOSE arrives while a worker writes
        assert t.get(3) is None
        os.pwrite(fd, b"still mine", 0)  # fd not closed yet
    with pytest.raises(OSError):
        os.fstat(fd)
    with t.use(3) as e:
        assert e is None
    assert open_fds() == before


def test_concurrent_remove_closes_once(tmp_path):
    before = open_fds()
    t = ObjectTable()
    for i in range(50):
        t.add(i, new_fd(tmp_path, f"f{i}"), "v", b"k", 0)
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        for i in range(50):
            with t.use(i):
                t.remove(i)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(t) == 0
    assert open_fds() == before
