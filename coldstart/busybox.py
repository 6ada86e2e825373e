"""Debian's busybox-static, the one binary the snapshotter harness's small images are made of:
the CRI sandbox ("pause") image and the root filesystems of test images.

    bb = busybox_binary()                       # <cache>/busybox, from `apt-get download`
    layout = pause_layout()                     # <cache>/pause-oci: an OCI layout, tag TAG
    busybox_rootfs(dest, {"etc/hello": b"hi\\n"}, applets=("sh", "cat"))

Only Debian's package registry is asked, through apt (`apt-get download busybox-static`, the
package is never installed): the .deb is unpacked with `dpkg-deb -x` and only its /bin/busybox
is kept. The cache is `$FSCACHED_BUSYBOX_CACHE`, else /var/cache/fscached/pause, outside the
checkout; each entry is built in a staging directory under a lock and renamed into place when
complete, so an interrupted build is never taken for a finished one.

The pause image: one gzip layer holding /bin/busybox and /bin/sleep (a symlink to it), config
`Entrypoint ["/bin/sleep", "infinity"]`, `PATH=/bin`: what a CRI sandbox needs (a process that
waits), a few hundred KiB.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from coldstart import ColdstartError, run

DEFAULT_CACHE = Path("/var/cache/fscached/pause")
PACKAGE = "busybox-static"
TAG = "latest"  # the tag inside the layouts written here
PAUSE_ENTRYPOINT = ["/bin/sleep", "infinity"]
LAYOUT_VERSION = "1"  # bump when the pause image's recipe changes


def cache_root() -> Path:
    return Path(os.environ.get("FSCACHED_BUSYBOX_CACHE") or DEFAULT_CACHE)


@contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def busybox_binary(cache: Path | None = None) -> Path:
    """Debian's static busybox, downloaded (not installed) and unpacked once into the cache."""
    root = cache or cache_root()
    final = root / "busybox"
    with _locked(root, "busybox"):
        if final.is_file() and os.access(final, os.X_OK):
            return final
        stage = Path(tempfile.mkdtemp(prefix=".stage-busybox-", dir=root))
        try:
            run(["apt-get", "download", "-q", PACKAGE], f"apt-get download {PACKAGE}", cwd=stage, timeout=600)
            debs = sorted(stage.glob(f"{PACKAGE}_*.deb"))
            if len(debs) != 1:
                raise ColdstartError(f"apt-get download {PACKAGE} left {len(debs)} .deb files in {stage}, not one")
            run(["dpkg-deb", "-x", str(debs[0]), str(stage / "x")], f"dpkg-deb -x {debs[0].name}", timeout=120)
            binary = stage / "x" / "bin" / "busybox"
            if not binary.is_file():
                raise ColdstartError(f"{debs[0].name} has no /bin/busybox")
            out = run([str(binary), "--list"], f"{binary} --list", timeout=30).split()
            if "sleep" not in out or "sh" not in out:
                raise ColdstartError(f"{debs[0].name}: its busybox has no sleep or sh applet")
            os.chmod(binary, 0o755)
            os.replace(binary, final)
            (root / f"{PACKAGE}.version").write_text(debs[0].name + "\n")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return final


def busybox_rootfs(dest: Path, files: Mapping[str, bytes] | None = None, *,
                   applets: Sequence[str] = ("sh", "cat", "sleep"), busybox: Path | None = None) -> Path:
    """A root filesystem directory at `dest`: /bin/busybox, /bin/<applet> symlinks to it, an
    empty /tmp (1777), and `files` (path inside the image -> content, mode 0644, parents made).
    Returns `dest`."""
    binary = busybox or busybox_binary()
    bindir = dest / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    (dest / "tmp").mkdir(exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy2(binary, bindir / "busybox")
    os.chmod(bindir / "busybox", 0o755)
    for applet in applets:
        (bindir / applet).symlink_to("busybox")
    for name, content in (files or {}).items():
        path = dest / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.chmod(path, 0o644)
    return dest


def _tar_of(src: Path) -> bytes:
    """A reproducible tar of the directory `src` (owner root, mtime 0, entries sorted)."""
    def fix(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        return ti

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, arcname=str(path.relative_to(src)), recursive=False, filter=fix)
    return buf.getvalue()


def write_single_layer_layout(dest: Path, rootfs: Path, *, entrypoint: Sequence[str] = (),
                              cmd: Sequence[str] = (), env: Sequence[str] = ("PATH=/bin",)) -> str:
    """An OCI image layout at `dest` (created) with one gzip layer made of `rootfs`, tag TAG;
    returns the manifest digest."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        hexd = hashlib.sha256(data).hexdigest()
        (blobs / hexd).write_bytes(data)
        return "sha256:" + hexd, len(data)

    raw = _tar_of(rootfs)
    layer, layer_size = put(gzip.compress(raw, compresslevel=9, mtime=0))
    config: dict[str, object] = {"Env": list(env)}
    if entrypoint:
        config["Entrypoint"] = list(entrypoint)
    if cmd:
        config["Cmd"] = list(cmd)
    cdigest, csize = put(json.dumps({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }, sort_keys=True).encode())
    mdigest, msize = put(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer,
                    "size": layer_size}],
    }, sort_keys=True).encode())
    (dest / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
                       "size": msize, "annotations": {"org.opencontainers.image.ref.name": TAG}}],
    }))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return mdigest


def pause_layout(cache: Path | None = None) -> Path:
    """The CRI sandbox image as an OCI layout (tag TAG) in the cache, built once."""
    root = cache or cache_root()
    binary = busybox_binary(root)
    final = root / f"pause-oci-{LAYOUT_VERSION}"
    with _locked(root, "pause-oci"):
        if (final / "index.json").is_file():
            return final
        stage = Path(tempfile.mkdtemp(prefix=".stage-pause-", dir=root))
        try:
            rootfs = busybox_rootfs(stage / "rootfs", applets=("sleep",), busybox=binary)
            write_single_layer_layout(stage / "oci", rootfs, entrypoint=PAUSE_ENTRYPOINT)
            os.rename(stage / "oci", final)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return final


__all__ = ["PAUSE_ENTRYPOINT", "TAG", "busybox_binary", "busybox_rootfs", "cache_root", "pause_layout",
           "write_single_layer_layout"]
