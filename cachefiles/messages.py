"""Wire format of cachefiles on-demand messages (include/uapi/linux/cachefiles.h).

Pure functions: `parse_message` for what the daemon reads from /dev/cachefiles, the
`encode_*` helpers for the simulator.  Everything is little-endian (the host order of
every kernel this runs on; the kernel writes native-endian structs).

Header (16 bytes): msg_id u32, opcode u32, len u32 (counts the header), object_id u32.
OPEN body: volume_key_size u32, cookie_key_size u32, fd u32, flags u32, then the volume
key (NUL-terminated, NUL counted) directly followed by the binary cookie key.
READ body: off u64, len u64.  CLOSE: no body.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

CACHEFILES_MSG_MAX_SIZE = 1024

OP_OPEN = 0
OP_CLOSE = 1
OP_READ = 2
OPCODE_NAMES = {OP_OPEN: "OPEN", OP_CLOSE: "CLOSE", OP_READ: "READ"}

_HDR = struct.Struct("<IIII")
_OPEN = struct.Struct("<IIII")
_READ = struct.Struct("<QQ")
HEADER_SIZE = _HDR.size  # 16
OPEN_FIXED_SIZE = HEADER_SIZE + _OPEN.size  # 32
READ_SIZE = HEADER_SIZE + _READ.size  # 32
CLOSE_SIZE = HEADER_SIZE


@dataclass(frozen=True, slots=True)
class OpenRequest:
    msg_id: int
    object_id: int
    volume_key: str  # without its NUL; undecodable bytes kept via surrogateescape
    cookie_key: bytes
    fd: int  # a new anon fd already installed in our fd table: we own it
    flags: int


@dataclass(frozen=True, slots=True)
class ReadRequest:
    msg_id: int
    object_id: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class CloseRequest:
    msg_id: int
    object_id: int


Request = OpenRequest | ReadRequest | CloseRequest


class MalformedMessage(ValueError):
    """A message that breaks the wire format.

    Carries whatever could be read so the caller can still act: answer an OPEN with
    `copen <msg_id>,-EINVAL` and close `fd` (else it leaks and keeps the device busy),
    or send READ_COMPLETE for a READ so the reader gets EIO instead of hanging.
    """

    def __init__(self, reason: str, msg_id: int | None = None, opcode: int | None = None,
                 fd: int | None = None) -> None:
        self.reason = reason
        self.msg_id = msg_id
        self.opcode = opcode
        self.fd = fd
        op = OPCODE_NAMES.get(opcode, str(opcode)) if opcode is not None else "?"
        mid = "?" if msg_id is None else str(msg_id)
        super().__init__(f"malformed cachefiles message (msg_id {mid}, opcode {op}): {reason}")


def parse_message(buf: bytes | bytearray | memoryview) -> Request:
    """Parse one message exactly as read(2) returned it; raise MalformedMessage."""
    buf = bytes(buf)
    n = len(buf)
    if n < HEADER_SIZE:
        msg_id = struct.unpack_from("<I", buf, 0)[0] if n >= 4 else None
        opcode = struct.unpack_from("<I", buf, 4)[0] if n >= 8 else None
        raise MalformedMessage(f"short header: {n} bytes, need {HEADER_SIZE}", msg_id, opcode)
    msg_id, opcode, length, object_id = _HDR.unpack_from(buf, 0)
    if length != n:
        raise MalformedMessage(f"len field says {length} bytes but {n} were read", msg_id, opcode,
                               _open_fd(buf) if opcode == OP_OPEN else None)

    if opcode == OP_OPEN:
        return _parse_open(buf, msg_id, object_id)
    if opcode == OP_READ:
        if n != READ_SIZE:
            raise MalformedMessage(f"READ is {n} bytes, must be {READ_SIZE}", msg_id, opcode)
        offset, rlen = _READ.unpack_from(buf, HEADER_SIZE)
        return ReadRequest(msg_id, object_id, offset, rlen)
    if opcode == OP_CLOSE:
        if n != CLOSE_SIZE:
            raise MalformedMessage(f"CLOSE is {n} bytes, must be {CLOSE_SIZE}", msg_id, opcode)
        return CloseRequest(msg_id, object_id)
    raise MalformedMessage(f"unknown opcode {opcode}", msg_id, opcode)


def _open_fd(buf: bytes) -> int | None:
    """The anon fd of an OPEN if the bytes reach it (so a broken OPEN does not leak it)."""
    if len(buf) >= HEADER_SIZE + 12:
        return struct.unpack_from("<I", buf, HEADER_SIZE + 8)[0]
    return None


def _parse_open(buf: bytes, msg_id: int, object_id: int) -> OpenRequest:
    n = len(buf)
    if n < OPEN_FIXED_SIZE:
        raise MalformedMessage(f"OPEN is {n} bytes, shorter than its fixed part ({OPEN_FIXED_SIZE})",
                               msg_id, OP_OPEN, _open_fd(buf))
    vsize, csize, fd, flags = _OPEN.unpack_from(buf, HEADER_SIZE)
    if OPEN_FIXED_SIZE + vsize + csize != n:
        raise MalformedMessage(
            f"OPEN keys ({vsize}+{csize} bytes) do not fill the {n - OPEN_FIXED_SIZE} bytes after "
            "the fixed part", msg_id, OP_OPEN, fd)
    vkey = buf[OPEN_FIXED_SIZE : OPEN_FIXED_SIZE + vsize]
    if vsize == 0 or vkey[-1] != 0:
        raise MalformedMessage("volume key is not NUL-terminated", msg_id, OP_OPEN, fd)
    if 0 in vkey[:-1]:
        raise MalformedMessage("volume key has a NUL before its end", msg_id, OP_OPEN, fd)
    ckey = buf[OPEN_FIXED_SIZE + vsize :]
    return OpenRequest(msg_id, object_id, vkey[:-1].decode("utf-8", "surrogateescape"), ckey, fd,
                       flags)


def encode_open(msg_id: int, object_id: int, volume_key: str, cookie_key: bytes, fd: int,
                flags: int = 0) -> bytes:
    vkey = volume_key.encode("utf-8", "surrogateescape") + b"\0"
    length = OPEN_FIXED_SIZE + len(vkey) + len(cookie_key)
    return (_HDR.pack(msg_id, OP_OPEN, length, object_id)
            + _OPEN.pack(len(vkey), len(cookie_key), fd, flags) + vkey + bytes(cookie_key))


def encode_read(msg_id: int, object_id: int, offset: int, length: int) -> bytes:
    return _HDR.pack(msg_id, OP_READ, READ_SIZE, object_id) + _READ.pack(offset, length)


def encode_close(msg_id: int, object_id: int) -> bytes:
    return _HDR.pack(msg_id, OP_CLOSE, CLOSE_SIZE, object_id)


def encode_message(req: Request) -> bytes:
    if isinstance(req, OpenRequest):
        return encode_open(req.msg_id, req.object_id, req.volume_key, req.cookie_key, req.fd,
                           req.flags)
    if isinstance(req, ReadRequest):
        return encode_read(req.msg_id, req.object_id, req.offset, req.length)
    return encode_close(req.msg_id, req.object_id)
