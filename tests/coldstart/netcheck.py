"""Helpers for the network tests: put a blob into the registry, time its download."""
from __future__ import annotations

import hashlib
import os
import time
import urllib.parse
import urllib.request


def upload_blob(host: str, repo: str, data: bytes) -> str:
    """Monolithic upload (POST, then PUT ?digest=); the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"http://{host}/v2/{repo}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        location = resp.headers["Location"]
    url = urllib.parse.urljoin(f"http://{host}/", location)
    url += ("&" if "?" in url else "?") + "digest=" + urllib.parse.quote(digest)
    put = urllib.request.Request(url, data=data, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(put, timeout=120) as resp:
        assert resp.status == 201, resp.status
    return digest


def download_seconds(host: str, repo: str, digest: str, size: int) -> float:
    t0 = time.perf_counter()
    got = 0
    with urllib.request.urlopen(f"http://{host}/v2/{repo}/blobs/{digest}", timeout=120) as resp:
        while block := resp.read(1 << 20):
            got += len(block)
    seconds = time.perf_counter() - t0
    assert got == size, (got, size)
    return seconds


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
