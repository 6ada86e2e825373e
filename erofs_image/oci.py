"""Source images (OCI image layout, `docker save` archives) and the nydus output layout.

Reading: `open_source(path)` returns a `SourceImage` whose layers open as binary streams that
verify the blob's digest while being read (`layers.CountingReader`).
Writing: `write_nydus_layout(...)` writes an OCI image layout in the nydus convention: one
``application/vnd.oci.image.layer.nydus.blob.v1`` layer per data blob, then the bootstrap
layer (a gzipped tar holding ``image/image.boot``).
"""
from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from .layers import BuildError

from .oci_media import (ANN_NYDUS_BLOB, ANN_NYDUS_BOOTSTRAP, ANN_NYDUS_FS_VERSION, ANN_REF_NAME,
                        BOOTSTRAP_ENTRY, LAYER_TAR_GZIP, NYDUS_BLOB, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,
                        Platform, PlatformError, choose_manifest, is_index, machine_platform)

_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")
_BLOB_PATH_RE = re.compile(r"(?:^|/)blobs/(sha256|sha512)/([0-9a-f]{64,128})$")


@dataclass
class LayerSource:
    name: str  # for messages: "<source>: blobs/sha256/<hex>"
    media_type: str
    digest: str | None  # expected digest of the stored bytes ("sha256:<hex>"), or None
    size: int | None
    opener: Callable[[], IO[bytes]]

    def open(self) -> IO[bytes]:
        return self.opener()


@dataclass
class SourceImage:
    kind: str  # "oci-layout" | "docker-archive" | "oci-archive"
    config: dict
    layers: list[LayerSource]
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()
        self.closers.clear()


# --------------------------------------------------------------------------- blob access


class _Store:
    """Files of an OCI layout, either a directory or the members of a tar archive."""

    def __init__(self, label: str):
        self.label = label

    def open(self, path: str) -> IO[bytes]:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def read_small(self, path: str, what: str, digest: str | None = None,
                   limit: int = 64 << 20) -> bytes:
        try:
            with self.open(path) as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise BuildError(f"{self.label}: {what} {path} is missing") from None
        except OSError as e:
            raise BuildError(f"{self.label}: cannot read {what} {path}: {e.strerror or e}") from None
        if len(data) > limit:
            raise BuildError(f"{self.label}: {what} {path} is too large")
        if digest is not None:
            check_digest(data, digest, f"{self.label}: {what} {path}")
        return data


class _DirStore(_Store):
    def __init__(self, root: Path):
        super().__init__(str(root))
        self.root = root

    def open(self, path: str) -> IO[bytes]:
        return open(self.root / path, "rb")

    def exists(self, path: str) -> bool:
        return (self.root / path).is_file()


