"""Blob bytes through the local Dragonfly v2 peer (dfdaemon) over its gRPC unix socket.

`DownloadTask` with `need_piece_content = true`: dfdaemon answers a range with a started
message, then WHOLE pieces (4 MiB or larger) in completion order, each carrying its bytes and a
`crc32:<decimal>` digest. We cut the wanted range out of them by piece.offset, check every
piece's CRC-32, and insist on full coverage of the range.

The channel carries `grpc.default_authority = localhost`: for a `unix:` target grpc-python puts
the socket's path, percent-encoded, into `:authority`, and dfdaemon's h2 server (tonic/hyper)
resets every such stream (`RST_STREAM`, error 1): without the option no call to a real dfdaemon
succeeds. Its reconnect backoff is capped at a few seconds, so a restarted dfdaemon is used
again soon after it is back.

Task identity: every request sets `enable_task_id_based_blob_digest` (field 30;
`blob_digest_task_id=False` turns it off): for a registry blob URL (`/v2/<name>/blobs/sha256:<hex>`)
dfdaemon then takes the blob's digest hex as the task id, whatever the registry's host name,
tag, application or piece length: every node asking for a blob joins one P2P task, also nodes
that reach the registry by other names (mirrors) and nodes using dfdaemon's HTTP proxy, whose
registry mirror does the same by default. Without it the id is sha256 over url + tag +
application (+ piece_length) + "STANDARD"; the range is never part of it. Every request for a
blob carries the same url (`url_for(blob_id)`), tag, application and piece length anyway.

One whole task per blob, first. The scheduler triggers the seed peer with the download of the
FIRST peer that registers a task, range included: a first request for 1 MiB makes the seed
fetch 1 MiB, and every later range nobody has waits ~2 s for the scheduler's "back to source",
then comes from the registry, once per node. So the first time a blob is read, this source
starts the blob's whole-task download (`DownloadTask` without a range and without content,
priority LEVEL6: the seed peer goes back to source for all of it, everyone else shares from
it) and keeps reading that stream's piece messages: they say which pieces have landed in the
local dfdaemon's storage. A read waits until the pieces under its range are local (at most
`timeout`), then asks dfdaemon for the range: served from its own storage, without another
registration at the scheduler (each costs a delay there: 30 ms and more, up to 1 s when a
host registers many peers at once). When the whole-task download fails (dfdaemon restarted,
the scheduler gone), reads ask for their ranges directly and the next read starts the
whole-task download again.

Scheduling policy ALWAYS (`Download.scheduling_policy`, field 35): dfdaemon 1.4.9+ sends a
range of <= 4 MiB, or any task of a blob <= 4 MiB, straight to the origin unless asked
ALWAYS; then small reads go through the scheduler and are shared too.

Priority (common.v2.Priority): LEVEL1 forbids the download and LEVEL2 forbids going back to
source for a task the cluster has never seen, so neither is usable here. LEVEL3..LEVEL6 all
allow back-to-source and differ in which peer the scheduler lets fetch from the origin first
(normal, weak, strong, super/seed peer). The whole-task download and on-demand reads use
LEVEL6 (dfdaemon's own default: the seed peers go back to source, then everyone shares from
them); background prefetch reads use LEVEL3 (this peer may go to the origin itself). These are
the values nydus sends in proxy mode (6 on-demand, 3 prefetch).

Errors all become SourceError naming the socket, blob and range: an origin failure comes back
from dfdaemon as INTERNAL with JSON `{message, header, status_code}` in the
`grpc-status-details-bin` trailer (tonic's Status::with_details); its status code and message
are put in the error text. No retries here: the caller decides (e.g. fall back to the registry).

We always read a stream to its end, even once the range is covered: cancelling a DownloadTask
stream makes dfdaemon's sender fail, which it treats as a failed download.

Piece cache: dfdaemon answers any range with the WHOLE pieces around it (4 MiB or more), so a
reader going through a blob in 1 MiB windows would otherwise receive every piece four times
over. The verified pieces a response delivers are kept in a small per-source LRU cache
(`piece_cache_bytes`, 32 MiB by default, 0 turns it off; bounded by the bytes held, a piece
larger than the whole limit is not kept), keyed by the blob's task url, piece offset and length.
A range covered entirely by cached pieces is served without an RPC; a range covered in part asks
dfdaemon only for the span from its first to its last missing byte.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Awaitable, Callable, cast

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc
from google.protobuf import duration_pb2

from fetcher.source import SourceError, check_blob_id
from fetcher.whole_download import WholeDownload, stop_whole_downloads

if TYPE_CHECKING:
    from fetcher.registry import RegistrySource

log = logging.getLogger("fscached.fetcher.dragonfly")

DEFAULT_SOCKET = "/var/run/dragonfly/dfdaemon.sock"
PRIORITY_ONDEMAND = common_pb2.LEVEL6
PRIORITY_PREFETCH = common_pb2.LEVEL3
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),  # pieces are >= 4 MiB: the 4 MiB default fails
    ("grpc.max_send_message_length", -1),
    # grpc-python sends a unix target's percent-encoded path as :authority; dfdaemon's h2 server
    # resets every such stream (RST_STREAM, error 1). Any plain host name works.
    ("grpc.default_authority", "localhost"),
    # a restarted dfdaemon is used again within seconds (grpc's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 3000),
]
SCHEDULING_ALWAYS = common_pb2.ALWAYS
# the whole-task download runs as long as the blob takes: no deadline of the read timeout's size
WHOLE_TASK_TIMEOUT = 6 * 3600.0
_HEADER_NAMES_NOT_SENT = {"range", "host", "content-length"}
DEFAULT_PIECE_CACHE_BYTES = 32 << 20


class PieceCache:
    """Whole, crc32-verified pieces of a few tasks; LRU, bounded by the bytes held.

    Keys are (url, piece offset, piece length); per url a sorted list of piece offsets finds the
    pieces around a range. Pieces of one url do not overlap (a task has one piece length), so a
    piece replacing one at the same offset drops the old one."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("piece cache size must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lru: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._offsets: dict[str, list[int]] = {}       # url -> sorted piece offsets
        self._lengths: dict[str, dict[int, int]] = {}  # url -> piece offset -> length

    def __len__(self) -> int:
        return len(self._lru)

    def put(self, url: str, offset: int, data: bytes) -> None:
        length = len(data)
        if length == 0 or length > self.max_bytes:
            return
        old = self._lengths.get(url, {}).get(offset)
        if old == length:
            self._lru.move_to_end((url, offset, length))
            return
        if old is not None:
            self._drop(url, offset, old)
        while self.bytes + length > self.max_bytes:
            (u, o, n) = next(iter(self._lru))
            self._drop(u, o, n)
        self._lengths.setdefault(url, {})[offset] = length
        bisect.insort(self._offsets.setdefault(url, []), offset)
        self._lru[(url, offset, length)] = data
        self.bytes += length

    def _drop(self, url: str, offset: int, length: int) -> None:
        data = self._lru.pop((url, offset, length))
        self.bytes -= len(data)
        offsets = self._offsets[url]
        del offsets[bisect.bisect_left(offsets, offset)]
        del self._lengths[url][offset]
        if not offsets:
            del self._offsets[url]
            del self._lengths[url]

    def copy_into(self, url: str, start: int, end: int, buf: bytearray) -> list[tuple[int, int]]:
        """Copy the cached bytes of [start, end) of `url` into buf (buf[0] is byte `start`);
        returns the spans copied. The pieces used become the most recently used."""
        offsets = self._offsets.get(url)
        if not offsets:
            return []
        lengths = self._lengths[url]
        covered: list[tuple[int, int]] = []
        i = max(bisect.bisect_right(offsets, start) - 1, 0)
        while i < len(offsets) and offsets[i] < end:
            off = offsets[i]
            n = lengths[off]
            lo, hi = max(start, off), min(end, off + n)
            if lo < hi:
                data = self._lru[(url, off, n)]
                self._lru.move_to_end((url, off, n))
                buf[lo - start:hi - start] = memoryview(data)[lo - off:hi - off]
                covered.append((lo, hi))
            i += 1
        return covered


