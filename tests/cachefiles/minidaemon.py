"""A deliberately small daemon loop for driving the simulator in tests (not fscached's)."""
from __future__ import annotations

import errno
import os
import select
import threading

import native
from cachefiles.device import CachefilesDevice
from cachefiles.messages import CloseRequest, MalformedMessage, OpenRequest, ReadRequest
from cachefiles.objects import ObjectTable


class MiniDaemon(threading.Thread):
    """Serves `contents[cookie_key]` for OPEN/READ/CLOSE.

    mode: "aligned" (correct), "bytes" (pwrite from memory not 512-aligned: O_DIRECT refuses),
    "skip" (complete without writing), "half" (fill only the first block of each READ),
    "tail512" (pad the tail only to 512 bytes).
    """

    def __init__(self, dev: CachefilesDevice, contents: dict[bytes, bytes], mode: str = "aligned"):
        super().__init__(daemon=True)
        self.dev, self.contents, self.mode = dev, contents, mode
        self.table = ObjectTable()
        self.stop_event = threading.Event()
        self.write_errors: list[OSError] = []
        self.reads: list[ReadRequest] = []
        self.exc: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # surfaced by stop()
            self.exc = e

    def _loop(self) -> None:
        p = select.poll()
        p.register(self.dev.fileno(), select.POLLIN)
        while not self.stop_event.is_set():
            events = p.poll(20)
            if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in events):
                return
            if not events:
                continue
            try:
                req = self.dev.read_message()
            except MalformedMessage as e:
                self.dev.reject_malformed(e)
                continue
            if isinstance(req, OpenRequest):
                data = self.contents.get(req.cookie_key)
                if data is None:
                    os.close(req.fd)
                    self.dev.copen(req.msg_id, -errno.ENOENT)
                else:
                    self.table.add(req.object_id, req.fd, req.volume_key, req.cookie_key, len(data))
                    self.dev.copen(req.msg_id, len(data))
            elif isinstance(req, ReadRequest):
                self.reads.append(req)
                # one worker thread per READ: many in flight at once
                threading.Thread(target=self._serve_read, args=(req,), daemon=True).start()
            elif isinstance(req, CloseRequest):
                self.table.remove(req.object_id)

    def _serve_read(self, req: ReadRequest) -> None:
        with self.table.use(req.object_id) as entry:
            if entry is None:
                return
            data = self.contents[entry.cookie_key][req.offset : req.offset + req.length]
            try:
                self._write(entry.anon_fd, req.offset, data)
            except OSError as e:
                self.write_errors.append(e)
            self.dev.complete_read(entry.anon_fd, req.msg_id)  # always, also after a failure

    def _write(self, fd: int, offset: int, data: bytes) -> None:
        if self.mode == "skip" or not data:
            return
        if self.mode == "bytes":  # memory 1 byte off a page: O_DIRECT must refuse it
            buf = native.AlignedBuffer(len(data) + 1)
            buf.write(data, at=1)
            native.pwrite_full(fd, buf.view()[1:], len(data), offset)
            return
        if self.mode == "half":
            data = data[:4096]
        pad = 512 if self.mode == "tail512" else 4096
        n = (len(data) + pad - 1) // pad * pad
        buf = native.AlignedBuffer(n)
        buf.write(data)
        native.pwrite_full(fd, buf, n, offset)

    def close_object(self, object_id: int) -> None:
        self.table.remove(object_id)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)
        self.table.close_all()
        if self.exc:
            raise self.exc
