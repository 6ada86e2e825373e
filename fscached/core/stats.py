"""What happened to the kernel's requests: outcome, latency and bytes of every answer a
frontend gives (fed by the frontends, read by the Prometheus layer and the API)."""
from __future__ import annotations

import bisect

OUTCOMES = ("cached", "filled", "failed")
# seconds from the kernel's request to the daemon's answer: a cached answer takes microseconds,
# a local fill milliseconds, a registry round trip tens of milliseconds and more
LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


SIZE_BUCKETS = tuple(4096 << n for n in range(9))  # 4 KiB .. 1 MiB


class RequestStats:
    """What happened to the kernel's requests, observed by a frontend when it answers one: its
    outcome ("cached": answered without fetching; "filled": bytes fetched, verified, written;
    "failed": the reader saw EIO), seconds from the request to the answer, bytes it covered.

    Plain counters (no locking): written on the event loop, read by a scrape; every update is
    one attribute or list-item store."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        # requests answered with data, by size: up to 4 KiB, 8, 16, ... 1 MiB, more
        self.size_counts = [0] * (len(SIZE_BUCKETS) + 1)
        # per outcome: a count per bucket (not cumulative; the last one is +Inf), sum, bytes
        self.counts: dict[str, list[int]] = {o: [0] * (len(buckets) + 1) for o in OUTCOMES}
        self.seconds: dict[str, float] = dict.fromkeys(OUTCOMES, 0.0)
        self.bytes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    def observe(self, outcome: str, seconds: float, nbytes: int = 0) -> None:
        seconds = max(seconds, 0.0)
        self.counts[outcome][bisect.bisect_left(self.buckets, seconds)] += 1
        self.seconds[outcome] += seconds
        self.bytes[outcome] += nbytes
        if nbytes:
            self.size_counts[bisect.bisect_left(SIZE_BUCKETS, nbytes)] += 1

    def add(self, outcome: str, counts: list[int], seconds: float, nbytes: int, sizes: list[int]) -> None:
        """Many answers at once, already counted per latency bucket and per size bucket (the
        fanotify fast path in C counts its own)."""
        mine = self.counts[outcome]
        for i, n in enumerate(counts[:len(mine)]):
            mine[i] += n
        self.seconds[outcome] += seconds
        self.bytes[outcome] += nbytes
        for i, n in enumerate(sizes[:len(self.size_counts)]):
            self.size_counts[i] += n

    def total(self, outcome: str) -> int:
        return sum(self.counts[outcome])
