"""Who keeps a daemon's kernel fds (and its hand-over state) alive while no daemon does.

One interface, `FdCarrier`, three carriers:

    KeeperCarrier        the keeper process (fscached.frontends.fanotify.keeper), for the fanotify
                         path outside systemd; the daemon holds a lifeline to it
    SystemdStore         systemd's fd store (FDSTORE=1), either kernel path, run by systemd
    (supervisor)         nydus-snapshotter's supervisor socket (fscached.lifecycle.supervisor):
                         fds and state are pushed to it on request (sendfd) and pulled back at a
                         takeover, so it is not a standing carrier; it names its fds the same way

Every carrier holds fds by their fscached.lifecycle.fdnames names; the hand-over state travels as
the memfd named "state" (fscached.lifecycle.state_memfd). What a carrier holds is replaced as a
whole by `give` (new ones held before old ones are let go: the group never lapses).
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fscached.frontends.fanotify import keeper
from fscached.lifecycle import fdnames
from fscached.lifecycle.systemd import Service

log = logging.getLogger("fscached")


class FdCarrier(Protocol):
    what: str  # for the log: "the keeper", "systemd's fd store"
    # a stop may leave busy mounts to the next process (systemd starts it again); otherwise a
    # stop keeps serving what is still read
    hands_to_next_process: bool

    def take(self) -> dict[str, int]:
        """What it holds, by name (copies the caller owns); {} when nothing."""
    def start(self) -> None:
        """Make it ready to hold (a keeper process is started)."""
    def give(self, fds: Mapping[str, int]) -> None:
        """Hold exactly these (copies; the caller keeps its own)."""
    def dismiss(self) -> None:
        """Let everything go: nothing will need it."""
    def leave(self) -> None:
        """This process ends without letting go: from now on the carrier holds on its own."""


class KeeperCarrier:
    what = "the keeper"
    hands_to_next_process = False

    def __init__(self, sock: Path, blobs_dir: Path) -> None:
        self.sock = sock
        self.blobs_dir = blobs_dir
        self._lifeline: socket.socket | None = None

    def take(self) -> dict[str, int]:
        """What it holds, by fdnames name (an older keeper's names translated)."""
        return {fdnames.normalize(name): fd for name, fd in (keeper.take(self.sock) or {}).items()}

    def start(self) -> None:
        keeper.start(self.sock, self.blobs_dir)

    def give(self, fds: Mapping[str, int]) -> None:
        keeper.give(self.sock, dict(fds))
        if self._lifeline is None:  # from now on the keeper knows whether this daemon lives
            self._lifeline = keeper.attach(self.sock)

    def dismiss(self) -> None:
        keeper.dismiss(self.sock)
        self.leave()

    def leave(self) -> None:
        """Close the lifeline: the keeper now watches whether anything still needs it (a kill
        of this process closes it too)."""
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None


class SystemdStore:
    what = "systemd's fd store"
    hands_to_next_process = True

    def __init__(self, service: Service) -> None:
        self.service = service

    def take(self) -> dict[str, int]:
        return self.service.take_all()

    def start(self) -> None:
        if not self.service.can_store:
            log.warning("run by systemd without an fd store (FileDescriptorStoreMax=0, or no NOTIFY_SOCKET): "
                        "if this daemon dies, what it serves is not kept for the next one")

    def give(self, fds: Mapping[str, int]) -> None:
        self.service.sync({name: fd for name, fd in fds.items() if fdnames.valid(name)})

    def dismiss(self) -> None:
        self.service.release()

    def leave(self) -> None:
        """Nothing to do: systemd keeps the store until the service is stopped."""


def close_all(fds: Mapping[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
