"""The kernel simulator across processes: fscached runs as a real process (started, killed and
restarted by the systemd stand-in) while the simulated kernel lives in the test process.

The simulator (tests/standins/kernel_simulator.py) shares one process with the daemon: an OPEN
names its anon fd by number. Here the anon fd travels with the OPEN (SCM_RIGHTS on the
SOCK_SEQPACKET "device"), the daemon side puts the number it received into the message, and a
READ_COMPLETE goes back as a `complete <msg_id>` datagram carrying the anon fd, which the
simulator checks as the kernel would. Whether the daemon still holds an object's anon fd (it
dies with the process) is read from /proc/<pid>/fd of the daemon's processes.

    sim = RemoteKernelSimulator(work, pids=lambda: [standin.pid])
    standin = SystemdStandin([sys.executable, __file__, "daemon", *fscached_args],
                             env={..., "FSCACHED_SIM_DEVICE_FD": "3"}, first_fds={3: sim.daemon_fd})

`python remote_sim.py daemon ARGS...` is the daemon: fscached's own command line with the
device class replaced (first start: the fd in $FSCACHED_SIM_DEVICE_FD; later ones: the fd
systemd's store gave back). $FSCACHED_SIM_NO_FAILOVER=1: a kernel whose `restore` answers
EOPNOTSUPP.
"""
from __future__ import annotations

import array
import errno
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Callable

if __name__ == "__main__":  # the daemon process: the repository and tests/ on the path
    _here = Path(__file__).resolve()
    sys.path[:0] = [str(_here.parents[2]), str(_here.parents[1])]

from cachefiles.device import CachefilesDevice, CachefilesError
from cachefiles.messages import CACHEFILES_MSG_MAX_SIZE, parse_message

_HEADER = struct.Struct("<IIII")  # msg_id, opcode, len, object_id
_OPEN_FD_AT = _HEADER.size + 8  # volume_key_size, cookie_key_size, then fd
OP_OPEN = 0


def _sendmsg_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])


def _recv(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(4 * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    return data, fds


# -- the kernel's side (the test process) ---------------------------------------------------------
def remote_simulator_class():  # imported lazily: the daemon process never needs the simulator
    from standins.kernel_simulator import KernelSimulator, SimObject

    class RemoteKernelSimulator(KernelSimulator):
        def __init__(self, work_dir: str | os.PathLike[str], *, pids: Callable[[], list[int]],
                     failover: bool = True) -> None:
            self._pids = pids
            super().__init__(work_dir, failover=failover)

        def _send(self, data: bytes) -> None:
            if self.dead:
                raise OSError(errno.EIO, "cache is dead (device fd closed)")
            if len(data) >= _OPEN_FD_AT + 4 and _HEADER.unpack_from(data)[1] == OP_OPEN:
                fd = struct.unpack_from("<I", data, _OPEN_FD_AT)[0]
                _sendmsg_fd(self._kernel, data, fd)  # the anon fd goes into the daemon's table
                os.close(fd)  # the kernel keeps no such fd of its own
                return
            self._kernel.send(data)

        def anon_fd_open(self, obj: SimObject) -> bool:
            """Whether a process of the daemon holds an fd of the object's cache file open."""
            for pid in self._pids():
                try:
                    names = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for name in names:
                    try:
                        st = os.stat(f"/proc/{pid}/fd/{name}")
                    except OSError:
                        continue
                    if (st.st_dev, st.st_ino) == obj.ino:
                        return True
            return False

        def fd_is_cloexec(self, obj: SimObject) -> bool:
            raise NotImplementedError("the anon fd lives in another process")

        def _serve_commands(self) -> None:
            while True:
                try:
                    data, fds = _recv(self._kernel, 4096)
                except OSError:
                    data, fds = b"", []
                if not data:
                    for fd in fds:
                        os.close(fd)
                    self._die()
                    return
                text = data.decode("utf-8", "surrogateescape")
                if text.startswith("complete ") and fds:
                    try:
                        self.complete(fds[0], int(text.split()[1]))
                    except (OSError, ValueError) as exc:
                        self._error(f"{text!r}: {exc}")
                    finally:
                        for fd in fds:
                            os.close(fd)
                    continue
                for fd in fds:
                    os.close(fd)
                with self._lock:
                    self.commands.append(text)
                self._command(text)

    return RemoteKernelSimulator


# -- the daemon's side (the fscached process) ---------------------------------------------------
class RemoteSimDevice(CachefilesDevice):
    """CachefilesDevice on the simulator's SEQPACKET end, in the daemon's process."""

    def __init__(self, path: str = "<simulator>", *, completer=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(path, completer=self._complete_remote)
        self._sock: socket.socket | None = None

    def open(self) -> None:  # the first start: the fd the test passed
        self._fd = int(os.environ.pop("FSCACHED_SIM_DEVICE_FD"))
        os.set_inheritable(self._fd, False)

    @property
    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(fileno=os.dup(self.fileno()))
        return self._sock

    def _command(self, text: str) -> None:
        if text == "restore" and os.environ.get("FSCACHED_SIM_NO_FAILOVER") == "1":
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        super()._command(text)

    def read_message(self):  # type: ignore[no-untyped-def]
        try:
            data, fds = _recv(self._socket, max(4096, CACHEFILES_MSG_MAX_SIZE))
        except BlockingIOError:
            return None
        except OSError as e:
            raise CachefilesError(f"reading the simulator failed: {e.strerror}", e.errno) from None
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        if fds and len(data) >= _OPEN_FD_AT + 4 and _HEADER.unpack_from(data)[1] == OP_OPEN:
            buf = bytearray(data)
            struct.pack_into("<I", buf, _OPEN_FD_AT, fds[0])  # the number it has here
            data = bytes(buf)
            for fd in fds[1:]:
                os.close(fd)
        else:
            for fd in fds:
                os.close(fd)
        request = parse_message(data)
        fd = getattr(request, "fd", None)
        if fd is not None:
            os.set_inheritable(fd, False)
        return request

    def _complete_remote(self, anon_fd: int, msg_id: int) -> None:
        _sendmsg_fd(self._socket, f"complete {msg_id}".encode(), anon_fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


def main(argv: list[str]) -> int:
    from fscached import cli
    from fscached.daemon import Daemon

    Daemon.device_class = RemoteSimDevice
    return cli.main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] != ["daemon"]:
        sys.exit("usage: remote_sim.py daemon FSCACHED-ARGS...")
    sys.exit(main(sys.argv[2:]))
