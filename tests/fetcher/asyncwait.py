"""Waiting in the fetcher tests' event loops for a state that has no event to await (a health
flag, a stand-in's counters): polled, and bounded, so a wait that never ends fails the test."""
from __future__ import annotations

import asyncio
from typing import Callable


async def wait_for(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:g} s")
        await asyncio.sleep(0.01)
