"""Which kernel path serves the images: fanotify pre-content events or cachefiles on-demand.

"Kernel path" is fscached's word for it (`--kernel-path`, `kernel_path` in the config file; the
older `--backend` / `backend` are still read): nydus, whose API fscached speaks, calls the blob
source (registry, localfs) the backend.
"""
from __future__ import annotations

import os
from pathlib import Path

from fanotify.group import probe

KERNEL_PATHS = ("auto", "cachefiles", "fanotify")
CACHEFILES_NEEDS = ("cachefiles on-demand needs Linux 5.19+ with CONFIG_CACHEFILES_ONDEMAND=y and "
                    "CONFIG_EROFS_FS_ONDEMAND=y (/dev/cachefiles) and a cache dir on ext4, xfs or btrfs")


class KernelPathError(Exception):
    """Neither kernel path can serve here, worded for the user."""


def choose_kernel_path(wanted: str, cache_dir: Path, device: Path) -> tuple[str, str]:
    """(kernel path, why it was chosen). `cache_dir` must exist (the probe marks a file in it)."""
    if wanted == "cachefiles":
        return "cachefiles", "asked for"
    reason = probe(cache_dir)
    if wanted == "fanotify":
        if reason:
            raise KernelPathError(reason)
        return "fanotify", "asked for"
    if reason is None:
        return "fanotify", "the kernel has fanotify pre-content events"
    if os.path.exists(device):
        return "cachefiles", f"no fanotify pre-content events ({reason})"
    raise KernelPathError(f"no kernel path can serve images here: fanotify: {reason}; "
                          f"cachefiles: {device} does not exist: {CACHEFILES_NEEDS}")