class _WholeTask(WholeDownload):
    """This node's whole-task download of one blob: one DownloadTask without a range or content,
    read to its end in the background; its piece messages say which pieces are in the local
    dfdaemon's storage."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.task_id = ""
        self.piece_length = 0
        self.local: set[int] = set()

    @property
    def alive(self) -> bool:
        return self.error is None

    def pieces_of(self, start: int, end: int) -> range | None:
        """The piece numbers under [start, end) once the piece length is known."""
        if not self.piece_length:
            return None
        return range(start // self.piece_length, (end - 1) // self.piece_length + 1)

    def holds(self, start: int, end: int) -> bool:
        if self.finished or (self.content_length is not None and end > self.content_length):
            return True  # all there, or never: the read past the end is refused by the caller
        numbers = self.pieces_of(start, end)
        return numbers is not None and all(n in self.local for n in numbers)

    async def wait_local(self, start: int, end: int, deadline: float) -> bool:
        """True once the pieces under [start, end) are local; False when the download failed
        first; TimeoutError at `deadline` (time.monotonic())."""
        while True:
            if self.holds(start, end):
                return True
            if self.error is not None:
                return False
            await self.next_change(deadline)

    def progress(self) -> str:
        if self.content_length is None or not self.piece_length:
            return "not started yet"
        count = -(-self.content_length // self.piece_length)
        return f"{len(self.local)} of {count} pieces local after {time.monotonic() - self.started_at:.1f} s"


class DragonflyGrpcSource:
    """BlobSource reading through the local dfdaemon's DfdaemonDownload.DownloadTask."""

    def __init__(
        self,
        socket_path: str,
        url_for: Callable[[str], str],
        headers: Callable[[], Awaitable[dict[str, str]]] | None = None,
        *,
        tag: str = "",
        application: str = "fscached",
        piece_length: int | None = None,
        timeout: float = 60.0,
        priority_ondemand: int = PRIORITY_ONDEMAND,
        priority_prefetch: int = PRIORITY_PREFETCH,
        filtered_query_params: list[str] | None = None,
        piece_cache_bytes: int = DEFAULT_PIECE_CACHE_BYTES,
        piece_cache: PieceCache | None = None,
        whole_task: bool = True,
        scheduling_policy: int = SCHEDULING_ALWAYS,
        blob_digest_task_id: bool = True,
    ) -> None:
        if socket_path.startswith("unix:"):
            socket_path = socket_path[len("unix:"):]
        if not socket_path:
            raise ValueError("socket_path is empty")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if piece_length is not None and piece_length <= 0:
            raise ValueError("piece_length must be > 0")
        if piece_cache_bytes < 0:
            raise ValueError("piece_cache_bytes must be >= 0")
        for p in (priority_ondemand, priority_prefetch):
            if p not in common_pb2.Priority.values():
                raise ValueError(f"priority must be a common.v2.Priority level 0..6, not {p!r}")
        if scheduling_policy not in common_pb2.SchedulingPolicy.values():
            raise ValueError(f"scheduling_policy must be AUTO or ALWAYS, not {scheduling_policy!r}")
        # checked to be levels of the enums just above (whose values are plain ints at run time)
        self.priority_ondemand = cast(common_pb2.Priority, priority_ondemand)
        self.priority_prefetch = cast(common_pb2.Priority, priority_prefetch)
        self.scheduling_policy = cast(common_pb2.SchedulingPolicy, scheduling_policy)
        self.socket_path = socket_path
        self.name = f"dragonfly {socket_path}"
        self.url_for = url_for
        self.headers = headers
        self.tag = tag
        self.application = application
        self.piece_length = piece_length
        self.timeout = timeout
        self.filtered_query_params = list(filtered_query_params or [])
        self.whole_task = whole_task
        self.blob_digest_task_id = blob_digest_task_id
        self._channel: grpc.aio.Channel | None = None
        self._stub: dfdaemon_pb2_grpc.DfdaemonDownloadStub | None = None
        self._whole: dict[str, _WholeTask] = {}  # url -> this node's whole-task download
        self._prefetch_asked: set[str] = set()  # whole_task=False: urls asked with prefetch=true
        self._closed = False
        # one cache may serve every source of the same dfdaemon (keys carry the task url)
        self.piece_cache = piece_cache if piece_cache is not None else PieceCache(piece_cache_bytes)
        # url -> [(start, end, done)]: spans an RPC in flight will bring (whole pieces once the
        # piece length is known), so a concurrent read of the same pieces waits instead of
        # asking dfdaemon for them again
        self._inflight: dict[str, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._piece_length: dict[str, int] = {}
        self.stats = {"requests": 0, "pieces": 0, "bytes_received": 0, "errors": 0,
                      "piece_cache_hits": 0, "piece_cache_joined": 0, "piece_cache_misses": 0,
                      "whole_tasks": 0, "whole_tasks_failed": 0, "waited_for_pieces": 0}
        self.task_ids: dict[str, str] = {}  # blob url -> dfdaemon's task id (what it answered)

    def __repr__(self) -> str:
        return f"DragonflyGrpcSource(unix:{self.socket_path}, application={self.application!r})"

    def _get_stub(self) -> dfdaemon_pb2_grpc.DfdaemonDownloadStub:
        if self._closed:
            raise SourceError(f"{self.name}: source is closed")
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(f"unix:{self.socket_path}", options=_CHANNEL_OPTIONS)
            self._stub = dfdaemon_pb2_grpc.DfdaemonDownloadStub(self._channel)
        return self._stub

    async def close(self) -> None:
        self._closed = True
        await stop_whole_downloads(self._whole)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> DragonflyGrpcSource:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _new_download(self, url: str, request_header: dict[str, str], priority: common_pb2.Priority,
                      timeout: float) -> common_pb2.Download:
        download = common_pb2.Download(
            url=url,
            type=common_pb2.STANDARD,
            application=self.application,
            priority=priority,
            request_header=request_header,
            filtered_query_params=self.filtered_query_params,
            scheduling_policy=self.scheduling_policy,
            enable_task_id_based_blob_digest=self.blob_digest_task_id,
            timeout=duration_pb2.Duration(seconds=int(timeout), nanos=int((timeout % 1) * 1e9)),
        )
        if self.tag:
            download.tag = self.tag
        if self.piece_length is not None:
            download.piece_length = self.piece_length
        return download

    # -- the whole-task download -------------------------------------------------------------
    def _whole_task(self, url: str, request_header: dict[str, str]) -> _WholeTask:
        """The blob's whole-task download: the running one, or a new one when there is none
        (or the last one failed)."""
        whole = self._whole.get(url)
        if whole is not None and whole.alive:
            return whole
        whole = self._whole[url] = _WholeTask(url)
        download = self._new_download(url, request_header, self.priority_ondemand, WHOLE_TASK_TIMEOUT)
        self.stats["whole_tasks"] += 1
        whole.runner = asyncio.get_running_loop().create_task(self._run_whole(whole, download),
                                                              name=f"{self.name} whole task {url}")
        return whole

    async def _run_whole(self, whole: _WholeTask, download: common_pb2.Download) -> None:
        what = f"{self.name}: whole-task download of {whole.url}"
        try:
            call = self._get_stub().DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download),
                                                 timeout=WHOLE_TASK_TIMEOUT)
            async for resp in call:
                kind = resp.WhichOneof("response")
                if kind == "download_task_started_response":
                    started = resp.download_task_started_response
                    whole.task_id = resp.task_id
                    self.task_ids[whole.url] = resp.task_id
                    whole.content_length = started.content_length
                    for piece in started.pieces:  # the real dfdaemon lists every piece of the task
                        if piece.number:
                            whole.piece_length = piece.offset // piece.number
                            break
                        whole.piece_length = max(whole.piece_length, piece.length)
                elif kind == "download_piece_finished_response":
                    piece = resp.download_piece_finished_response.piece
                    if piece.number:
                        whole.piece_length = piece.offset // piece.number
                    elif not whole.piece_length:
                        whole.piece_length = piece.length
                    whole.local.add(piece.number)
                else:
                    continue
                whole.changed()
            whole.finished = True
            log.debug("%s: done (%s)", what, whole.progress())
        except asyncio.CancelledError:
            whole.error = "cancelled"
            raise
        except grpc.aio.AioRpcError as exc:
            whole.error = str(self._rpc_error(exc, what))
            self.stats["whole_tasks_failed"] += 1
            log.info("%s failed (%s); reads ask for their ranges directly: %s", what, whole.progress(),
                     whole.error)
        except Exception as exc:  # never lose the reason: the reads waiting on it need to go on
            whole.error = f"{what}: {type(exc).__name__}: {exc}"
            self.stats["whole_tasks_failed"] += 1
            log.warning("%s", whole.error)
        finally:
            whole.changed()

    async def _request_header(self, what: str) -> dict[str, str]:
        """The origin's credentials for dfdaemon to send when it goes back to source."""
        if self.headers is None:
            return {}
        try:
            got = await self.headers()
        except SourceError as exc:
            raise SourceError(f"{what}: cannot get origin credentials: {exc}") from None
        return {k: v for k, v in got.items() if k.lower() not in _HEADER_NAMES_NOT_SENT}

    # -- the BlobSource method ---------------------------------------------------------------
    async def read(self, blob_id: str, offset: int, length: int, *, prefetch: bool = False) -> bytes:
        check_blob_id(blob_id)
        if offset < 0 or length < 0:
            raise SourceError(f"{self.name}: blob {blob_id}: invalid range offset={offset} length={length}")
        if length == 0:
            return b""
        what = f"{self.name}: blob {blob_id} [{offset}+{length}]"
        stub = self._get_stub()
        url = self.url_for(blob_id)
        end = offset + length
        buf = bytearray(length)
        joined = False
        started = time.monotonic()
        request_header: dict[str, str] | None = None
        while True:
            covered = self.piece_cache.copy_into(url, offset, end, buf)
            missing = _gaps(covered, offset, end)
            if not missing:
                self.stats["piece_cache_joined" if joined else "piece_cache_hits"] += 1
                log.debug("%s: from cached pieces", what)
                return bytes(buf)
            pending = [done for start, stop, done in self._inflight.get(url, ())
                       if start < missing[-1][1] and stop > missing[0][0]]
            if pending:
                joined = True
                await asyncio.wait(pending)  # their pieces land in the cache (or they failed)
                continue
            if request_header is None:
                request_header = await self._request_header(what)
            # ask only for the span from the first to the last missing byte; dfdaemon answers
            # with the whole pieces around it, which fill the cache for the next reads
            ask_start, ask_end = missing[0][0], missing[-1][1]
            if not self.whole_task:
                break
            whole = self._whole_task(url, request_header)
            if whole.content_length is not None and ask_end > whole.content_length:
                raise SourceError(f"{what}: read past end: the blob has {whole.content_length} bytes")
            if whole.holds(ask_start, ask_end):
                break
            self.stats["waited_for_pieces"] += 1
            try:
                local = await whole.wait_local(ask_start, ask_end, started + self.timeout)
            except TimeoutError:
                self.stats["errors"] += 1
                raise SourceError(f"{what}: dfdaemon did not have the pieces within {self.timeout:g}s "
                                  f"(the blob's P2P download: {whole.progress()})") from None
            if not local:
                break  # the whole-task download failed: ask for the range itself
            # local now: another read may have asked for them meanwhile, look again
        self.stats["piece_cache_misses"] += 1
        download = self._new_download(url, request_header,
                                      self.priority_prefetch if prefetch else self.priority_ondemand,
                                      self.timeout)
        download.range.CopyFrom(common_pb2.Range(start=ask_start, length=ask_end - ask_start))
        download.need_piece_content = True
        if not self.whole_task and url not in self._prefetch_asked:
            download.prefetch = True  # dfdaemon's own whole-task prefetch, with the first read
            self._prefetch_asked.add(url)
        self.stats["requests"] += 1
        piece = self._piece_length.get(url)
        span = ((ask_start // piece * piece, -(-ask_end // piece) * piece) if piece else (ask_start, ask_end))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (span[0], span[1], done)
        self._inflight.setdefault(url, []).append(entry)
        try:
            await self._download(stub, download, what, url, offset, buf, covered)
        except BaseException:
            self.stats["errors"] += 1
            if download.prefetch:
                self._prefetch_asked.discard(url)  # the next read asks again
            raise
        finally:
            done.set_result(None)
            spans = self._inflight.get(url, [])
            spans.remove(entry)
            if not spans:
                self._inflight.pop(url, None)
        log.debug("%s: %d bytes (%d asked for) in %.3fs", what, length, ask_end - ask_start,
                  time.monotonic() - started)
        return bytes(buf)

    async def _download(self, stub, download, what: str, url: str, offset: int, buf: bytearray,
                        covered: list[tuple[int, int]]) -> None:
        """Fill buf (the range [offset, offset + len(buf))) from one DownloadTask stream; `covered`
        lists the spans already filled (from the cache) and grows with every piece."""
        end = offset + len(buf)
        ask_end = download.range.start + download.range.length
        seen: set[int] = set()
        got_started = False
        call = stub.DownloadTask(dfdaemon_pb2.DownloadTaskRequest(download=download), timeout=self.timeout)
        try:
            async for resp in call:
                kind = resp.WhichOneof("response")
                if kind == "download_task_started_response":
                    got_started = True
                    total = resp.download_task_started_response.content_length
                    if ask_end > total:
                        raise SourceError(f"{what}: read past end: the blob has {total} bytes")
                    continue
                if kind != "download_piece_finished_response":
                    continue
                piece = resp.download_piece_finished_response.piece
                self._take_piece(piece, what, url, offset, end, buf, covered, seen)
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_error(exc, what) from None
        except asyncio.CancelledError:
            call.cancel()
            raise
        except SourceError:
            call.cancel()
            raise
        if not got_started:
            raise SourceError(f"{what}: dfdaemon ended the stream without a started message")
        missing = _gaps(covered, offset, end)
        if missing:
            holes = ", ".join(f"{a}-{b}" for a, b in missing[:4])
            raise SourceError(f"{what}: dfdaemon's pieces do not cover the range (missing bytes {holes}"
                              f"{', ...' if len(missing) > 4 else ''})")

    def _take_piece(self, piece, what: str, url: str, offset: int, end: int, buf: bytearray,
                    covered: list[tuple[int, int]], seen: set[int]) -> None:
        name = f"piece {piece.number} (bytes {piece.offset}+{piece.length})"
        if not piece.HasField("content"):
            raise SourceError(f"{what}: {name} came without content (need_piece_content ignored?)")
        content = piece.content
        if len(content) != piece.length:
            raise SourceError(f"{what}: {name} carries {len(content)} bytes, not {piece.length}")
        algo, _, value = piece.digest.partition(":")
        if algo.lower() != "crc32" or not value:
            raise SourceError(f"{what}: {name} has a digest {piece.digest[:80]!r} that is not crc32:<decimal>")
        try:
            expected = int(value)
        except ValueError:
            raise SourceError(f"{what}: {name} has a malformed digest {piece.digest[:80]!r}") from None
        actual = zlib.crc32(content)
        if actual != expected:
            raise SourceError(f"{what}: {name} failed its digest: crc32 {actual}, dfdaemon said {expected}")
        self.stats["pieces"] += 1
        self.stats["bytes_received"] += len(content)
        if piece.number in seen:
            return
        seen.add(piece.number)
        self.piece_cache.put(url, piece.offset, content)  # verified: kept for the next ranges
        # the task's piece length: piece n starts at n * length (piece 0 alone: at least its size)
        self._piece_length[url] = piece.offset // piece.number if piece.number else max(
            piece.length, self._piece_length.get(url, 0))
        lo, hi = max(offset, piece.offset), min(end, piece.offset + piece.length)
        if lo >= hi:
            return  # a piece outside the range: harmless
        buf[lo - offset:hi - offset] = memoryview(content)[lo - piece.offset:hi - piece.offset]
        covered.append((lo, hi))

    def _rpc_error(self, exc: grpc.aio.AioRpcError, what: str) -> SourceError:
        code = exc.code()
        details = (exc.details() or "").strip()
        origin = _origin_details(exc)
        if origin is not None:
            status = origin.get("status_code")
            message = str(origin.get("message") or details)[:500]
            if status:
                return SourceError(f"{what}: origin answered HTTP {status} (via dfdaemon): {message}")
            return SourceError(f"{what}: dfdaemon could not fetch from the origin: {message}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return SourceError(f"{what}: dfdaemon timed out after {self.timeout:g}s")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return SourceError(f"{what}: dfdaemon is overloaded / rate limiting (RESOURCE_EXHAUSTED): {details}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return SourceError(f"{what}: dfdaemon unavailable (UNAVAILABLE): {details}")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return SourceError(f"{what}: dfdaemon refused the download (PERMISSION_DENIED): {details}")
        return SourceError(f"{what}: dfdaemon answered {code.name}: {details[:500]}")


def _origin_details(exc: grpc.aio.AioRpcError) -> dict | None:
    """dfdaemon's backend error: JSON {message, header, status_code} in grpc-status-details-bin."""
    try:
        trailers = exc.trailing_metadata() or ()
    except Exception:
        return None
    for key, value in trailers:
        if key != "grpc-status-details-bin":
            continue
        if isinstance(value, str):
            value = value.encode("latin-1", "replace")
        try:
            parsed = json.loads(value)
        except (ValueError, UnicodeDecodeError):
            return None  # some other encoding (e.g. a google.rpc.Status): keep the plain message
        return parsed if isinstance(parsed, dict) else None
    return None


def _gaps(covered: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    gaps, pos = [], start
    for lo, hi in sorted(covered):
        if lo > pos:
            gaps.append((pos, lo))
        pos = max(pos, hi)
    if pos < end:
        gaps.append((pos, end))
    return gaps


def dragonfly_for_registry(registry: RegistrySource, socket_path: str = DEFAULT_SOCKET,
                           **kw) -> DragonflyGrpcSource:
    """A DragonflyGrpcSource for the blobs of `registry`: the registry's own blob URLs (so the
    task id is the one every peer pulling that blob uses) and its Authorization, which dfdaemon
    sends to the registry when it goes back to source."""
    return DragonflyGrpcSource(socket_path, registry.blob_url, registry.auth_headers, **kw)