class _TarStore(_Store):
    def __init__(self, archive: Path):
        super().__init__(str(archive))
        try:
            self.tf = tarfile.open(archive, "r:*")
            self.members = {_clean(m.name): m for m in self.tf.getmembers()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BuildError(f"{archive}: not a readable tar archive: {e}") from None

    def open(self, path: str) -> IO[bytes]:
        m = self.members.get(_clean(path))
        if m is None:
            raise FileNotFoundError(path)
        try:
            f = self.tf.extractfile(m)
        except KeyError:  # a link to a missing member
            f = None
        if f is None:
            raise FileNotFoundError(path)
        return f

    def exists(self, path: str) -> bool:
        return _clean(path) in self.members

    def close(self) -> None:
        self.tf.close()


def _clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def check_digest(data: bytes, digest: str, what: str) -> None:
    m = _DIGEST_RE.match(digest or "")
    if not m:
        raise BuildError(f"{what}: unsupported digest {digest!r}")
    got = hashlib.new(m.group(1), data).hexdigest()
    if got != m.group(2):
        raise BuildError(f"{what}: digest mismatch: expected {digest}, got {m.group(1)}:{got}")


def _blob_path(digest: str, what: str, label: str) -> str:
    m = _DIGEST_RE.match(digest or "")
    if not m:
        raise BuildError(f"{label}: {what} has an unsupported digest {digest!r}")
    return f"blobs/{m.group(1)}/{m.group(2)}"


def _json(data: bytes, what: str) -> dict:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BuildError(f"{what}: invalid JSON: {e}") from None
    return obj


# --------------------------------------------------------------------------- OCI layout


def _pick_manifest(store: _Store, index: dict, where: str, platform: Platform | None,
                   depth: int = 0) -> dict:
    """Follow (nested) indexes down to the image manifest for `platform` (default: this
    machine's; rules in erofs_image.oci_media)."""
    if depth > 4:
        raise BuildError(f"{store.label}: {where}: image indexes nested too deeply")
    try:
        chosen = choose_manifest(index, platform)
    except PlatformError as e:
        raise BuildError(f"{store.label}: {where}: {e}") from None
    digest = chosen.get("digest", "")
    path = _blob_path(digest, "manifest", store.label)
    data = store.read_small(path, "manifest", digest)
    obj = _json(data, f"{store.label}: {path}")
    if not isinstance(obj, dict):
        raise BuildError(f"{store.label}: {path}: not a JSON object")
    if is_index(obj, chosen.get("mediaType")):
        return _pick_manifest(store, obj, path, platform, depth + 1)
    return obj


def _read_layout(store: _Store, kind: str, closers, platform: Platform | None = None) -> SourceImage:
    if not store.exists("index.json"):
        raise BuildError(f"{store.label}: not an OCI image layout (no index.json)")
    if store.exists("oci-layout"):
        lay = _json(store.read_small("oci-layout", "oci-layout"), f"{store.label}: oci-layout")
        if not str(lay.get("imageLayoutVersion", "")).startswith("1."):
            raise BuildError(f"{store.label}: unsupported imageLayoutVersion "
                             f"{lay.get('imageLayoutVersion')!r}")
    index = _json(store.read_small("index.json", "index"), f"{store.label}: index.json")
    if not isinstance(index, dict):
        raise BuildError(f"{store.label}: index.json: not a JSON object")
    manifest = _pick_manifest(store, index, "index.json", platform)
    cdesc = manifest.get("config") or {}
    cpath = _blob_path(cdesc.get("digest", ""), "config", store.label)
    config = _json(store.read_small(cpath, "config", cdesc["digest"]), f"{store.label}: {cpath}")
    layers = []
    for i, ld in enumerate(manifest.get("layers") or []):
        digest = ld.get("digest", "")
        lpath = _blob_path(digest, f"layer {i}", store.label)
        mt = ld.get("mediaType", "")
        if "nydus" in mt:
            raise BuildError(f"{store.label}: layer {i} ({lpath}) is already a nydus blob: "
                             "converting nydus images is not supported")
        if not store.exists(lpath):
            raise BuildError(f"{store.label}: layer {i} {lpath} referenced by the manifest "
                             "is missing")
        layers.append(LayerSource(f"{store.label}: {lpath}", mt, digest, ld.get("size"),
                                  functools.partial(store.open, lpath)))
    return SourceImage(kind, config, layers, closers)


def open_oci_layout(path: Path, platform: Platform | None = None) -> SourceImage:
    return _read_layout(_DirStore(path), "oci-layout", [], platform)


def open_archive(path: Path, platform: Platform | None = None) -> SourceImage:
    """A `docker save` archive (old or new format) or an OCI layout packed in a tar."""
    store = _TarStore(path)
    try:
        if store.exists("manifest.json"):
            return _read_docker(store)
        if store.exists("index.json"):
            return _read_layout(store, "oci-archive", [store.close], platform)
        raise BuildError(f"{path}: neither a docker save archive (no manifest.json) nor an "
                         "OCI layout archive (no index.json)")
    except BaseException:
        store.close()
        raise


def _read_docker(store: _TarStore) -> SourceImage:
    entries = _json(store.read_small("manifest.json", "manifest"), f"{store.label}: manifest.json")
    if not isinstance(entries, list) or not entries:
        raise BuildError(f"{store.label}: manifest.json lists no image")
    if len(entries) > 1:
        raise BuildError(f"{store.label}: manifest.json lists {len(entries)} images; save one")
    entry = entries[0]
    cpath = entry.get("Config") or ""
    m = _BLOB_PATH_RE.search(cpath)
    config = _json(store.read_small(cpath, "config", f"{m.group(1)}:{m.group(2)}" if m else None),
                   f"{store.label}: {cpath}")
    layers = []
    for i, lpath in enumerate(entry.get("Layers") or []):
        if not store.exists(lpath):
            raise BuildError(f"{store.label}: layer {i} {lpath} referenced by manifest.json "
                             "is missing")
        m = _BLOB_PATH_RE.search(lpath)
        digest = f"{m.group(1)}:{m.group(2)}" if m else None
        layers.append(LayerSource(f"{store.label}: {lpath}", "", digest, None,
                                  functools.partial(store.open, lpath)))
    return SourceImage("docker-archive", config, layers, [store.close])


def open_source(path: Path, platform: Platform | None = None) -> SourceImage | None:
    """The image at `path`, or None when `path` is a plain directory tree. From an index
    (multi-platform image) the manifest for `platform` is read, by default this machine's."""
    if path.is_dir():
        if (path / "oci-layout").is_file() or (path / "index.json").is_file():
            return open_oci_layout(path, platform)
        return None
    if path.is_file():
        return open_archive(path, platform)
    if not path.exists():
        raise BuildError(f"{path}: no such file or directory")
    raise BuildError(f"{path}: not a directory, OCI layout or image archive")


# --------------------------------------------------------------------------- output


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex digest, size) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
            n += len(data)
    return h.hexdigest(), n


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def bootstrap_layer(bootstrap: Path) -> tuple[bytes, str]:
    """(gzipped tar holding image/image.boot, sha256 diff id of the uncompressed tar)."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("image")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(d)
        ti = tarfile.TarInfo(BOOTSTRAP_ENTRY)
        ti.size, ti.mode = bootstrap.stat().st_size, 0o644
        with open(bootstrap, "rb") as f:
            tf.addfile(ti, f)
    raw = tar.getvalue()
    return gzip.compress(raw, mtime=0), "sha256:" + hashlib.sha256(raw).hexdigest()


def default_config() -> dict:
    """The image config for a plain directory source: this machine's platform."""
    plat = machine_platform()
    cfg: dict = {"architecture": plat.architecture, "os": plat.os}
    if plat.variant:
        cfg["variant"] = plat.variant
    return {**cfg, "config": {},
            "rootfs": {"type": "layers", "diff_ids": []}, "history": []}


