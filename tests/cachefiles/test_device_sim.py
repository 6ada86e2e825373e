"""CachefilesDevice against the kernel simulator: command bytes, OPEN/READ/CLOSE, traps."""
import errno
import os
import threading

import pytest

from cachefiles.device import CachefilesDevice, CachefilesError
from cachefiles.messages import encode_open, encode_read
from standins.kernel_simulator import KernelSimulator, SimulatorError

from minidaemon import MiniDaemon  # tests/cachefiles is on sys.path (rootdir-less test dir)

VOL = "erofs,img"


def fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture
def sim(tmp_path):
    s = KernelSimulator(tmp_path / "sim")
    yield s
    s.shutdown()


def start(sim, cache_dir, contents, mode="aligned", tag=None):
    dev = sim.device()
    dev.bind(cache_dir, tag=tag)
    d = MiniDaemon(dev, contents, mode)
    d.start()
    return dev, d


def finish(sim, dev, d):
    d.stop()
    dev.close()
    sim.check()


def test_bind_sends_exact_commands(sim, cache_dir):
    dev = sim.device()
    dev.bind(cache_dir, tag="mytag")
    dev.close()
    sim._reader.join(5)
    assert sim.commands == [f"dir {cache_dir}", "tag mytag", "bind ondemand"]
    assert sim.bound and sim.cache_dir == str(cache_dir) and sim.tag == "mytag"
    sim.check()


def test_bind_relative_dir_is_made_absolute(sim, cache_dir, monkeypatch):
    monkeypatch.chdir(cache_dir.parent)
    dev = sim.device()
    dev.bind("cache")
    dev.close()
    sim._reader.join(5)
    assert sim.commands == [f"dir {cache_dir}", "bind ondemand"]


def test_bind_refuses_missing_dir(sim, tmp_path):
    with pytest.raises(CachefilesError, match="does not exist"):
        sim.device().bind(tmp_path / "nope")
    assert sim.commands == []


def test_bind_refuses_tmpfs(sim):
    import native

    if not os.path.isdir("/dev/shm") or native.fs_type("/dev/shm") != 0x01021994:
        pytest.fail("no tmpfs at /dev/shm: this test needs one")
    with pytest.raises(CachefilesError, match="tmpfs"):
        sim.device().bind("/dev/shm")


def test_bind_refuses_readonly(sim, cache_dir, monkeypatch):
    real = os.statvfs

    class RO:
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            return os.ST_RDONLY if name == "f_flag" else getattr(self._st, name)

    monkeypatch.setattr(os, "statvfs", lambda p: RO(real(p)))
    with pytest.raises(CachefilesError, match="read-only"):
        sim.device().bind(cache_dir)


def test_open_errors_are_actionable(tmp_path, monkeypatch):
    with pytest.raises(CachefilesError, match=r"no .*cachefiles.*load the cachefiles module"):
        CachefilesDevice(str(tmp_path / "cachefiles")).open()

    def busy(*a, **k):
        raise OSError(errno.EBUSY, "busy")

    monkeypatch.setattr(os, "open", busy)
    with pytest.raises(CachefilesError, match=r"another daemon .*nydusd or cachefilesd"):
        CachefilesDevice().open()


def test_bind_error_names_kernel_config(tmp_path, cache_dir):
    """A write(2) that fails like a kernel without on-demand support."""
    r, w = os.pipe()
    os.close(r)

    class FailingDevice(CachefilesDevice):
        def _command(self, text):
            if text == "bind ondemand":
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    dev = FailingDevice.from_fd(w)
    with pytest.raises(CachefilesError) as e:
        dev.bind(cache_dir)
    assert "CONFIG_CACHEFILES_ONDEMAND=y" in str(e.value)
    assert "CONFIG_EROFS_FS_ONDEMAND=y" in str(e.value)
    assert e.value.errno == errno.EOPNOTSUPP
    dev.close()


def test_read_message_none_when_idle(sim, cache_dir):
    dev = sim.device()
    assert dev.read_message() is None
    dev.close()


