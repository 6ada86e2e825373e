import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from simdaemon import WORK_ROOT


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fscached-sim-", dir=WORK_ROOT))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
