"""cachefiles.messages: strict parsing of the kernel's on-demand messages."""
import struct

import pytest
from hypothesis import given, strategies as st

from cachefiles.messages import (
    CloseRequest,
    MalformedMessage,
    OP_OPEN,
    OP_READ,
    OpenRequest,
    ReadRequest,
    encode_close,
    encode_message,
    encode_open,
    encode_read,
    parse_message,
)


def test_open_roundtrip_matches_kernel_layout():
    raw = encode_open(7, 3, "erofs,img", b"blob\x00\xff", fd=42)
    # hand-built like cachefiles_ondemand_init_open_req
    vkey = b"erofs,img\0"
    body = struct.pack("<IIII", len(vkey), 6, 42, 0) + vkey + b"blob\x00\xff"
    assert raw == struct.pack("<IIII", 7, 0, 16 + len(body), 3) + body
    assert parse_message(raw) == OpenRequest(7, 3, "erofs,img", b"blob\x00\xff", 42, 0)


def test_read_and_close():
    assert parse_message(encode_read(9, 4, 1 << 40, 131072)) == ReadRequest(9, 4, 1 << 40, 131072)
    assert parse_message(encode_close(10, 4)) == CloseRequest(10, 4)


def test_empty_cookie_key_is_valid():
    assert parse_message(encode_open(1, 1, "v", b"", 5)).cookie_key == b""


@pytest.mark.parametrize("n", [0, 3, 4, 8, 15])
def test_short_header(n):
    raw = encode_read(5, 1, 0, 4096)[:n]
    with pytest.raises(MalformedMessage) as e:
        parse_message(raw)
    assert "short header" in e.value.reason
    assert e.value.msg_id == (5 if n >= 4 else None)
    assert e.value.opcode == (OP_READ if n >= 8 else None)


def test_len_mismatch_read_keeps_msg_id_for_completion():
    raw = encode_read(5, 1, 0, 4096) + b"x"
    with pytest.raises(MalformedMessage) as e:
        parse_message(raw)
    assert (e.value.msg_id, e.value.opcode, e.value.fd) == (5, OP_READ, None)


def test_read_with_wrong_body_size():
    raw = struct.pack("<IIII", 5, OP_READ, 24, 1) + b"\0" * 8
    with pytest.raises(MalformedMessage):
        parse_message(raw)


def test_close_with_body():
    raw = struct.pack("<IIII", 5, 1, 20, 1) + b"\0" * 4
    with pytest.raises(MalformedMessage):
        parse_message(raw)


def test_len_mismatch_open_reports_fd_so_it_can_be_closed():
    raw = encode_open(8, 2, "erofs,a", b"k", 33)
    with pytest.raises(MalformedMessage) as e:
        parse_message(raw[:-1])
    assert (e.value.msg_id, e.value.opcode, e.value.fd) == (8, OP_OPEN, 33)


def test_truncated_open_keys():
    raw = bytearray(encode_open(8, 2, "erofs,a", b"cookie", 33))
    # cookie_key_size claims more than the message carries (len field consistent)
    struct.pack_into("<I", raw, 20, 100)
    with pytest.raises(MalformedMessage) as e:
        parse_message(bytes(raw))
    assert e.value.fd == 33 and "do not fill" in e.value.reason


def test_open_shorter_than_fixed_part():
    raw = struct.pack("<IIII", 8, OP_OPEN, 28, 2) + struct.pack("<III", 0, 0, 44)
    with pytest.raises(MalformedMessage) as e:
        parse_message(raw)
    assert e.value.fd == 44 and e.value.msg_id == 8


def test_volume_key_without_nul():
    vkey = b"erofs,a"
    body = struct.pack("<IIII", len(vkey), 1, 12, 0) + vkey + b"k"
    raw = struct.pack("<IIII", 1, OP_OPEN, 16 + len(body), 2) + body
    with pytest.raises(MalformedMessage) as e:
        parse_message(raw)
    assert "NUL" in e.value.reason and e.value.fd == 12


def test_empty_volume_key():
    body = struct.pack("<IIII", 0, 1, 12, 0) + b"k"
    raw = struct.pack("<IIII", 1, OP_OPEN, 16 + len(body), 2) + body
    with pytest.raises(MalformedMessage):
        parse_message(raw)


def test_unknown_opcode():
    raw = struct.pack("<IIII", 3, 9, 16, 1)
    with pytest.raises(MalformedMessage) as e:
        parse_message(raw)
    assert e.value.opcode == 9 and e.value.msg_id == 3 and "unknown opcode" in str(e.value)


def test_non_utf8_volume_key_is_lossless():
    req = parse_message(encode_open(1, 1, b"erofs,\xff".decode("utf-8", "surrogateescape"), b"", 3))
    assert req.volume_key.encode("utf-8", "surrogateescape") == b"erofs,\xff"


@given(st.binary(max_size=80))
def test_fuzz_never_crashes(raw):
    try:
        req = parse_message(raw)
    except MalformedMessage:
        return
    assert encode_message(req) == raw