def test_mount_read_close_and_no_fd_leak(sim, cache_dir):
    data = os.urandom(3 * 4096 + 100)
    before = fds()
    dev, d = start(sim, cache_dir, {b"img": data})
    obj = sim.mount(VOL, b"img")
    assert obj.copen_result == len(data)
    assert sim.fd_is_cloexec(obj), "the daemon must set FD_CLOEXEC on anon fds"
    assert sim.read(obj, 0, 4096) == data[:4096]
    # tail: the kernel asks for whole pages; the daemon pads with zeros
    assert sim.read(obj, 12288, 4096) == data[12288:] + bytes(4096 - 100)
    assert sim.cached_extents(obj) == [(0, 4096), (12288, 16384)]
    sim.close(obj)  # waits for the daemon to close the anon fd
    finish(sim, dev, d)
    sim.shutdown()
    assert fds() <= before  # nothing new (the simulator's own sockets are gone too)


def test_many_reads_in_flight(sim, cache_dir):
    data = os.urandom(64 * 4096)
    dev, d = start(sim, cache_dir, {b"img": data})
    obj = sim.mount(VOL, b"img")
    pending = [sim.start_read(obj, i * 4096 * 4, 4096 * 4) for i in range(16)]
    assert len({p.msg_id for p in pending}) == 16
    for i, p in enumerate(pending):
        assert p.result() == data[i * 16384 : (i + 1) * 16384]
    finish(sim, dev, d)


def test_unknown_cookie_gets_error_copen(sim, cache_dir):
    dev, d = start(sim, cache_dir, {})
    obj = sim.mount(VOL, b"missing")
    assert obj.copen_result == -errno.ENOENT and obj.size is None
    assert not sim.anon_fd_open(obj)
    finish(sim, dev, d)


def test_reopen_after_daemon_closed_fd_gets_new_object_id(sim, cache_dir):
    data = os.urandom(8192)
    dev, d = start(sim, cache_dir, {b"img": data})
    obj = sim.mount(VOL, b"img")
    first_id = obj.object_id
    assert sim.read(obj, 0, 4096) == data[:4096]
    d.close_object(first_id)
    assert sim.read(obj, 4096, 4096) == data[4096:]
    assert obj.reopens == 1 and obj.object_id != first_id
    assert sim.discarded == []  # same size reported both times
    finish(sim, dev, d)


def test_size_change_on_reopen_discards_cache(sim, cache_dir):
    contents = {b"img": os.urandom(8192)}
    dev, d = start(sim, cache_dir, contents)
    obj = sim.mount(VOL, b"img")
    sim.read(obj, 0, 4096)
    d.close_object(obj.object_id)
    contents[b"img"] = os.urandom(12288)
    sim.read(obj, 4096, 4096)
    assert sim.discarded == [obj]
    finish(sim, dev, d)


def test_unaligned_write_refused(sim, cache_dir):
    dev, d = start(sim, cache_dir, {b"img": os.urandom(8192)}, mode="bytes")
    obj = sim.mount(VOL, b"img")
    with pytest.raises(OSError) as e:
        sim.read(obj, 0, 4096)
    assert e.value.errno == errno.EIO
    assert d.write_errors and d.write_errors[0].errno == errno.EINVAL
    finish(sim, dev, d)


def test_hole_after_completion_is_eio(sim, cache_dir):
    dev, d = start(sim, cache_dir, {b"img": os.urandom(8192)}, mode="skip")
    obj = sim.mount(VOL, b"img")
    with pytest.raises(OSError) as e:
        sim.read(obj, 0, 4096)
    assert e.value.errno == errno.EIO
    finish(sim, dev, d)


def test_partial_fill_makes_the_kernel_ask_again(sim, cache_dir):
    data = os.urandom(4 * 4096)
    dev, d = start(sim, cache_dir, {b"img": data}, mode="half")
    obj = sim.mount(VOL, b"img")
    assert sim.read(obj, 0, 4 * 4096) == data
    assert [(r.offset, r.length) for r in d.reads] == [
        (0, 16384), (4096, 12288), (8192, 8192), (12288, 4096)]
    finish(sim, dev, d)


