"""What this installation of fscached is: its package version, and nydusd's BuildTimeInfo."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import platform
import time
from pathlib import Path

VERSION = "0.1.0"  # fscached's version: pyproject.toml reads it from here

# the code a `git_commit` stands for: every installed source of these packages
PACKAGES = ("fscached", "erofs_image", "cachefiles", "fanotify", "native", "fetcher")
HASHED_SUFFIXES = (".py", ".c", ".h", ".so")


def package_version() -> str:
    """The installed fscached's version: VERSION, which the package metadata is built from
    (pyproject.toml), so a daemon's start needs no importlib.metadata scan."""
    return VERSION


@functools.cache
def build_info() -> dict[str, str]:
    """nydusd's BuildTimeInfo for this installation. `git_commit` is a digest of the package
    version and every installed source file (a wheel has no git): the same for one
    installation, different as soon as any code differs. Computed once per process."""
    version = package_version()
    digest = hashlib.sha256(f"fscached {version}\0".encode())
    newest = 0.0
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec is not None else []:
            base = Path(root)
            for path in sorted(base.rglob("*")):
                if path.suffix not in HASHED_SUFFIXES or "__pycache__" in path.parts or not path.is_file():
                    continue
                data = path.read_bytes()
                digest.update(f"{package}/{path.relative_to(base)}\0{len(data)}\0".encode())
                digest.update(data)
                newest = max(newest, path.stat().st_mtime)
    return {
        "package_ver": version,
        "git_commit": digest.hexdigest()[:40],
        "build_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest)),
        "profile": "release",
        "rustc": f"none (fscached on Python {platform.python_version()})",
    }
