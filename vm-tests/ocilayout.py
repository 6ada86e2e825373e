"""Make an OCI image layout from directories, one gzip layer each (test input for the builder).

Whiteouts are written for `remove` paths of a layer, the way container builders do.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Sequence


def _blob(blobs: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def layer_tar(root: Path | None, remove: Sequence[str] = (), include: set[str] | None = None) -> bytes:
    """A tar of `root` (only its top-level entries named in `include`, when given)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if root is not None:
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root)
                if include is None or rel.parts[0] in include:
                    _add(tar, path, str(rel))
        for gone in remove:
            parent, _, name = gone.strip("/").rpartition("/")
            info = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
            tar.addfile(info, io.BytesIO(b""))
    return raw.getvalue()


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    """tar.add, plus the xattrs (as SCHILY.xattr PAX records, like GNU tar --xattrs)."""
    info = tar.gettarinfo(str(path), arcname)
    for name in os.listxattr(path, follow_symlinks=False):
        value = os.getxattr(path, name, follow_symlinks=False)
        info.pax_headers[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    if info.isreg():
        with open(path, "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)


def write_layout(out: Path, layers: list[bytes]) -> Path:
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    diff_ids = [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]
    layer_descs = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(blobs, gzip.compress(t, mtime=0))}
        for t in layers
    ]
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_blob(blobs, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": layer_descs}
    manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                     **_blob(blobs, json.dumps(manifest).encode()),
                     "annotations": {"org.opencontainers.image.ref.name": "latest"}}
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))
    return out
