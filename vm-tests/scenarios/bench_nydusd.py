"""Guest side of bench/nydusd_guest.py: fscached and nydusd, both in cachefiles mode, one at a
time, on the same images (the rows are bench/nydusd.py's; see bench/nydusd_guest.py).

args: as bench/nydusd_guest.py's main() writes them. Returns {"results", "problems"}.
"""
from __future__ import annotations

from typing import Any


def run(args: dict[str, Any]) -> dict[str, Any]:
    from bench.nydusd_guest import guest_run

    return guest_run(args)
