"""Whiteout markers: the names and rules, and what they mean in a plain directory source.

A whiteout says "a lower layer's entry is gone". OCI layers (tar) mark one with an entry
named `.wh.NAME`, and a directory whose lower contents are all gone with `.wh..wh..opq` in it;
erofs_image.layers resolves those across an image's layers. Overlayfs marks a removed entry
with a character device 0/0 of the same name, and an opaque directory with the xattr
`trusted.overlay.opaque` = "y".

A plain directory converted on its own (`convert DIR`, `--whiteout-spec`) is one layer with
nothing below it: its whiteouts have nothing to hide, so what is left is to keep the markers
out of the image, as nydus-image does for a build without a parent bootstrap:

- "oci" (the default, as nydus-image's): an entry whose name starts with `.wh.` (a whiteout,
  the opaque marker, other AUFS metadata such as `.wh..wh.plnk`) is not emitted, nor anything
  under it. NAME itself, beside its `.wh.NAME`, stays: a whiteout hides lower layers only.
- "overlayfs": a character device 0/0 is not emitted; an opaque directory is kept, without
  its `trusted.overlay.opaque` mark (nothing is below it to hide).
- "none": everything is emitted as it is.
"""
from __future__ import annotations

import os
import stat

from .tree import Inode

WHITEOUT_SPECS = ("oci", "overlayfs", "none")
WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = b"trusted.overlay.opaque"


def check_spec(spec: str) -> str:
    if spec not in WHITEOUT_SPECS:
        raise ValueError(f"unknown whiteout spec {spec!r} (choose {', '.join(WHITEOUT_SPECS)})")
    return spec


def is_marker(spec: str, name: bytes, st: os.stat_result) -> bool:
    """True when the directory entry `name` (lstat `st`) is a whiteout marker under `spec`:
    left out of the image, with whatever is under it."""
    if spec == "oci":
        return name.startswith(WHITEOUT_PREFIX)
    if spec == "overlayfs":
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    return False


def drop_opaque_mark(spec: str, node: Inode) -> bool:
    """Take an overlayfs opaque mark off a directory (spec "overlayfs"); True if there was one."""
    if spec == "overlayfs" and node.is_dir and node.xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y":
        del node.xattrs[OVERLAY_OPAQUE_XATTR]
        return True
    return False
