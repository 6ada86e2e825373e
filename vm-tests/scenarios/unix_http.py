"""An HTTP connection over a unix socket (nydusd's API socket), for the guest scenarios that talk
to fscached's API as nydus-snapshotter does (nydus_snapshotter.py, snapshotter_fscache.py)."""
from __future__ import annotations

import http.client
import socket
from pathlib import Path


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("nydusd", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock
