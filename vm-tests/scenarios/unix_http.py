"""An HTTP connection over a unix socket (nydusd's API socket), for the guest scenarios that talk
to fscached's API as nydus-snapshotter does (nydus_snapshotter.py, snapshotter_fscache.py)."""
from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("nydusd", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def request(sock: Path, method: str, path: str, body: Any = None, timeout: float = 120) -> tuple[int, bytes]:
    """One request, `body` sent as JSON when given: (status, response body)."""
    conn = UnixHTTPConnection(sock, timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
