"""Tar layers of real directory trees (xattrs, devices, hard links) for the builder's input.

Whiteouts are written for `remove` paths of a layer, the way container builders do.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Sequence

from erofs_image.demo import write_oci_layout


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
    """An OCI layout at `out` with each tar as a gzip layer."""
    write_oci_layout(out, [(tar, "gzip") for tar in layers])
    return out
