"""The cold-start harness (issue 10): how long a container takes from "nothing on the node" to
its first line of output, pulled classically by containerd or served lazily by fscached.

- `workload`: a real Debian bookworm + PyPI image (3 OCI layers), built once with debootstrap
  and the host's pip, cached outside the checkout with its converted (nydus) form; pushed with
  skopeo as `<repo>:plain` and `<repo>:nydus`.
- `containerd`: Debian's containerd and runc, started by us with state of our own
  (`Containerd(workdir)`: pull, run with the first output line timed), torn down on exit.
- `netns`: the registry in a network namespace of its own behind a shaped veth pair
  (`RegistryNetwork(workdir, profile)`), with a byte counter of what crossed it.
- `scenario`: the modes (classic, lazy, lazy with a start-up profile), measured.

Small helpers shared by those modules live here.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Sequence

from fscached.util.mounts import mounts_under

__all__ = ["mounts_under"]


class ColdstartError(RuntimeError):
    """A harness step that failed; the message is one line naming what and why."""


def one_line(text: str | bytes, limit: int = 400) -> str:
    """`text` squeezed onto one line (the tail of it, where errors usually are)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else "..." + flat[-(limit - 3):]


def run(cmd: Sequence[str], what: str, *, timeout: float = 600, **kwargs: object) -> str:
    """Run `cmd`, return its stdout; ColdstartError naming `what` and stderr's tail on failure."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                           **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise ColdstartError(f"{what}: {cmd[0]} is not installed (make deps)") from None
    except subprocess.TimeoutExpired:
        raise ColdstartError(f"{what}: {cmd[0]} did not finish within {timeout:g} s") from None
    if r.returncode != 0:
        raise ColdstartError(f"{what}: {cmd[0]} exited {r.returncode}: "
                             f"{one_line(r.stderr or r.stdout)}")
    return str(r.stdout)


def unmount_under(path: Path) -> list[str]:
    """Unmount (lazily, deepest first) everything mounted at or below `path`; what was there.
    Run before removing a directory tree: rmtree must never walk into a mounted /proc."""
    left = mounts_under(path)
    for target in left:
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)
    return left


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_caches() -> None:
    """Page cache out: the next read goes to the filesystem (or to the lazy daemon)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
