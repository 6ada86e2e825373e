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

`LinkEstimate` fits `seconds = fixed + bytes * per_byte` by least squares over the last
SAMPLES reads of one source (concurrent reads share the link: their times include that, which
is the cost a reader sees). Until the reads differ enough in size to fit a line, or when the fit
is not physical (a negative cost), it has no estimate and the caller keeps its own window.
"""
from __future__ import annotations

import collections

SAMPLES = 64
MIN_SAMPLES = 4
MIN_SPREAD = 2.5  # the largest sampled read must be this many times the smallest for a fit


class LinkEstimate:
    def __init__(self) -> None:
        self._samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=SAMPLES)

    @property
    def samples(self) -> int:
        return len(self._samples)

    def observe(self, nbytes: int, seconds: float) -> None:
        """One read of `nbytes` that took `seconds` from request to the last byte."""
        if nbytes > 0 and seconds > 0:
            self._samples.append((nbytes, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds per request, seconds per byte), or None (too few or too alike reads,
        or a fit that is not a cost)."""
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
