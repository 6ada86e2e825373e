"""The bytes asked for, out of the answer to a ranged blob GET (`Range: bytes=A-B`).

The one reader of those answers: RegistrySource takes every blob read through it, and so do
the sources built on it (the Dragonfly HTTP proxy). Servers answer a range three ways:

- 206 Partial Content: the Content-Range must be the one asked for and the body that long.
- 200 with just the bytes asked for (no Content-Range): some blob proxies answer so, and
  nydusd takes it. A 200 whose body is exactly the range's length is taken as the range,
  unless the read starts past byte 0 and the body is the whole blob (its sha256 is the blob
  id): then the blob ends before the range does (a read past its end).
- 200 with the whole blob (a server that ignores Range): the range is cut out of the stream,
  and the rest of the body is never read.

A 200 that is neither (its body not the range's length, and too short to hold the range) is
refused: a SourceError naming both lengths. A body cut short before the length its headers
promised raises ShortBody, which the caller may retry.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

import aiohttp

from fetcher.source import SourceError

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_READ_SIZE = 1 << 16

# how the server answered: 206; 200 with the range alone; 200 with the whole blob
BodyKind = Literal["partial", "range-only", "whole-blob"]


class ShortBody(Exception):
    """The body ended before the length its headers announced (worth another try)."""


@dataclass(frozen=True)
class RangeBody:
    data: bytes
    kind: BodyKind


async def read_range_body(resp: aiohttp.ClientResponse, blob_id: str, offset: int, length: int,
                          what: str) -> RangeBody:
    """The `length` bytes at `offset` of blob `blob_id` from `resp`, a 206 or 200 answer to
    the ranged GET of exactly those bytes. `what` starts every message ("registry X: blob Y")."""
    if resp.status == 206:
        return RangeBody(await _partial(resp, offset, length, what), "partial")
    return await _plain(resp, blob_id, offset, length, what)


async def _partial(resp: aiohttp.ClientResponse, offset: int, length: int, what: str) -> bytes:
    header = resp.headers.get("Content-Range", "")
    m = _CONTENT_RANGE.match(header)
    if not m:
        raise SourceError(f"{what}: 206 with unusable Content-Range {header[:100]!r}")
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if first != offset or last < first:
        raise SourceError(f"{what}: asked for bytes {offset}-{offset + length - 1}, got {first}-{last}")
    if last != offset + length - 1:
        size = f"the blob has {total} bytes" if total != "*" else f"the server sent only up to {last}"
        raise SourceError(f"{what}: read past end: wanted bytes {offset}..{offset + length} but {size}")
    data = await resp.read()
    if len(data) != length:
        raise ShortBody(f"{what}: short body: {len(data)} of {length} bytes")
    return data


def _neither(what: str, offset: int, length: int, body: int) -> SourceError:
    end = offset + length
    return SourceError(f"{what}: HTTP 200 with {body} bytes to a request for bytes {offset}..{end}: "
                       f"neither the {length} bytes asked for nor a whole blob holding them "
                       f"(read past end of a {body}-byte blob, or a server sending the wrong bytes)")


async def _plain(resp: aiohttp.ClientResponse, blob_id: str, offset: int, length: int,
                 what: str) -> RangeBody:
    end = offset + length
    total = resp.content_length
    if total is not None and total != length and total < end:
        resp.close()
        raise _neither(what, offset, length, total)
    # Both readings at once, until the body tells them apart: `head` holds its first `length`
    # bytes (the range, if the body is just the range), `window` its bytes offset..end (the
    # range, if the body is the whole blob). From offset 0 the two are the same bytes.
    head, window = bytearray(), bytearray()
    pos = 0
    async for chunk in resp.content.iter_chunked(_READ_SIZE):
        if pos < length:
            head += chunk[:length - pos]
        lo, hi = max(offset - pos, 0), min(end - pos, len(chunk))
        if lo < hi:
            window += chunk[lo:hi]
        pos += len(chunk)
        if pos >= end:
            break
    if pos >= end:  # the body reaches the range's end: a whole blob, or from 0 the range alone
        kind: BodyKind = "whole-blob"
        if offset == 0 and pos == length:  # which one only says how the server answers ranges
            if total == length or (total is None and not await resp.content.read(1)):
                kind = "range-only"
        resp.close()  # never read the rest of a possibly huge blob
        return RangeBody(bytes(window), kind)
    resp.close()
    if total is not None and pos < total:
        raise ShortBody(f"{what}: short body: {pos} of {total} bytes")
    if pos != length:
        raise _neither(what, offset, length, pos)
    # offset > 0 here, and the body is `length` bytes: the range, unless it is the whole blob
    if hashlib.sha256(head).hexdigest() == blob_id:
        raise SourceError(f"{what}: read past end: wanted bytes {offset}..{end} but the blob has "
                          f"{length} bytes (HTTP 200 with the whole blob)")
    return RangeBody(bytes(head), "range-only")
