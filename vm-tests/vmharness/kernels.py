"""Which kernels the VM tests boot, and where their bzImages come from.

For each kernel series (6.12, 6.1), the first of these that has `bzImage-<series>` wins:
1. $FSCACHED_KERNEL_DIR (a directory holding bzImage-6.12 / bzImage-6.1);
2. ../shared/vm next to the checkout (the repo root's parent), ready-built kernels;
3. the build cache, $FSCACHED_KERNEL_CACHE or /var/cache/fscached-kernels,
   `<series>-<sha256 of kernel-fragment.config>/bzImage`;
4. a build with vm-tests/kernel/build-kernel.sh (10+ minutes per kernel on 2 cores).
$FSCACHED_KERNELS (e.g. "6.12" or "6.12,6.1") limits which series are tested.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .qemu import REPO_ROOT, VM_TESTS_DIR

SERIES = ("6.12", "6.1")
KERNEL_DIR = VM_TESTS_DIR / "kernel"
FRAGMENT = KERNEL_DIR / "kernel-fragment.config"
BUILD_SCRIPT = KERNEL_DIR / "build-kernel.sh"
DEFAULT_CACHE = Path("/var/cache/fscached-kernels")


@dataclass(frozen=True)
class Kernel:
    series: str  # "6.12"
    path: Path  # the bzImage
    origin: str  # "env", "shared", "cache" or "built"

    def __str__(self) -> str:
        return f"{self.series} ({self.path}, {self.origin})"


def selected_series() -> list[str]:
    raw = os.environ.get("FSCACHED_KERNELS", "").strip()
    if not raw:
        return list(SERIES)
    wanted = [s.strip() for s in raw.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SERIES]
    if unknown:
        raise ValueError(f"FSCACHED_KERNELS names unknown series {unknown}; known: {list(SERIES)}")
    return wanted


def fragment_sha256() -> str:
    return hashlib.sha256(FRAGMENT.read_bytes()).hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("FSCACHED_KERNEL_CACHE") or DEFAULT_CACHE)


def cached_path(series: str) -> Path:
    return cache_root() / f"{series}-{fragment_sha256()}" / "bzImage"


def shared_dir() -> Path:
    return REPO_ROOT.resolve().parent / "shared" / "vm"


def find_kernel(series: str) -> Kernel | None:
    """A ready bzImage for `series` without building, or None."""
    if series not in SERIES:
        raise ValueError(f"unknown kernel series {series!r}; known: {list(SERIES)}")
    env_dir = os.environ.get("FSCACHED_KERNEL_DIR")
    if env_dir:
        p = Path(env_dir) / f"bzImage-{series}"
        if p.is_file():
            return Kernel(series, p, "env")
    p = shared_dir() / f"bzImage-{series}"
    if p.is_file():
        return Kernel(series, p, "shared")
    p = cached_path(series)
    if p.is_file():
        return Kernel(series, p, "cache")
    return None


def build_kernel(series: str, timeout: float | None = 3600) -> Kernel:
    """Build (or take from the cache) with build-kernel.sh; its last stdout line is the path."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), series],
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        env={**os.environ, "FSCACHED_KERNEL_CACHE": str(cache_root())},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} {series} failed with status {proc.returncode}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    if not path.is_file():
        raise RuntimeError(f"{BUILD_SCRIPT} {series} printed {path}, which does not exist")
    return Kernel(series, path, "built")


def get_kernel(series: str, build: bool = True) -> Kernel:
    k = find_kernel(series)
    if k is not None:
        return k
    if not build:
        raise LookupError(f"no bzImage for {series} (see vmharness/kernels.py for where it looks)")
    return build_kernel(series)

