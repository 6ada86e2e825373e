"""What the snapshotter tests share besides fixtures (conftest.py): the test image's record and
a poll with a deadline."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import pytest

from coldstart.snapshotter import NydusImage


@dataclass
class AppImage:
    """The test image (conftest.app_image): its pushed nydus form and what its files hold."""

    image: NydusImage
    hello: bytes
    big_sha256: str
    big_bytes: int

    @property
    def ref(self) -> str:
        return self.image.ref

    @property
    def blob(self) -> str:
        """The digest of its one data blob."""
        (digest,) = self.image.blobs
        return digest

    @property
    def blob_size(self) -> int:
        return self.image.blobs[self.blob]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15) -> None:
    """Poll `check` every 0.1 s; the test fails naming `what` when it is not true in time."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)