def test_tail_not_padded_to_4k_is_flagged(sim, cache_dir):
    data = os.urandom(4096 + 300)
    dev, d = start(sim, cache_dir, {b"img": data}, mode="tail512")
    obj = sim.mount(VOL, b"img")
    with pytest.raises(OSError):
        sim.read(obj, 0, 8192)
    assert sim.errors and "whole 4096-byte blocks" in sim.errors[0]
    sim.errors.clear()
    finish(sim, dev, d)


def test_complete_with_wrong_msg_id_is_einval(sim, cache_dir):
    dev, d = start(sim, cache_dir, {b"img": os.urandom(4096)})
    obj = sim.mount(VOL, b"img")
    with pytest.raises(CachefilesError) as e:
        dev.complete_read(obj.anon_fd, 999)
    assert e.value.errno == errno.EINVAL
    finish(sim, dev, d)


def test_daemon_closing_device_fails_pending_requests(sim, cache_dir):
    dev = sim.device()
    dev.bind(cache_dir)
    t = threading.Timer(0.2, dev.close)  # nobody answers; then the device fd goes away
    t.start()
    obj = sim.mount(VOL, b"img")
    t.join()
    assert obj.copen_result == -errno.EIO and sim.dead
    os.close(obj.anon_fd)  # never taken by a daemon (the kernel installs it at read time)
    with pytest.raises(OSError) as e:
        sim.mount(VOL, b"img")
    assert e.value.errno == errno.EIO


def test_restore_and_unknown_command(tmp_path, cache_dir):
    sim = KernelSimulator(tmp_path / "s", failover=False)
    dev = sim.device()
    dev.bind(cache_dir)
    with pytest.raises(CachefilesError, match=r"6\.8") as e:  # a kernel without failover refuses it
        dev.restore()
    assert e.value.errno == errno.EOPNOTSUPP and dev.restore_supported is False
    assert dev.probe_restore() is False
    dev._command("frobnicate 1")
    dev.close()
    sim._reader.join(5)
    # the refused restores never reach the command thread (recorded at once, not in order)
    assert sim.commands.count("restore") == 2 and sim.commands[-1] == "frobnicate 1"
    assert len(sim.errors) == 1 and "EOPNOTSUPP" in sim.errors[0]
    with pytest.raises(SimulatorError):
        sim.check()
    sim.shutdown()


def test_copen_command_format(sim, cache_dir):
    dev = sim.device()
    dev.bind(cache_dir)
    with pytest.raises(ValueError):
        dev.copen(1, -5000)
    dev.copen(7, -2)
    dev.close()
    sim._reader.join(5)
    assert sim.commands[-1] == "copen 7,-2"
    assert "no pending OPEN 7" in sim.errors[0]


def test_malformed_open_is_rejected_and_fd_closed(tmp_path):
    import socket

    k, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    d.setblocking(False)
    dev = CachefilesDevice.from_fd(d.detach(), path="<test>")
    anon = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    os.set_inheritable(anon, True)
    k.send(encode_open(4, 1, "erofs,x", b"k", anon)[:-1] + b"")  # len field now wrong
    from cachefiles.messages import MalformedMessage

    with pytest.raises(MalformedMessage) as e:
        dev.read_message()
    assert e.value.fd == anon
    assert dev.reject_malformed(e.value)
    assert k.recv(100) == b"copen 4,-22"
    with pytest.raises(OSError):
        os.fstat(anon)
    k.send(encode_read(5, 1, 0, 4096) + b"x")
    with pytest.raises(MalformedMessage) as e:
        dev.read_message()
    assert not dev.reject_malformed(e.value)
    dev.close()
    k.close()


def test_inuse_and_cull_validate_names(sim, cache_dir):
    dev = sim.device()
    for bad in ("", "a/b", "..", "a b"):
        with pytest.raises(CachefilesError):
            dev.cull(bad)
    dev.cull("Dabc")
    assert dev.inuse("Dabc") is False
    dev.close()
    sim._reader.join(5)
    assert sim.commands == ["cull Dabc", "inuse Dabc"]
