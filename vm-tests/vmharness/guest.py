"""Helpers for code running INSIDE the guest (imported by guest scripts and scenarios)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def in_guest() -> bool:
    return "FSCACHED_VM_RESULT" in os.environ


def scratch_dir() -> Path:
    """The scratch ext4 disk's mount point (a real block filesystem: cachefiles accepts it)."""
    return Path(os.environ.get("FSCACHED_VM_SCRATCH", "/mnt"))


def write_result(result: dict) -> None:
    """Write the JSON result the host gets back as VmResult.result (atomic, fsynced)."""
    path = Path(os.environ["FSCACHED_VM_RESULT"])
    tmp = path.with_suffix(".tmp")
    data = json.dumps(result, indent=1, sort_keys=True, default=str).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
