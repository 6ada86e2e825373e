"""A node's background download of a whole blob through its Dragonfly peer (the gRPC source's
whole task, the proxy source's whole-blob GET): the task running it, how it ended, and a wake-up
for the reads waiting on its progress. Each source says what "local" means for it."""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TypeVar


class WholeDownload:
    def __init__(self) -> None:
        self.content_length: int | None = None
        self.started_at = time.monotonic()
        self.finished = False  # the download ended without an error: the whole blob is local
        self.error: str | None = None
        self.runner: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """Progress or an end: wake every read waiting in next_change()."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def next_change(self, deadline: float) -> None:
        """Until the next changed(); TimeoutError at `deadline` (time.monotonic())."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        await asyncio.wait_for(self._changed.wait(), remaining)


Download = TypeVar("Download", bound=WholeDownload)


async def stop_whole_downloads(downloads: dict[str, Download]) -> None:
    """Cancel every download still running, wait for each to end, forget them all."""
    runners = [d.runner for d in downloads.values() if d.runner is not None and not d.runner.done()]
    for runner in runners:
        runner.cancel()
    for runner in runners:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await runner
    downloads.clear()
