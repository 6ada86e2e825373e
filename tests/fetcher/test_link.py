"""fetcher.link: what one more byte costs on a source's link, fitted from timed reads."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetcher.link import MIN_SAMPLES, SAMPLES, LinkEstimate


@settings(max_examples=200, deadline=None)
@given(fixed=st.floats(1e-4, 0.05), rate=st.floats(1e6, 1e10),
       sizes=st.lists(st.integers(4096, 16 << 20), min_size=MIN_SAMPLES, max_size=SAMPLES))
def test_a_link_that_costs_fixed_plus_bytes_over_rate_is_fitted(fixed: float, rate: float, sizes: list[int]) -> None:
    if max(sizes) < 3 * min(sizes):
        sizes = [*sizes, 3 * max(sizes)]  # reads that differ enough to fit a line
    link = LinkEstimate()
    for n in sizes:
        link.observe(n, fixed + n / rate)
    fitted = link.fit()
    assert fitted is not None
    assert fitted[0] == pytest.approx(fixed, rel=1e-3, abs=1e-7)
    assert fitted[1] == pytest.approx(1 / rate, rel=1e-3)
    worth = link.bytes_per_request()
    assert worth is not None and worth == pytest.approx(fixed * rate, rel=1e-2)


def test_no_estimate_from_too_few_or_too_alike_reads() -> None:
    link = LinkEstimate()
    for n in (1 << 20, 4 << 20, 16 << 20):
        link.observe(n, 0.005 + n / 12.5e6)
    assert link.bytes_per_request() is None  # three reads: not enough
    alike = LinkEstimate()
    for i in range(20):
        n = (1 << 20) + i * 1000
        alike.observe(n, 0.005 + n / 12.5e6)
    assert alike.bytes_per_request() is None  # a line through one point is no line


def test_a_fit_that_is_not_a_cost_is_no_estimate() -> None:
    faster_when_bigger = LinkEstimate()
    for n, t in ((64 << 10, 0.05), (256 << 10, 0.04), (1 << 20, 0.03), (4 << 20, 0.02), (16 << 20, 0.01)):
        faster_when_bigger.observe(n, t)
    assert faster_when_bigger.fit() is None
    no_fixed_cost = LinkEstimate()
    for n in (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20):
        no_fixed_cost.observe(n, n / 12.5e6 - 0.001)  # negative intercept
    assert no_fixed_cost.fit() is None


def test_empty_and_zero_reads_are_not_samples() -> None:
    link = LinkEstimate()
    for _ in range(10):
        link.observe(0, 0.01)
        link.observe(1000, 0.0)
    assert link.fit() is None


def test_the_estimate_follows_a_link_that_changes() -> None:
    """The last SAMPLES reads count: a link that went from 100 Mbit/s to 1 Gbit/s is seen as
    the new one once it has served that many reads."""
    link = LinkEstimate()
    sizes = [64 << 10, 256 << 10, 1 << 20, 4 << 20]
    for i in range(SAMPLES):
        n = sizes[i % len(sizes)]
        link.observe(n, 0.005 + n / 12.5e6)
    slow = link.bytes_per_request()
    for i in range(SAMPLES):
        n = sizes[i % len(sizes)]
        link.observe(n, 0.005 + n / 125e6)
    fast = link.bytes_per_request()
    assert slow == pytest.approx(62_500, rel=1e-2)
    assert fast == pytest.approx(625_000, rel=1e-2)


def test_one_read_told_apart_is_enough() -> None:
    """A source that tells the first byte from the last (the registry) gives an estimate from
    one read, whatever its size: reads of one size (a walk of equal files) never fit a line."""
    link = LinkEstimate()
    link.observe_split(256 << 10, 0.004, (256 << 10) / 12.5e6)  # 100 Mbit/s, 4 ms to the first byte
    assert link.bytes_per_request() == pytest.approx(0.004 * 12.5e6, rel=1e-6)
    for _ in range(10):
        link.observe(256 << 10, 0.004 + (256 << 10) / 12.5e6)  # the same reads, timed whole: no line
    assert link.bytes_per_request() == pytest.approx(0.004 * 12.5e6, rel=1e-6)


def test_the_fixed_cost_is_the_least_first_byte_and_small_bodies_are_not_the_rate() -> None:
    """An answer that waited behind other answers' bodies on a shared link paid for their
    bytes, not a longer round trip: the fixed cost is the least time to a first byte."""
    link = LinkEstimate()
    link.observe_split(4096, 0.002, 0.5)  # a small body's time says nothing of the link
    assert link.fit() is None
    for first in (0.003, 0.004, 0.050):
        link.observe_split(1 << 20, first, (1 << 20) / 125e6)
    fixed, per_byte = link.fit() or (0.0, 0.0)
    assert fixed == 0.002
    assert per_byte == pytest.approx(1 / 125e6, rel=1e-6)
