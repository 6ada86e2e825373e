"""`python -m erofs_image.demo`: the image format's own demo (whiteouts, an opaque directory,
deduplication), offline. `make demo` runs `coldstart.demo`, which serves a sample image lazily
and builds its layers with the OCI layout writers below.

1. Make an OCI image layout from a slice of this Python's site-packages (layer 1, plain tar),
   a gzip layer 2 that whites out a file and adds a duplicate (deduplicated) file, and a zstd
   layer 3 with an opaque directory.
2. Convert it with `fscached-image convert`, print the `inspect` summary.
3. `fscached-image cat` one file back and compare it with the source bytes.

The helpers that write OCI layouts and docker-save archives are also used by the tests.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterable

import zstandard

LAYER_MEDIA = {"": "application/vnd.oci.image.layer.v1.tar",
               "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


# --------------------------------------------------------------------------- tar helpers


def tar_bytes(entries: Iterable[tuple[tarfile.TarInfo, bytes | None]],
              fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            if ti.isreg():
                ti.size = len(data or b"")
                tf.addfile(ti, io.BytesIO(data or b""))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def entry(name: str, data: bytes | None = b"", type: bytes = tarfile.REGTYPE, mode: int = 0o644,
          mtime: int = 1_700_000_000, **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = type, mode, mtime
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti, data


def tar_directory(src: Path, prefix: str, limit: int | None = None) -> bytes:
    """A deterministic tar of `src` stored under `prefix/` (regular files, dirs, symlinks)."""
    return tar_bytes(directory_entries(src, prefix, limit))


def directory_entries(src: Path, prefix: str, limit: int | None = None) -> list:
    """Tar entries for `src` under `prefix/`, stopping after about `limit` bytes of files."""
    entries = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel = os.path.relpath(dirpath, src)
        base = prefix if rel == "." else f"{prefix}/{rel}"
        entries.append(entry(base + "/", None, tarfile.DIRTYPE, 0o755))
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                entries.append(entry(f"{base}/{name}", None, tarfile.SYMTYPE, 0o777,
                                     linkname=os.readlink(p)))
            elif os.path.isfile(p):
                data = Path(p).read_bytes()
                total += len(data)
                entries.append(entry(f"{base}/{name}", data, mode=0o644))
        if limit is not None and total >= limit:
            break
    return entries


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


# --------------------------------------------------------------------------- image writers


def _put(blobs: Path, data: bytes) -> str:
    hexd = hashlib.sha256(data).hexdigest()
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / hexd).write_bytes(data)
    return "sha256:" + hexd


def image_config(diff_ids: list[str]) -> dict:
    return {"architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"demo layer {i}"} for i in range(len(diff_ids))]}


def write_oci_layout(dest: Path, layers: list[tuple[bytes, str]], tag: str = "latest") -> str:
    """An OCI image layout at `dest` from (uncompressed tar, compression) pairs.

    Returns the manifest digest."""
    blobs = dest / "blobs" / "sha256"
    descs, diff_ids = [], []
    for raw, compression in layers:
        data = compress(raw, compression)
        descs.append({"mediaType": LAYER_MEDIA[compression], "digest": _put(blobs, data),
                      "size": len(data)})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    cfg = json.dumps(image_config(diff_ids)).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _put(blobs, cfg), "size": len(cfg)},
                "layers": descs}
    mdata = json.dumps(manifest).encode()
    mdigest = _put(blobs, mdata)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": mdigest, "size": len(mdata),
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return mdigest


def write_docker_archive(dest: Path, layers: list[bytes], new_format: bool = False) -> None:
    """A `docker save` archive: legacy (<id>/layer.tar) or docker 25+ (an OCI layout inside)."""
    members: list[tuple[str, bytes]] = []
    diff_ids = ["sha256:" + hashlib.sha256(raw).hexdigest() for raw in layers]
    cfg = json.dumps(image_config(diff_ids)).encode()
    cfg_hex = hashlib.sha256(cfg).hexdigest()
    if new_format:
        paths = [f"blobs/sha256/{d[7:]}" for d in diff_ids]
        cpath = f"blobs/sha256/{cfg_hex}"
        for p, raw in zip(paths, layers):
            members.append((p, raw))
        members.append((cpath, cfg))
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": "sha256:" + cfg_hex, "size": len(cfg)},
                    "layers": [{"mediaType": LAYER_MEDIA[""], "digest": d, "size": len(r)}
                               for d, r in zip(diff_ids, layers)]}
        mdata = json.dumps(manifest).encode()
        mhex = hashlib.sha256(mdata).hexdigest()
        members.append((f"blobs/sha256/{mhex}", mdata))
        members.append(("index.json", json.dumps(
            {"schemaVersion": 2, "manifests": [{"mediaType": manifest["mediaType"],
                                                "digest": "sha256:" + mhex,
                                                "size": len(mdata)}]}).encode()))
        members.append(("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'))
    else:
        paths = [f"{d[7:]}/layer.tar" for d in diff_ids]
        cpath = f"{cfg_hex}.json"
        members += list(zip(paths, layers)) + [(cpath, cfg)]
    members.append(("manifest.json", json.dumps(
        [{"Config": cpath, "RepoTags": ["demo:latest"], "Layers": paths}]).encode()))
    with tarfile.open(dest, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


# --------------------------------------------------------------------------- the demo


def _site_packages() -> Path:
    import rich

    return Path(rich.__file__).parent.parent


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erofs_image.cli", *args], **kw)


def main() -> int:
    t0 = time.monotonic()
    sp = _site_packages()
    with tempfile.TemporaryDirectory(prefix="fscached-demo-") as tmpdir:
        tmp = Path(tmpdir)
        print(f"[1/4] making an OCI image layout from {sp}/rich and {sp}/pygments (3 layers)")
        layer1 = tar_bytes(
            directory_entries(sp / "rich", "usr/lib/python3/site-packages/rich")
            + directory_entries(sp / "pygments", "usr/lib/python3/site-packages/pygments", 4 << 20))
        console_py = (sp / "rich" / "console.py").read_bytes()
        layer2 = tar_bytes([
            entry("usr/lib/python3/site-packages/rich/.wh.__main__.py"),
            entry("usr/lib/python3/site-packages/rich/console_copy.py", console_py),
            entry("etc/", None, tarfile.DIRTYPE, 0o755),
            entry("etc/motd", b"built by fscached-image demo\n"),
        ])
        layer3 = tar_bytes([
            entry("usr/lib/python3/site-packages/pygments/", None, tarfile.DIRTYPE, 0o755),
            entry("usr/lib/python3/site-packages/pygments/.wh..wh..opq"),
            entry("usr/lib/python3/site-packages/pygments/README", b"pygments was replaced\n"),
        ])
        src = tmp / "oci-src"
        write_oci_layout(src, [(layer1, ""), (layer2, "gzip"), (layer3, "zstd")])
        size = sum(f.stat().st_size for f in (src / "blobs" / "sha256").iterdir())
        print(f"      {src}: {size / 1e6:.1f} MB of blobs")

        out = tmp / "out"
        print(f"[2/4] fscached-image convert {src} {out}")
        r = _cli("convert", str(src), str(out), "--no-progress")
        if r.returncode:
            return r.returncode

        print(f"[3/4] fscached-image inspect {out}/image.boot (summary)")
        r = _cli("inspect", str(out / "image.boot"), "--json", capture_output=True)
        if r.returncode:
            sys.stderr.buffer.write(r.stderr)
            return r.returncode
        from .cli import print_summary

        summary = json.loads(r.stdout)
        paths = [e["path"] for e in summary["tree"]]
        print_summary(summary, tree=False)
        print(f"      {len(paths)} entries; e.g. {', '.join(paths[1:4])}, ...")
        gone = "/usr/lib/python3/site-packages/rich/__main__.py" not in paths
        replaced = [p for p in paths if p.startswith("/usr/lib/python3/site-packages/pygments/")]
        print(f"      whiteout applied: {gone}; opaque pygments/ now holds {replaced}")

        target = "/usr/lib/python3/site-packages/rich/console.py"
        print(f"[4/4] fscached-image cat {out}/image.boot {target} --blobs {out}/blobs")
        r = _cli("cat", str(out / "image.boot"), target, "--blobs", str(out / "blobs"),
                 capture_output=True)
        if r.returncode:
            sys.stderr.buffer.write(r.stderr)
            return r.returncode
        same = r.stdout == console_py
        print(f"      {len(r.stdout)} bytes, identical to {sp}/rich/console.py: {same}")
        ok = same and gone and replaced == ["/usr/lib/python3/site-packages/pygments/README"] \
            and summary["dedup_ratio"] > 1
        print(f"demo {'OK' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
