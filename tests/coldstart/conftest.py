"""Fixtures for the cold-start harness tests (coldstart), on the host kernel.

  coldstart_host   session: fails unless root, with the tools (debootstrap, containerd, runc,
                   skopeo, docker-registry) and a kernel whose /var/tmp takes fanotify
                   pre-content marks
  small_workload   session: the `small` workload (built once per machine, then from the cache
                   in /var/cache/fscached/workload or $FSCACHED_WORKLOAD_CACHE)
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # netcheck

TOOLS = ("debootstrap", "containerd", "ctr", "runc", "skopeo", "docker-registry", "unshare", "nsenter")


@pytest.fixture(scope="session")
def coldstart_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (namespaces, mounts, containerd): make test runs as root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (make deps)")
    from fanotify.group import probe

    reason = probe(Path("/var/tmp"))
    if reason is not None:
        pytest.fail(f"no fanotify pre-content events here: {reason}")


@pytest.fixture(scope="session")
def small_workload(coldstart_host: None):
    from coldstart.workload import build_workload

    return build_workload("small")