def write_nydus_layout(oci_dir: Path, bootstrap: Path, blobs_dir: Path, blob_ids: list[str],
                       source_config: dict | None, ref_name: str = "latest") -> str:
    """Write the nydus-convention OCI layout; returns the manifest digest."""
    blobs_out = oci_dir / "blobs" / "sha256"
    blobs_out.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> tuple[str, int]:
        hexd = hashlib.sha256(data).hexdigest()
        (blobs_out / hexd).write_bytes(data)
        return "sha256:" + hexd, len(data)

    layers = []
    diff_ids = []
    for blob_id in blob_ids:
        src = blobs_dir / blob_id
        hexd, size = sha256_file(src)
        if hexd != blob_id:
            raise BuildError(f"{src}: blob id {blob_id} is not the sha256 of the blob ({hexd})")
        _link_or_copy(src, blobs_out / hexd)
        layers.append({"mediaType": NYDUS_BLOB, "digest": "sha256:" + hexd, "size": size,
                       "annotations": {ANN_NYDUS_BLOB: "true"}})
        diff_ids.append("sha256:" + hexd)
    gz, boot_diff = bootstrap_layer(bootstrap)
    digest, size = put(gz)
    layers.append({"mediaType": LAYER_TAR_GZIP, "digest": digest, "size": size,
                   "annotations": {ANN_NYDUS_BOOTSTRAP: "true", ANN_NYDUS_FS_VERSION: "6"}})
    diff_ids.append(boot_diff)

    config = copy.deepcopy(source_config) if source_config else default_config()
    if not config.get("architecture"):
        plat = machine_platform()
        config["architecture"] = plat.architecture
        if plat.variant:
            config.setdefault("variant", plat.variant)
    if not config.get("os"):
        config["os"] = "linux"
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    # the source layers' history no longer matches: keep it as empty-layer entries, then
    # one entry per output layer, so history and diff_ids still line up
    history = [dict(h, empty_layer=True) for h in config.get("history") or []
               if isinstance(h, dict)]
    history += [{"created_by": "fscached-image convert", "comment": f"nydus blob {b}"}
                for b in blob_ids]
    history.append({"created_by": "fscached-image convert", "comment": "nydus bootstrap"})
    config["history"] = history
    cdigest, csize = put(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())

    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
                "layers": layers}
    mdigest, msize = put(json.dumps(manifest, indent=2).encode())
    platform_desc = {"architecture": config["architecture"], "os": config["os"]}
    if isinstance(config.get("variant"), str) and config["variant"]:
        platform_desc["variant"] = config["variant"]
    mdesc = {"mediaType": OCI_MANIFEST, "digest": mdigest, "size": msize, "platform": platform_desc}
    if ref_name:
        mdesc["annotations"] = {ANN_REF_NAME: ref_name}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [mdesc]}
    (oci_dir / "index.json").write_text(json.dumps(index, indent=2))
    (oci_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return mdigest
