"""convert() on OCI layouts / docker-save archives, checked with the reader, the kernel
(file-backed EROFS mount), fsck.erofs and skopeo."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from erofs_image.builder import BuildError, convert
from erofs_image.demo import entry, tar_bytes, write_docker_archive, write_oci_layout
from erofs_image.reader import Bootstrap
from erofs_image.tree import lookup, walk

MiB = 1 << 20
BIG = bytes(range(256)) * (3 * MiB // 256) + b"\0" * MiB + b"end"  # 3 chunks + hole + tail
LONG_PAX = "usr/share/" + "p" * 120 + "/" + "q" * 140 + ".txt"
LONG_GNU = "usr/gnu/" + "g" * 200 + "/" + "h" * 100


def layers() -> list[tuple[bytes, str]]:
    xt, xd = entry("etc/xattr", b"with xattrs", mode=0o600)
    xt.pax_headers = {"SCHILY.xattr.user.color": "blue", "SCHILY.xattr.trusted.t": "x",
                      "mtime": "1700000001.5"}
    l1 = tar_bytes([
        entry("./", None, tarfile.DIRTYPE, 0o755),
        entry("etc/", None, tarfile.DIRTYPE, 0o755),
        entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        (xt, xd),
        entry("etc/gone", b"whited out"),
        entry("bin/", None, tarfile.DIRTYPE, 0o755),
        entry("bin/busybox", BIG, mode=0o755, uid=1000, gid=1000),
        entry("bin/sh", None, tarfile.LNKTYPE, linkname="bin/busybox"),
        entry("bin/ls", None, tarfile.SYMTYPE, 0o777, linkname="busybox"),
        entry("dev/", None, tarfile.DIRTYPE, 0o755),
        entry("dev/null", None, tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
        entry("dev/fifo", None, tarfile.FIFOTYPE, 0o644),
        entry("opq/", None, tarfile.DIRTYPE, 0o755),
        entry("opq/lower", b"lower"),
        entry("opq/sub/", None, tarfile.DIRTYPE, 0o755),
        entry("opq/sub/deep", b"deep"),
        entry("var/", None, tarfile.DIRTYPE, 0o755),
        entry("var/lib/", None, tarfile.DIRTYPE, 0o755),
        entry("var/lib/db", b"db"),
        entry(LONG_PAX, b"pax long name"),
    ])
    l2 = tar_bytes([
        entry("etc/.wh.gone"),
        entry("opq/", None, tarfile.DIRTYPE, 0o700),
        entry("opq/.wh..wh..opq"),
        entry("opq/upper", b"upper"),
        entry("usr/", None, tarfile.DIRTYPE, 0o755),
        entry("usr/bin/", None, tarfile.DIRTYPE, 0o755),
        entry("usr/bin/sh", None, tarfile.LNKTYPE, linkname="bin/busybox"),  # across layers
        entry("etc/copy", BIG),  # deduplicated against layer 1
    ])
    l3 = tar_bytes([
        entry(".wh.var"),
        entry(LONG_GNU, b"gnu long name"),
        entry("etc/passwd", b"root:x:0:0::/root:/bin/bash\n", mode=0o644),
    ], fmt=tarfile.GNU_FORMAT)
    return [(l1, ""), (l2, "gzip"), (l3, "zstd")]


# expected merged tree: path -> content (bytes), "dir", ("sym", target), "fifo", ("chr", rdev)
EXPECTED = {
    "etc": "dir", "etc/passwd": b"root:x:0:0::/root:/bin/bash\n", "etc/xattr": b"with xattrs",
    "etc/copy": BIG, "bin": "dir", "bin/busybox": BIG, "bin/sh": BIG, "bin/ls": ("sym", b"busybox"),
    "dev": "dir", "dev/null": ("chr", os.makedev(1, 3)), "dev/fifo": "fifo",
    "opq": "dir", "opq/upper": b"upper", "usr": "dir", "usr/bin": "dir", "usr/bin/sh": BIG,
    "usr/share": "dir", LONG_PAX.rsplit("/", 1)[0]: "dir", LONG_PAX: b"pax long name",
    "usr/gnu": "dir", LONG_GNU.rsplit("/", 1)[0]: "dir", LONG_GNU: b"gnu long name",
}


def _parents(rel):
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def materialize(dest: Path) -> None:
    """Write EXPECTED to `dest` (regular files, dirs and symlinks; specials are checked apart)."""
    for rel, what in sorted(EXPECTED.items()):
        p = dest / rel
        if what == "dir":
            p.mkdir(parents=True, exist_ok=True)
        elif isinstance(what, bytes):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(what)
        elif what[0] == "sym":
            p.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(what[1], p)


@pytest.fixture(scope="module")
def oci_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "oci"
    write_oci_layout(src, layers())
    return src


def check_bootstrap(out: Path) -> Bootstrap:
    bs = Bootstrap.open(out / "image.boot")
    got = {p.decode()[1:]: n for p, n in walk(bs.image.root) if p != b"/"}
    assert sorted(got) == sorted(EXPECTED)
    for rel, what in EXPECTED.items():
        n = got[rel]
        if what == "dir":
            assert n.is_dir, rel
        elif isinstance(what, bytes):
            assert n.is_reg and bs.read_file(n, out / "blobs") == what, rel
        elif what[0] == "sym":
            assert n.is_symlink and n.target == what[1]
        elif what[0] == "chr":
            assert stat.S_ISCHR(n.mode) and n.rdev == what[1]
        elif what == "fifo":
            assert stat.S_ISFIFO(n.mode)
    bb = got["bin/busybox"]
    assert got["bin/sh"].nid == bb.nid == got["usr/bin/sh"].nid  # hard links, across layers
    assert (bb.uid, bb.gid, stat.S_IMODE(bb.mode)) == (1000, 1000, 0o755)
    x = got["etc/xattr"]
    assert x.xattrs == {b"user.color": b"blue", b"trusted.t": b"x"}
    assert (x.mtime, x.mtime_nsec, stat.S_IMODE(x.mode)) == (1_700_000_001, 500_000_000, 0o600)
    assert stat.S_IMODE(got["opq"].mode) == 0o700
    return bs


@pytest.mark.parametrize("compressor", ["none", "zstd", "lz4_block"])
def test_convert_three_layers(oci_src, tmp_path, compressor):
    out = tmp_path / "out"
    rep = convert(oci_src, out, compressor=compressor, progress=False)
    assert rep.source_kind == "oci-layout" and rep.layers == 3 and len(rep.blobs) == 3
    assert rep.deduped >= 3  # etc/copy's chunks were all stored by layer 1
    assert sorted(p.name for p in out.iterdir()) == ["blobs", "image.boot", "oci"]
    assert sorted(p.name for p in (out / "blobs").iterdir()) == sorted(b.blob_id for b in rep.blobs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dir left
    check_bootstrap(out)


def _oci_layout_checks(out: Path, blob_ids: list[str]) -> None:
    index = json.loads((out / "oci" / "index.json").read_text())
    mdesc = index["manifests"][0]
    blobs = out / "oci" / "blobs" / "sha256"
    manifest = json.loads((blobs / mdesc["digest"][7:]).read_text())
    cfg = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    ls = manifest["layers"]
    assert [x["digest"][7:] for x in ls[:-1]] == blob_ids
    for x in ls[:-1]:
        assert x["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1"
        assert x["annotations"] == {"containerd.io/snapshot/nydus-blob": "true"}
    meta = ls[-1]
    assert meta["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert meta["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    assert meta["annotations"]["containerd.io/snapshot/nydus-fs-version"] == "6"
    with tarfile.open(blobs / meta["digest"][7:], "r:gz") as tf:
        assert tf.extractfile("image/image.boot").read() == (out / "image.boot").read_bytes()
    assert cfg["rootfs"]["diff_ids"][:-1] == [x["digest"] for x in ls[:-1]]
    assert cfg["config"]["Cmd"] == ["/bin/sh"]  # source config kept


@pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo not installed")
def test_output_layout_nydus_convention_and_skopeo(oci_src, tmp_path):
    out = tmp_path / "out"
    rep = convert(oci_src, out, compressor="zstd", progress=False)
    _oci_layout_checks(out, [b.blob_id for b in rep.blobs])
    r = subprocess.run(["skopeo", "inspect", f"oci:{out}/oci"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["Layers"]) == 4
    # a full copy makes skopeo check every blob's digest and size
    r = subprocess.run(["skopeo", "copy", f"oci:{out}/oci:latest", f"dir:{tmp_path}/copy"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _mount(boot: Path, blobs: list[Path], mnt: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    opts = ",".join(f"device={b}" for b in blobs).encode()
    if libc.mount(str(boot).encode(), str(mnt).encode(), b"erofs", 1, opts) != 0:  # MS_RDONLY
        err = ctypes.get_errno()
        pytest.fail(f"mount {boot}: {os.strerror(err)}")


@contextmanager
def mounted(out: Path, blob_ids: list[str], mnt: Path):
    mnt.mkdir()
    _mount(out / "image.boot", [out / "blobs" / b for b in blob_ids], mnt)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_kernel_mount_diff_and_fsck(oci_src, tmp_path):
    out = tmp_path / "out"
    rep = convert(oci_src, out, compressor="none", progress=False)
    ids = [b.blob_id for b in rep.blobs]
    expected = tmp_path / "expected"
    materialize(expected)
    with mounted(out, ids, tmp_path / "mnt") as mnt:
        r = subprocess.run(["diff", "-r", "--no-dereference", "-x", "null", "-x", "fifo",
                            str(expected), str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert sorted(os.listdir(mnt / "dev")) == ["fifo", "null"]
        assert os.lstat(mnt / "dev/null").st_rdev == os.makedev(1, 3)
        assert stat.S_ISFIFO(os.lstat(mnt / "dev/fifo").st_mode)
        bb = os.lstat(mnt / "bin/busybox")
        assert bb.st_nlink == 3 and os.lstat(mnt / "usr/bin/sh").st_ino == bb.st_ino
        assert (bb.st_uid, bb.st_gid) == (1000, 1000)
        x = os.lstat(mnt / "etc/xattr")
        assert x.st_mtime_ns == 1_700_000_001_500_000_000 and stat.S_IMODE(x.st_mode) == 0o600
        assert os.getxattr(mnt / "etc/xattr", "user.color") == b"blue"
    r = subprocess.run(["fsck.erofs", *[f"--device={out}/blobs/{b}" for b in ids],
                        str(out / "image.boot")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("new_format", [False, True])
def test_docker_save_archives(tmp_path, new_format):
    raws = [raw for raw, _ in layers()]  # docker save layers are plain tars
    arc = tmp_path / "image.tar"
    write_docker_archive(arc, raws, new_format=new_format)
    out = tmp_path / "out"
    rep = convert(arc, out, compressor="zstd", progress=False)
    assert rep.source_kind == "docker-archive" and rep.layers == 3
    check_bootstrap(out)
    cfg_layers = json.loads((out / "oci/index.json").read_text())
    assert cfg_layers["manifests"]


@pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo not installed")
@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_skopeo_made_oci_layout(tmp_path, fmt):
    arc = tmp_path / "image.tar"
    write_docker_archive(arc, [raw for raw, _ in layers()])
    src = tmp_path / "skopeo-oci"
    r = subprocess.run(["skopeo", "copy", "--dest-compress", "--dest-compress-format", fmt,
                        f"docker-archive:{arc}", f"oci:{src}:latest"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    convert(src, out, compressor="zstd", progress=False)
    check_bootstrap(out)
    if fmt == "zstd":
        return  # docker archives cannot hold zstd layers
    # and skopeo's own docker-archive writer, from skopeo's layout
    arc2 = tmp_path / "skopeo-docker.tar"
    r = subprocess.run(["skopeo", "copy", f"oci:{src}:latest", f"docker-archive:{arc2}:x:latest"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    convert(arc2, tmp_path / "out2", progress=False)
    check_bootstrap(tmp_path / "out2")


def test_nested_index_picks_linux_amd64(tmp_path, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")  # the machine's platform is taken
    src = tmp_path / "oci"
    write_oci_layout(src, [(tar_bytes([entry("amd64", b"yes")]), "gzip")])
    index = json.loads((src / "index.json").read_text())
    inner = dict(index["manifests"][0], platform={"os": "linux", "architecture": "amd64"})
    other = dict(inner, platform={"os": "linux", "architecture": "arm64"},
                 digest="sha256:" + "0" * 64)
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": [other, inner]}).encode()
    import hashlib

    h = hashlib.sha256(nested).hexdigest()
    (src / "blobs/sha256" / h).write_bytes(nested)
    (src / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:" + h,
         "size": len(nested)}]}))
    out = tmp_path / "out"
    convert(src, out, progress=False)
    bs = Bootstrap.open(out / "image.boot")
    assert bs.read_file(lookup(bs.image.root, b"/amd64"), out / "blobs") == b"yes"


# -- platform choice (erofs_image.oci_media, shared with fetcher.pull) --------------------------

def multi_platform_layout(src: Path, plats: list[str | None]) -> None:
    """An OCI layout whose index.json lists one image per platform string ("linux/arm/v7";
    None: an entry without a platform); each image holds one file named after its platform."""
    descs = []
    for plat in plats:
        name = (plat or "none").replace("/", "-")
        write_oci_layout(src, [(tar_bytes([entry(name, name.encode())]), "gzip")])
        d = json.loads((src / "index.json").read_text())["manifests"][0]
        d.pop("annotations", None)
        if plat is not None:
            parts = plat.split("/")
            d["platform"] = {"os": parts[0], "architecture": parts[1], **({"variant": parts[2]} if len(parts) > 2 else {})}
        descs.append(d)
    (src / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": descs,
                                                "mediaType": "application/vnd.oci.image.index.v1+json"}))


def converted_files(out: Path) -> dict[str, bytes]:
    bs = Bootstrap.open(out / "image.boot")
    return {p.decode()[1:]: bs.read_file(n, out / "blobs") for p, n in walk(bs.image.root) if n.is_reg}


@pytest.mark.parametrize("machine, expect", [("x86_64", "linux-amd64"), ("aarch64", "linux-arm64"),
                                             ("armv7l", "linux-arm-v7"), ("s390x", "linux-s390x"),
                                             (None, None)])
def test_index_picks_the_machines_platform(tmp_path, monkeypatch, machine, expect):
    import platform

    from erofs_image.oci_media import machine_platform

    plats = ["unknown/unknown", "linux/arm64", "linux/arm/v6", "linux/amd64", "linux/arm/v7", "linux/s390x"]
    if machine is not None:
        monkeypatch.setattr(platform, "machine", lambda: machine)
    else:  # this machine, not patched
        expect = str(machine_platform()).replace("/", "-")
        if str(machine_platform()) not in plats:
            pytest.skip(f"no image for this machine's platform {machine_platform()}")
    src = tmp_path / "oci"
    multi_platform_layout(src, plats)
    convert(src, tmp_path / "out", progress=False)
    assert converted_files(tmp_path / "out") == {expect: expect.encode()}


def test_index_with_only_foreign_platforms_names_them(tmp_path, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    src = tmp_path / "oci"
    multi_platform_layout(src, ["linux/arm64", "unknown/unknown", "linux/s390x"])
    with pytest.raises(BuildError, match=rf"{src}: index.json: 2 manifests and none for linux/amd64 "
                                         r"\(linux/arm64, linux/s390x\)"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    one = tmp_path / "one"
    multi_platform_layout(one, ["linux/arm64"])  # a single foreign entry is not taken either
    with pytest.raises(BuildError, match=r"index.json: 1 manifest and none for linux/amd64 \(linux/arm64\)"):
        convert(one, tmp_path / "out", progress=False)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # on its own machine it is
    convert(one, tmp_path / "out", progress=False)
    assert converted_files(tmp_path / "out") == {"linux-arm64": b"linux-arm64"}
    none = tmp_path / "none"
    multi_platform_layout(none, [None, "unknown/unknown"])  # one image that does not say: taken
    convert(none, tmp_path / "out-none", progress=False)
    assert converted_files(tmp_path / "out-none") == {"none": b"none"}


def test_plain_directory_output_says_the_machines_platform(oci_src, tmp_path, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")

    def platform_of(out: Path) -> tuple[dict, str]:
        mdesc = json.loads((out / "oci" / "index.json").read_text())["manifests"][0]
        blobs = out / "oci" / "blobs" / "sha256"
        cfg_digest = json.loads((blobs / mdesc["digest"][7:]).read_text())["config"]["digest"]
        return mdesc["platform"], json.loads((blobs / cfg_digest[7:]).read_text())["architecture"]

    convert(tree, tmp_path / "out", progress=False)
    assert platform_of(tmp_path / "out") == ({"os": "linux", "architecture": "arm64"}, "arm64")
    convert(oci_src, tmp_path / "out2", progress=False)  # a source image keeps its own
    assert platform_of(tmp_path / "out2") == ({"os": "linux", "architecture": "amd64"}, "amd64")


@pytest.mark.parametrize("machine, want", [
    ("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"), ("arm64", "linux/arm64"),
    ("armv7l", "linux/arm/v7"), ("armv6l", "linux/arm/v6"), ("armv8l", "linux/arm/v7"),
    ("ppc64le", "linux/ppc64le"), ("s390x", "linux/s390x"), ("riscv64", "linux/riscv64"),
    ("i686", "linux/386"), ("Weird9", "linux/weird9"),
])
def test_machine_platform_goarch_names(machine, want):
    from erofs_image.oci_media import machine_platform

    assert str(machine_platform(machine)) == want


def test_choose_manifest_rules():
    from erofs_image.oci_media import Platform, PlatformError, choose_manifest

    def idx(*plats, **extra):
        out = []
        for i, p in enumerate(plats):
            d = {"digest": f"d{i}"}
            if p is not None:
                parts = p.split("/")
                d["platform"] = {"os": parts[0], "architecture": parts[1],
                                 **({"variant": parts[2]} if len(parts) > 2 else {})}
            out.append(d)
        return {"manifests": out, **extra}

    P = Platform.parse
    assert P("linux/arm64/v8") == P("linux/arm64") == Platform("linux", "arm64")
    with pytest.raises(ValueError, match="os/architecture"):
        P("amd64")
    pick = lambda index, want: choose_manifest(index, P(want))["digest"]  # noqa: E731
    assert pick(idx("linux/arm64/v8", "linux/amd64"), "linux/arm64") == "d0"
    assert pick(idx("linux/amd64/v3", "linux/amd64"), "linux/amd64") == "d1"  # plain before a variant
    assert pick(idx("linux/amd64/v3"), "linux/amd64") == "d0"  # accepted when nothing plainer
    assert pick(idx("linux/arm", "linux/arm/v7"), "linux/arm/v7") == "d1"  # exact variant first
    assert pick(idx("linux/arm/v5", "linux/arm", "linux/arm/v6"), "linux/arm/v7") == "d1"
    assert pick(idx("linux/arm/v5", "linux/arm/v6"), "linux/arm/v7") == "d1"  # the closest older one
    assert pick(idx("windows/amd64", "linux/amd64"), "linux/amd64") == "d1"
    assert pick(idx("linux/amd64", "linux/amd64"), "linux/amd64") == "d0"  # ties: index order
    attest = idx("linux/amd64", "linux/arm64")
    attest["manifests"][1]["annotations"] = {"vnd.docker.reference.type": "attestation-manifest"}
    with pytest.raises(PlatformError, match=r"^1 manifest and none for linux/arm64 \(linux/amd64\)$"):
        choose_manifest(attest, P("linux/arm64"))
    with pytest.raises(PlatformError, match=r"none for linux/arm/v6 \(linux/arm/v7\)"):
        choose_manifest(idx("linux/arm/v7"), P("linux/arm/v6"))
    with pytest.raises(PlatformError, match=r"2 manifests and none for linux/amd64 \(unspecified\)"):
        choose_manifest(idx(None, None), P("linux/amd64"))
    with pytest.raises(PlatformError, match="lists no manifests"):
        choose_manifest({"manifests": []}, P("linux/amd64"))
    with pytest.raises(PlatformError, match="only attestations"):
        choose_manifest(idx("unknown/unknown"), P("linux/amd64"))


def test_corrupted_blob_digest_mismatch(tmp_path):
    src = tmp_path / "oci"
    write_oci_layout(src, [(tar_bytes([entry("a", b"x" * 5000)]), "")])
    cfg_and_layers = sorted((src / "blobs/sha256").iterdir(), key=lambda p: -p.stat().st_size)
    layer = cfg_and_layers[0]
    data = bytearray(layer.read_bytes())
    data[600] ^= 1  # inside file data: the tar still parses, only the digest catches it
    layer.write_bytes(bytes(data))
    with pytest.raises(BuildError, match=f"{layer.name}: digest mismatch"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_outdir(oci_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(BuildError, match="not empty"):
        convert(oci_src, out, progress=False)
    assert (out / "x").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(oci_src, empty, progress=False)  # an existing empty dir is fine
    assert (empty / "image.boot").is_file()
