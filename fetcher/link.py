"""What one more byte costs on a source's link, learnt from the ranged reads it served.

A miss on a lazily filled image waits for one request. Fetching neighbouring bytes with it (a
read window) pays when they are read soon after, and only as long as carrying them costs less
than the request they may save. A request costs about `fixed + bytes / bandwidth` seconds: the
fixed part (the round trip, the server's own time per request, a connection's turn) and the
transfer. The window worth fetching around a miss is what the link carries in one request's fixed
cost (its bandwidth-delay product, here per request): about 60 KB at 100 Mbit/s with a 5 ms
request, about 600 KB at 1 Gbit/s, more on a loopback. Measured on the full cold-start workload
(issue 17): a fixed 1 MiB window fetched 28 MiB at 100 Mbit/s where 64 KiB fetched 17 MiB and
started 26 % sooner, while at 1 Gbit/s and on a loopback 1 MiB was 10-15 % faster than 64 KiB.

A source that can tell its answer's first byte from its last (the registry: response headers,
then the body) gives both parts of each read (`observe_split`): the fixed cost is the least time to
the first byte, the cost of a byte the body's time over its bytes (bodies of MIN_BODY bytes or
more). One read is enough, whatever the sizes. Otherwise `LinkEstimate` fits `seconds = fixed +
bytes * per_byte` by least squares over the last SAMPLES whole reads of the source, which needs
reads that differ enough in size (a walk of equal files never gave one, and kept the window
where it started). Concurrent reads share the link: their times include that, which is the cost
a reader sees. Without an estimate, or with one that is not a cost, the caller keeps its window.
"""
from __future__ import annotations

import collections

SAMPLES = 64
MIN_SAMPLES = 4
MIN_SPREAD = 2.5  # the largest sampled read must be this many times the smallest for a fit
MIN_BODY = 16 << 10  # a smaller body's time is mostly the system's, not the link's


class LinkEstimate:
    def __init__(self) -> None:
        self._samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=SAMPLES)
        self._split: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=SAMPLES)

    @property
    def samples(self) -> int:
        """Reads observed (whole or told apart)."""
        return len(self._samples) + len(self._split)

    def observe(self, nbytes: int, seconds: float) -> None:
        """One read of `nbytes` that took `seconds` from request to the last byte."""
        if nbytes > 0 and seconds > 0:
            self._samples.append((nbytes, seconds))

    def observe_split(self, nbytes: int, first_byte: float, body: float) -> None:
        """One read of `nbytes`: `first_byte` seconds from the request to the answer's first
        byte (its headers), then `body` seconds to its last."""
        if nbytes > 0 and first_byte > 0 and body >= 0:
            self._split.append((nbytes, first_byte, body))

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds per request, seconds per byte), or None (no read told apart and too
        few or too alike whole reads, or a fit that is not a cost)."""
        return self._fit_split() or self._fit_whole()

    def _fit_split(self) -> tuple[float, float] | None:
        bodies = [(b, t) for b, _, t in self._split if b >= MIN_BODY]
        if not bodies:
            return None
        fixed = min(f for _, f, _ in self._split)  # the round trip unloaded: queueing behind others' bodies is their bytes
        per_byte = sum(t for _, t in bodies) / sum(b for b, _ in bodies)
        return (fixed, per_byte) if per_byte > 0 else None

    def _fit_whole(self) -> tuple[float, float] | None:
        n = len(self._samples)
        if n < MIN_SAMPLES:
            return None
        sizes = [float(b) for b, _ in self._samples]
        if max(sizes) < MIN_SPREAD * min(sizes):
            return None
        times = [t for _, t in self._samples]
        mean_b = sum(sizes) / n
        mean_t = sum(times) / n
        var_b = sum((b - mean_b) ** 2 for b in sizes)
        cov = sum((b - mean_b) * (t - mean_t) for b, t in zip(sizes, times))
        per_byte = cov / var_b
        fixed = mean_t - per_byte * mean_b
        if per_byte <= 0 or fixed <= 0:
            return None
        return fixed, per_byte

    def bytes_per_request(self) -> int | None:
        """How many bytes the link carries in one request's fixed cost; None: no estimate."""
        fitted = self.fit()
        if fitted is None:
            return None
        fixed, per_byte = fitted
        return round(fixed / per_byte)
