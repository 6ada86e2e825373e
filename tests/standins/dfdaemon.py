"""A stand-in Dragonfly v2 dfdaemon: `dfdaemon.v2.DfdaemonDownload/DownloadTask` on a unix socket.

ONLY for what the real dfdaemon (dragonfly-client, which the tests run: coldstart/dragonfly.py)
cannot be made to do: send damaged pieces (with a wrong or a matching CRC), hang or die
mid-stream on cue, refuse for overload; and for the VM tests, whose guest has no scheduler.
Everything a real peer does is tested against the real one (tests/fetcher/test_dragonfly_grpc.py,
tests/dragonfly/); test_the_standin_answers_like_the_real_dfdaemon checks that this one still
answers the same requests the same ways.

Behaves like the real peer daemon as far as a client can tell (see shared docs/dragonfly.md):
- fetches from the origin by HTTP with the request's url and request_header (so registry auth
  reaches the registry), one ranged GET per piece; pieces are `piece_length` when the request
  sets it, else Dragonfly's rule (next power of two of content_length / 500, clamped to
  [4 MiB, 64 MiB]: 4 MiB for anything under 2 GiB);
- answers a range with `download_task_started_response` first, then one
  `download_piece_finished_response` per WHOLE piece overlapping the range, in shuffled
  (completion-like) order, each with number/offset/length/`crc32:<decimal>` digest, and the
  bytes when need_piece_content;
- task id = sha256 over url (filtered query params removed) + tag + application
  (+ str(piece_length) when set) + "STANDARD"; the range is not part of it;
- caches pieces per task id: a later range of the same task is served without going back to
  the origin (each piece is fetched at most once, concurrent requests share the fetch);
- `prefetch = true` pulls the whole task into the cache in the background;
- errors: INVALID_ARGUMENT (no download / no url), INTERNAL "invalid parameter" (a range
  outside the content: what dfdaemon 1.5 answers), INTERNAL when the origin answers >= 400 or
  cannot be reached. Like dfdaemon
  (tonic's `Status::with_details`), the origin's error travels as JSON
  `{"message", "header", "status_code"}` in the `grpc-status-details-bin` trailing metadata
  (raw JSON bytes, not a google.rpc.Status), with the status message as the human text.

Everything requested is recorded in `handle.requests` (dicts: task_id, url, range, priority,
prefetch, headers, ...), origin traffic in `handle.origin_log` and `handle.origin_fetches`.

Fault knobs (`Faults`, settable on a running handle via `handle.faults`): kill the stream
after N pieces (abort with UNAVAILABLE, stop the whole server, or hang silently), corrupt
pieces (with the digest of the original bytes, i.e. wrong, or of the corrupted ones), a delay
before each piece, RESOURCE_EXHAUSTED for the first N calls.

A synchronous grpc server (its own thread pool), so it can run beside a grpc.aio client in
the same process without sharing an event loop:

    handle = start_standin("/tmp/df.sock")      # from pytest
    ...; handle.stop()

    python -m tests.standins.dfdaemon --socket /run/df.sock   # a process, until SIGTERM
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field

import grpc
from dragonfly_api import common_pb2, dfdaemon_pb2, dfdaemon_pb2_grpc

log = logging.getLogger("standin.dfdaemon")

MIN_PIECE = 4 << 20
MAX_PIECE = 64 << 20
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


def default_piece_length(content_length: int) -> int:
    """Dragonfly's rule: next power of two of content_length / 500, clamped to [4, 64] MiB."""
    want = max(1, content_length // 500)
    p = 1 << (want - 1).bit_length()
    return max(MIN_PIECE, min(MAX_PIECE, p))


def filter_query(url: str, filtered: list[str] | tuple[str, ...]) -> str:
    if not filtered:
        return url
    parts = urllib.parse.urlsplit(url)
    keep = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k not in set(filtered)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(keep)))


