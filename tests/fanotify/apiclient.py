"""Test helpers: the daemon's API on its unix socket, and nydusd bind entries for built images."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp


def call(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as session:
            async with session.request(method, f"http://localhost{path}", json=body) as resp:
                data = await resp.read()
                return resp.status, json.loads(data) if data else None
    return asyncio.run(go())


def entry(fsid: str, built: Path, work: Path, mountpoint: Path | None, domain: str | None = None) -> dict[str, Any]:
    """A legacy bind entry for an image built by fscached-image (localfs blobs), with
    fscached's `mountpoint` when one is given."""
    bind: dict[str, Any] = {
        "type": "bootstrap", "id": fsid, "domain_id": domain or fsid,
        "config": {
            "id": fsid, "backend_type": "localfs", "backend_config": {"dir": str(built / "blobs")},
            "cache_type": "fscache", "cache_config": {"work_dir": str(work)},
            "metadata_path": str(built / "image.boot"),
        },
    }
    if mountpoint is not None:
        bind["mountpoint"] = str(mountpoint)
    return bind