def task_id_for(url: str, tag: str = "", application: str = "", piece_length: int | None = None,
                filtered_query_params: list[str] | tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    h.update(filter_query(url, filtered_query_params).encode())
    h.update(tag.encode())
    h.update(application.encode())
    if piece_length is not None:
        h.update(str(piece_length).encode())
    h.update(b"STANDARD")
    return h.hexdigest()


def crc32_digest(data: bytes) -> str:
    return f"crc32:{zlib.crc32(data)}"


@dataclass
class Faults:
    kill_after_pieces: int | None = None  # after sending N pieces of a stream...
    kill_mode: str = "abort"              # ...abort it (UNAVAILABLE) | "stop" the server | "hang"
    corrupt_pieces: set[int] = field(default_factory=set)  # piece numbers sent damaged
    corrupt_digest: str = "wrong"         # "wrong": digest of the real bytes; "matching": of the damaged
    delay: float = 0.0                    # seconds before each piece message
    resource_exhausted: int = 0           # the first N calls answer RESOURCE_EXHAUSTED


class OriginError(Exception):
    def __init__(self, status_code: int | None, message: str, header: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.header = header or {}


class _Task:
    def __init__(self, task_id: str, url: str, headers: dict[str, str]) -> None:
        self.id = task_id
        self.url = url
        self.headers = dict(headers)
        self.content_length: int | None = None
        self.piece_length: int | None = None
        self.pieces: dict[int, concurrent.futures.Future] = {}
        self.lock = threading.Lock()


class _Servicer(dfdaemon_pb2_grpc.DfdaemonDownloadServicer):
    def __init__(self, handle: StandinHandle) -> None:
        self.h = handle

    # -- origin ------------------------------------------------------------------------------
    def _origin(self, method: str, url: str, headers: dict[str, str], rng: tuple[int, int] | None,
                task_id: str, what) -> tuple[int, dict[str, str], bytes]:
        hdrs = {k: v for k, v in headers.items() if k.lower() not in ("range", "host")}
        if rng is not None:
            hdrs["Range"] = f"bytes={rng[0]}-{rng[1]}"
        req = urllib.request.Request(url, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=self.h.origin_timeout) as resp:
                body = resp.read() if method == "GET" else b""
                status, rh = resp.status, {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as exc:
            body = b""
            try:
                body = exc.read()[:1024]
            except Exception:
                pass
            status = exc.code
            self.h._log_origin(task_id, what, method, hdrs, status)
            msg = f"{exc.code} {exc.reason}"
            if body:
                msg += ": " + body.decode("utf-8", "replace").strip()
            raise OriginError(exc.code, msg, {k.lower(): v for k, v in exc.headers.items()}) from None
        except (OSError, ValueError) as exc:
            self.h._log_origin(task_id, what, method, hdrs, None)
            raise OriginError(None, f"origin unreachable: {exc}") from None
        self.h._log_origin(task_id, what, method, hdrs, status)
        return status, rh, body

    def _stat(self, task: _Task) -> int:
        with task.lock:
            if task.content_length is not None:
                return task.content_length
        _, rh, _ = self._origin("HEAD", task.url, task.headers, None, task.id, "stat")
        try:
            n = int(rh["content-length"])
        except (KeyError, ValueError):
            raise OriginError(None, "origin sent no Content-Length") from None
        with task.lock:
            task.content_length = n
        return n

    def _fetch_piece(self, task: _Task, number: int) -> bytes:
        start = number * task.piece_length
        end = min(task.content_length, start + task.piece_length) - 1
        status, rh, body = self._origin("GET", task.url, task.headers, (start, end), task.id, number)
        if status == 206:
            m = _CONTENT_RANGE.match(rh.get("content-range", ""))
            if not m or int(m.group(1)) != start:
                raise OriginError(None, f"origin sent Content-Range {rh.get('content-range')!r} for {start}-{end}")
        elif status == 200:
            body = body[start:end + 1]
        if len(body) != end - start + 1:
            raise OriginError(None, f"origin sent {len(body)} bytes for piece {number}, wanted {end - start + 1}")
        with self.h._lock:
            self.h.origin_fetches[(task.id, number)] = self.h.origin_fetches.get((task.id, number), 0) + 1
        return body

    def _piece(self, task: _Task, number: int) -> bytes:
        """The piece's bytes, fetching from the origin at most once per task."""
        with task.lock:
            fut = task.pieces.get(number)
            owner = fut is None
            if owner:
                fut = task.pieces[number] = concurrent.futures.Future()
        if owner:
            try:
                fut.set_result(self._fetch_piece(task, number))
            except BaseException as exc:
                with task.lock:
                    task.pieces.pop(number, None)  # a failed fetch is not cached
                fut.set_exception(exc)
        return fut.result()

    def _prefetch(self, task: _Task) -> None:
        try:
            count = -(-task.content_length // task.piece_length)
            for n in range(count):
                if self.h._stopping.is_set():
                    return
                self._piece(task, n)
        except Exception as exc:
            log.info("prefetch of task %s failed: %s", task.id, exc)

    # -- the rpc -----------------------------------------------------------------------------
    def DownloadTask(self, request, context):
        h = self.h
        with h._lock:
            h.calls += 1
            call_no = h.calls
            faults = h.faults
        if not request.HasField("download") or not request.download.url:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing download")
        d = request.download
        piece_length = d.piece_length if d.HasField("piece_length") else None
        tag = d.tag if d.HasField("tag") else ""
        app = d.application if d.HasField("application") else ""
        task_id = task_id_for(d.url, tag, app, piece_length, list(d.filtered_query_params))
        rng = (d.range.start, d.range.length) if d.HasField("range") else None
        with h._lock:
            h.requests.append({
                "task_id": task_id, "url": d.url, "range": rng, "priority": d.priority,
                "prefetch": d.prefetch, "is_prefetch": d.is_prefetch, "headers": dict(d.request_header),
                "tag": tag, "application": app, "piece_length": piece_length,
                "need_piece_content": d.need_piece_content, "scheduling_policy": d.scheduling_policy,
            })
        if call_no <= faults.resource_exhausted:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limited by the stand-in dfdaemon")
        if piece_length is not None and piece_length < MIN_PIECE and not h.allow_small_pieces:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"piece length {piece_length} < {MIN_PIECE}")

        with h._lock:
            task = h._tasks.get(task_id)
            if task is None:
                task = h._tasks[task_id] = _Task(task_id, d.url, dict(d.request_header))
            else:
                task.headers = dict(d.request_header)  # freshest credentials win
        try:
            content_length = self._stat(task)
        except OriginError as exc:
            self._abort_origin(context, exc)
        with task.lock:
            if task.piece_length is None:
                task.piece_length = piece_length or default_piece_length(content_length)
        pl = task.piece_length

        if rng is None:
            start, length = 0, content_length
        else:
            start, length = rng
            if length == 0 or start + length > content_length:
                context.abort(grpc.StatusCode.INTERNAL, "invalid parameter")  # as dfdaemon 1.5 answers
        if length == 0:
            numbers = []
        else:
            numbers = list(range(start // pl, (start + length - 1) // pl + 1))
        h.rng.shuffle(numbers)

        if d.prefetch and rng is not None and h.honour_prefetch:
            threading.Thread(target=self._prefetch, args=(task,), daemon=True,
                             name=f"prefetch-{task_id[:8]}").start()

        common = {"host_id": h.host_id, "task_id": task_id, "peer_id": f"{h.host_id}-{uuid.uuid4()}"}
        yield dfdaemon_pb2.DownloadTaskResponse(
            **common,
            download_task_started_response=dfdaemon_pb2.DownloadTaskStartedResponse(
                content_length=content_length,
                range=common_pb2.Range(start=start, length=length) if rng is not None else None,
                is_finished=False))

        sent = 0
        for number in numbers:
            if faults.kill_after_pieces is not None and sent >= faults.kill_after_pieces:
                self._kill(context, faults.kill_mode)
                return
            if faults.delay:
                if h._stopping.wait(faults.delay):
                    return
            try:
                data = self._piece(task, number)
            except OriginError as exc:
                self._abort_origin(context, exc)
            digest = crc32_digest(data)
            if number in faults.corrupt_pieces:
                damaged = bytearray(data)
                damaged[len(damaged) // 2] ^= 0xFF
                data = bytes(damaged)
                if faults.corrupt_digest == "matching":
                    digest = crc32_digest(data)
            piece = common_pb2.Piece(number=number, offset=number * pl, length=len(data), digest=digest,
                                     traffic_type=common_pb2.BACK_TO_SOURCE)
            if d.need_piece_content:
                piece.content = data
            yield dfdaemon_pb2.DownloadTaskResponse(
                **common,
                download_piece_finished_response=dfdaemon_pb2.DownloadPieceFinishedResponse(piece=piece))
            sent += 1

    def _kill(self, context, mode: str) -> None:
        h = self.h
        if mode == "stop":
            log.info("fault: stopping the server mid-stream")
            h._server.stop(0)
            return
        if mode == "hang":
            log.info("fault: hanging mid-stream")
            while context.is_active() and not h._stopping.wait(0.05):
                pass
            return
        context.abort(grpc.StatusCode.UNAVAILABLE, "stand-in dfdaemon killed mid-stream")

    @staticmethod
    def _abort_origin(context, exc: OriginError) -> None:
        details = json.dumps({"message": exc.message, "header": exc.header,
                              "status_code": exc.status_code}).encode()
        context.set_trailing_metadata((("grpc-status-details-bin", details),))
        what = f"HTTP {exc.status_code}" if exc.status_code is not None else "error"
        context.abort(grpc.StatusCode.INTERNAL, f"backend error: origin {what}: {exc.message}"[:2000])


class StandinHandle:
    def __init__(self, socket_path: str, faults: Faults | None = None, *, honour_prefetch: bool = True,
                 origin_timeout: float = 30.0, seed: int | None = None, allow_small_pieces: bool = True,
                 max_workers: int = 16) -> None:
        self.socket_path = str(socket_path)
        self.address = f"unix:{self.socket_path}"
        self.faults = faults or Faults()
        self.honour_prefetch = honour_prefetch
        self.origin_timeout = origin_timeout
        self.allow_small_pieces = allow_small_pieces  # real dfdaemon wants >= 4 MiB; tests may go smaller
        self.rng = random.Random(seed)
        self.host_id = f"standin-{os.getpid()}"
        self.requests: list[dict] = []
        self.origin_log: list[dict] = []
        self.origin_fetches: dict[tuple[str, int], int] = {}
        self.calls = 0
        self._tasks: dict[str, _Task] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers,
                                                                         thread_name_prefix="standin-df"),
                                   options=[("grpc.max_send_message_length", -1),
                                            ("grpc.max_receive_message_length", -1)])
        dfdaemon_pb2_grpc.add_DfdaemonDownloadServicer_to_server(_Servicer(self), self._server)
        self.health = None
        try:
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        except ImportError:
            pass
        else:
            self.health = health.HealthServicer()
            self.health.set("", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)

    def _log_origin(self, task_id: str, what, method: str, headers: dict[str, str], status: int | None) -> None:
        with self._lock:
            self.origin_log.append({"task_id": task_id, "what": what, "method": method,
                                    "headers": dict(headers), "status": status})

    def start(self) -> StandinHandle:
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        if self._server.add_insecure_port(self.address) == 0:
            raise RuntimeError(f"stand-in dfdaemon cannot listen on {self.address}")
        self._server.start()
        return self

    def stop(self, grace: float | None = 0) -> None:
        self._stopping.set()
        self._server.stop(grace).wait(10)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def origin_fetch_count(self, task_id: str | None = None) -> int:
        with self._lock:
            return sum(n for (t, _), n in self.origin_fetches.items() if task_id is None or t == task_id)

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.origin_log.clear()

    def __enter__(self) -> StandinHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_standin(socket_path: str, faults: Faults | None = None, **kw) -> StandinHandle:
    """Serve a stand-in dfdaemon on `unix:<socket_path>`; returns once listening."""
    return StandinHandle(socket_path, faults, **kw).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.standins.dfdaemon",
                                 description="stand-in Dragonfly dfdaemon (DownloadTask) on a unix socket")
    ap.add_argument("--socket", required=True, help="unix socket path to listen on")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before each piece")
    ap.add_argument("--kill-after-pieces", type=int, default=None)
    ap.add_argument("--kill-mode", choices=("abort", "stop", "hang"), default="abort")
    ap.add_argument("--resource-exhausted", type=int, default=0, help="first N calls are rate limited")
    ap.add_argument("--no-prefetch", action="store_true", help="ignore prefetch=true")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    faults = Faults(kill_after_pieces=args.kill_after_pieces, kill_mode=args.kill_mode, delay=args.delay,
                    resource_exhausted=args.resource_exhausted)
    handle = start_standin(args.socket, faults, honour_prefetch=not args.no_prefetch)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"stand-in dfdaemon listening on {handle.address}", flush=True)
    while not done.wait(1.0):
        pass
    handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
