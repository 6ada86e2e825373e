"""pull_bootstrap against a real docker-registry, with images built by fscached-image and pushed
by skopeo (and a few crafted by hand through the distribution API); plus image_ref parsing."""
import asyncio
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from registry_server import TEST_PASSWORD as PASSWORD, TEST_USER as USER
from fetcher.image_ref import DOCKER_HUB_HOST, ImageRef, check_reference, parse_image_ref
from fetcher.pull import PullError, PullIntegrityError, PulledImage, pull_bootstrap
from fetcher.registry import RegistrySource
from fetcher.source import IntegrityError, SourceError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
BOOT_ANN = "containerd.io/snapshot/nydus-bootstrap"

@pytest.fixture
def skopeo() -> None:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo not installed (make deps installs it)")


needs_skopeo = pytest.mark.usefixtures("skopeo")


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------- image_ref
def test_parse_image_ref():
    d = "sha256:" + "ab" * 32
    assert parse_image_ref("127.0.0.1:5000/app/web:v1") == ImageRef("127.0.0.1:5000", "app/web", "v1")
    host, repo, ref = parse_image_ref("127.0.0.1:5000/app")
    assert (host, repo, ref) == ("127.0.0.1:5000", "app", "latest")
    assert parse_image_ref(f"reg.example.com/a/b/c@{d}") == ImageRef("reg.example.com", "a/b/c", d)
    r = parse_image_ref(f"reg.example.com/a:v2@{d}")
    assert (r.reference, r.tag, r.is_digest) == (d, "v2", True)
    assert str(r) == f"reg.example.com/a@{d}"
    assert parse_image_ref("localhost/x:y") == ImageRef("localhost", "x", "y")
    assert parse_image_ref("[::1]:5000/x") == ImageRef("[::1]:5000", "x", "latest")
    # Docker Hub style names
    assert parse_image_ref("alpine") == ImageRef(DOCKER_HUB_HOST, "library/alpine", "latest")
    assert parse_image_ref("someone/tool:1.0") == ImageRef(DOCKER_HUB_HOST, "someone/tool", "1.0")
    assert parse_image_ref("docker.io/alpine:3") == ImageRef(DOCKER_HUB_HOST, "library/alpine", "3")


@pytest.mark.parametrize("bad, why", [
    ("", "empty"),
    ("https://r.io/a:b", "no scheme"),
    ("r.io/App:b", "invalid repository"),
    ("r.io/a:", "invalid tag"),
    ("r.io/a:-x", "invalid tag"),
    ("r.io/a@sha256:abc", "invalid digest"),
    ("r.io/a@sha512:" + "0" * 128, "only sha256"),
    ("r.io/a@latest", "sha256"),
    ("r.io:0/a", "invalid port"),
    ("r.io:http/a", "invalid port"),
    ("r.io/", "no repository"),
    ("r_io:5000/a", "invalid registry host"),
    ("r.io/a b", "whitespace"),
    ("r.io/a@x@y", "more than one"),
])
def test_parse_image_ref_errors(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_image_ref(bad)


def test_check_reference():
    d = "sha256:" + "0" * 64
    assert check_reference("v1.2_x-y") == "v1.2_x-y"
    assert check_reference("@" + d) == d
    for bad in ("", "a/b", "sha256:XYZ", "x" * 129, ".hidden"):
        with pytest.raises(ValueError):
            check_reference(bad)


# ------------------------------------------------------------------------------- helpers
def build_image(root: Path, files: dict[str, bytes]) -> Path:
    from erofs_image.builder import convert

    src = root / "src"
    src.mkdir(parents=True)
    for name, data in files.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    out = root / "out"
    convert(src, out, compressor="zstd", progress=False)
    return out


def layout_tag(oci: Path) -> str:
    index = json.loads((oci / "index.json").read_text())
    return index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]


def skopeo_push(oci: Path, reg, dest: str) -> None:
    cmd = ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{oci}:{layout_tag(oci)}",
           f"docker://{reg.host}/{dest}"]
    if reg.users:
        user, pw = next(iter(reg.users.items()))
        cmd[2:2] = ["--dest-creds", f"{user}:{pw}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def put_manifest(reg, repo: str, ref: str, manifest: dict | bytes, media_type: str = OCI_MANIFEST) -> str:
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest, indent=2).encode()
    with reg._request("PUT", f"{reg.url}/v2/{repo}/manifests/{ref}", data=body,
                      headers={"Content-Type": media_type}) as resp:
        assert resp.status == 201, resp.status
    return "sha256:" + hashlib.sha256(body).hexdigest()


def tar_gz(entries: list[tuple[str, bytes | None, str | None]]) -> bytes:
    """entries: (name, data for a file | None, symlink target | None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, link in entries:
            ti = tarfile.TarInfo(name)
            if link is not None:
                ti.type, ti.linkname = tarfile.SYMTYPE, link
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


def push_crafted(reg, repo: str, tag: str, layers: list[tuple[bytes, str, dict | None]]) -> str:
    """Push blobs + an OCI manifest: layers = [(bytes, mediaType, annotations)]."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    cdigest = reg.push_blob(repo, config)
    descs = []
    for data, mt, ann in layers:
        d = {"mediaType": mt, "digest": "sha256:" + reg.push_blob(repo, data), "size": len(data)}
        if ann:
            d["annotations"] = ann
        descs.append(d)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": f"sha256:{cdigest}", "size": len(config)},
                "layers": descs}
    return put_manifest(reg, repo, tag, manifest)


def storage_blob(reg, digest: str) -> Path:
    hexd = digest.split(":")[-1]
    return reg.workdir / "storage" / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def source(reg, repo: str, **kw) -> RegistrySource:
    if reg.users and "username" not in kw:
        kw["username"], kw["password"] = USER, PASSWORD
    return RegistrySource(reg.host, repo, scheme=reg.scheme, retries=1, backoff=0.01, **kw)


def pull(reg, repo: str, ref: str, dest: Path, **kw) -> PulledImage:
    async def main():
        async with source(reg, repo, **kw) as src:
            return await pull_bootstrap(src, ref, dest)
    return run(main())


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def nydus_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("nydus-image")
    files = {"hello.txt": b"hello world\n", "dir/data.bin": os.urandom(300_000),
             "dir/big.bin": os.urandom(1_500_000)}  # two chunks
    return build_image(root, files)


@pytest.fixture(scope="module")
def pushed(registry, nydus_image):
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo not installed (make deps installs it)")
    skopeo_push(nydus_image / "oci", registry, "nydus/app:latest")
    return registry


def expected_manifest_digest(out: Path) -> str:
    return json.loads((out / "oci" / "index.json").read_text())["manifests"][0]["digest"]


def check_pulled(p: PulledImage, out: Path, dest: Path) -> None:
    mdigest = expected_manifest_digest(out)
    assert p.manifest_digest == mdigest
    assert p.bootstrap == dest / f"{mdigest.split(':')[1]}.boot"
    assert p.bootstrap.read_bytes() == (out / "image.boot").read_bytes()
    assert sorted(p.blob_ids) == sorted(f.name for f in (out / "blobs").iterdir())
    assert len(p.layers) == len(p.blob_ids) + 1
    assert [f for f in dest.iterdir() if f.name.startswith(".")] == []  # no temporaries left


# ------------------------------------------------------------------------------- pulls
@needs_skopeo
def test_pull_by_tag_and_by_digest(pushed, nydus_image, tmp_path):
    p = pull(pushed, "nydus/app", "latest", tmp_path / "a")
    check_pulled(p, nydus_image, tmp_path / "a")
    # the bootstrap reads as the image that was built
    from erofs_image.reader import Bootstrap
    assert sorted(b.blob_id for b in Bootstrap.open(p.bootstrap).blobs) == sorted(p.blob_ids)

    q = pull(pushed, "nydus/app", p.manifest_digest, tmp_path / "b")
    check_pulled(q, nydus_image, tmp_path / "b")
    assert pull(pushed, "nydus/app", "@" + p.manifest_digest, tmp_path / "b").bootstrap == q.bootstrap


@needs_skopeo
def test_existing_bootstrap_is_reused_and_a_broken_one_replaced(pushed, nydus_image, tmp_path):
    p = pull(pushed, "nydus/app", "latest", tmp_path)
    ino = p.bootstrap.stat().st_ino
    assert pull(pushed, "nydus/app", "latest", tmp_path).bootstrap.stat().st_ino == ino  # not rewritten
    p.bootstrap.write_bytes(b"garbage" * 1000)
    again = pull(pushed, "nydus/app", "latest", tmp_path)
    assert again.bootstrap.read_bytes() == (nydus_image / "image.boot").read_bytes()


def platform_twins(reg, out: Path, repo: str, archs: list[str]) -> dict[str, str]:
    """One manifest per architecture, all for the pushed nydus image (same layers; an annotation
    makes each digest differ): arch -> manifest digest."""
    mdesc = json.loads((out / "oci" / "index.json").read_text())["manifests"][0]
    base = json.loads((out / "oci" / "blobs" / "sha256" / mdesc["digest"][7:]).read_bytes())
    twins = {}
    for arch in archs:
        m = dict(base, annotations={"test.platform": arch})
        twins[arch] = put_manifest(reg, repo, f"twin-{arch.replace('/', '-')}", m)
    return twins


def index_of(twins: dict[str, str], entries: list[str | None]) -> dict:
    """An OCI index: one entry per platform string ("linux/arm/v7", "unknown/unknown" for an
    attestation, None for an entry without a platform)."""
    manifests = []
    for plat in entries:
        key = plat or "none"
        d = {"mediaType": OCI_MANIFEST, "digest": twins[key], "size": 1}
        if plat is not None:
            parts = plat.split("/")
            d["platform"] = {"os": parts[0], "architecture": parts[1]}
            if len(parts) == 3:
                d["platform"]["variant"] = parts[2]
        manifests.append(d)
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}


@pytest.fixture(scope="module")
def twins(pushed, nydus_image):
    keys = ["linux/amd64", "linux/arm64", "linux/s390x", "linux/arm/v6", "linux/arm/v7",
            "unknown/unknown", "none"]
    return platform_twins(pushed, nydus_image, "nydus/app", keys)


@needs_skopeo
@pytest.mark.parametrize("machine, expect", [("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"),
                                             ("armv7l", "linux/arm/v7"), ("armv6l", "linux/arm/v6"),
                                             (None, None)])
def test_pull_through_an_index_picks_the_machines_platform(pushed, nydus_image, twins, tmp_path,
                                                           monkeypatch, machine, expect):
    """An index with arm64 + amd64 (+ arm variants and an attestation) entries: the pull takes
    the running machine's (machine None: this very machine, not patched)."""
    import platform

    from erofs_image.oci_media import machine_platform

    if machine is not None:
        monkeypatch.setattr(platform, "machine", lambda: machine)
    else:
        expect = str(machine_platform())
        if expect not in twins:
            pytest.skip(f"no twin for this machine's platform {expect}")
    index = index_of(twins, ["unknown/unknown", "linux/arm/v6", "linux/arm64", "linux/amd64",
                             "linux/arm/v7", "linux/s390x"])
    idigest = put_manifest(pushed, "nydus/app", "multi", index, OCI_INDEX)
    for ref in ("multi", idigest):
        dest = tmp_path / ref.replace(":", "_")
        q = pull(pushed, "nydus/app", ref, dest)
        assert q.manifest_digest == twins[expect], ref
        assert q.bootstrap == dest / f"{twins[expect][7:]}.boot"
        assert q.bootstrap.read_bytes() == (nydus_image / "image.boot").read_bytes()


@needs_skopeo
def test_pull_index_fallbacks_and_foreign_platforms(pushed, twins, tmp_path, monkeypatch):
    import platform

    from erofs_image.oci_media import Platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")

    def put(tag, entries):
        put_manifest(pushed, "nydus/app", tag, index_of(twins, entries), OCI_INDEX)

    # only foreign platforms: an error naming what the index has (attestations are not images)
    put("foreign", ["linux/arm64", "linux/s390x", "unknown/unknown"])
    with pytest.raises(PullError, match=r"nydus/app:foreign: index sha256:\w+: 2 manifests and none "
                                        r"for linux/amd64 \(linux/arm64, linux/s390x\)"):
        pull(pushed, "nydus/app", "foreign", tmp_path / "none")
    put("arm-only", ["linux/arm64"])  # a single entry of another platform is not taken either
    with pytest.raises(PullError, match=r"nydus/app:arm-only: index sha256:\w+: 1 manifest and none "
                                        r"for linux/amd64 \(linux/arm64\)"):
        pull(pushed, "nydus/app", "arm-only", tmp_path / "none")
    assert not (tmp_path / "none").exists() or list((tmp_path / "none").iterdir()) == []
    # ... but it is on its own machine, or when asked for
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert pull(pushed, "nydus/app", "arm-only", tmp_path / "a").manifest_digest == twins["linux/arm64"]

    async def main():
        async with source(pushed, "nydus/app") as src:
            return await pull_bootstrap(src, "foreign", tmp_path / "s", platform=Platform.parse("linux/s390x"))
    assert run(main()).manifest_digest == twins["linux/s390x"]
    # an entry that says nothing about its platform, alone: taken
    put("no-platform", [None, "unknown/unknown"])
    assert pull(pushed, "nydus/app", "no-platform", tmp_path / "n").manifest_digest == twins["none"]
    # arm: a v7 machine runs v6 images, a v6 machine not v7 ones
    put("arm6", ["linux/arm/v6", "linux/amd64"])
    monkeypatch.setattr(platform, "machine", lambda: "armv7l")
    assert pull(pushed, "nydus/app", "arm6", tmp_path / "v6").manifest_digest == twins["linux/arm/v6"]
    put("arm7", ["linux/arm/v7", "linux/arm64"])
    monkeypatch.setattr(platform, "machine", lambda: "armv6l")
    with pytest.raises(PullError, match=r"none for linux/arm/v6 \(linux/arm/v7, linux/arm64\)"):
        pull(pushed, "nydus/app", "arm7", tmp_path / "v7")


def test_missing_tag_repo_and_digest(registry, tmp_path):
    with pytest.raises(PullError, match=rf"registry {registry.host}/nydus/app:nope: manifest: not found \(HTTP 404"):
        pull(registry, "nydus/app", "nope", tmp_path)
    with pytest.raises(PullError, match=r"no/such-repo:latest: manifest: not found \(HTTP 404"):
        pull(registry, "no/such-repo", "latest", tmp_path)
    digest = "sha256:" + "0" * 64
    with pytest.raises(PullError, match=rf"nydus/app@{digest}: manifest: not found \(HTTP 404"):
        pull(registry, "nydus/app", digest, tmp_path)
    with pytest.raises(PullError, match="invalid tag"):
        pull(registry, "nydus/app", "../../x", tmp_path)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


@needs_skopeo
def test_plain_oci_image_is_not_nydus(registry, tmp_path):
    # a plain OCI layout, written by hand, pushed by skopeo
    oci = tmp_path / "plain"
    (oci / "blobs" / "sha256").mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        h = hashlib.sha256(data).hexdigest()
        (oci / "blobs" / "sha256" / h).write_bytes(data)
        return "sha256:" + h, len(data)

    layer = tar_gz([("etc/hostname", b"plain\n", None), ("bin/sh", b"\x7fELF not really", None)])
    ldigest, lsize = put(layer)
    cdigest, csize = put(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()]}}).encode())
    mdigest, msize = put(json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                     "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
                                     "layers": [{"mediaType": TAR_GZ, "digest": ldigest, "size": lsize}]}).encode())
    (oci / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (oci / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": mdigest, "size": msize,
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    skopeo_push(oci, registry, "plain/img:v1")
    dest = tmp_path / "dest"
    with pytest.raises(PullError, match=rf"plain/img:v1: not a nydus image: no layer is annotated {BOOT_ANN}=true "
                                        rf"and the last layer \({ldigest}, {re.escape(TAR_GZ)}\) holds no image/image.boot"):
        pull(registry, "plain/img", "v1", dest)
    assert [f.name for f in dest.iterdir()] == []  # temporaries removed


def test_unannotated_last_layer_holding_a_bootstrap(registry, nydus_image, tmp_path):
    boot = (nydus_image / "image.boot").read_bytes()
    blob_ids = sorted(f.name for f in (nydus_image / "blobs").iterdir())
    layers = [((nydus_image / "blobs" / b).read_bytes(), "application/vnd.oci.image.layer.nydus.blob.v1", None)
              for b in blob_ids]
    layers.append((tar_gz([("./image/image.boot", boot, None)]), TAR_GZ, None))
    mdigest = push_crafted(registry, "crafted/unannotated", "v1", layers)
    p = pull(registry, "crafted/unannotated", "v1", tmp_path)
    assert p.manifest_digest == mdigest
    assert p.bootstrap.read_bytes() == boot
    assert p.blob_ids == blob_ids


@pytest.mark.parametrize("case", ["corrupt-gzip", "symlink", "no-entry", "not-erofs", "twice"])
def test_bad_bootstrap_layers(registry, nydus_image, tmp_path, case):
    boot = (nydus_image / "image.boot").read_bytes()
    layer = {
        "corrupt-gzip": b"\x1f\x8b\x08\x00" + os.urandom(2000),
        "symlink": tar_gz([("image/image.boot", None, "/etc/passwd")]),
        "no-entry": tar_gz([("image/other", b"x", None), ("../escape", b"y", None)]),
        "not-erofs": tar_gz([("image/image.boot", b"\0" * 8192, None)]),
        "twice": tar_gz([("image/image.boot", boot, None), ("image/image.boot", boot, None)]),
    }[case]
    push_crafted(registry, f"crafted/{case}", "v1", [(layer, TAR_GZ, {BOOT_ANN: "true"})])
    why = {"corrupt-gzip": "corrupt gzip layer: ReadError", "symlink": "image/image.boot is not a regular file",
           "no-entry": "the tar holds no image/image.boot", "not-erofs": r"image/image.boot is not an EROFS \(RAFS v6\) bootstrap: bad magic",
           "twice": "image/image.boot appears twice in the tar"}[case]
    with pytest.raises(PullError, match=rf"crafted/{case}:v1: bootstrap layer sha256:\w+: {why}"):
        pull(registry, f"crafted/{case}", "v1", tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path.parent / "escape").exists()


def test_layer_digest_mismatch(registry, nydus_image, tmp_path):
    boot = (nydus_image / "image.boot").read_bytes()
    layer = tar_gz([("image/image.boot", boot, None), ("image/pad", os.urandom(64), None)])
    push_crafted(registry, "crafted/mismatch", "v1", [(layer, TAR_GZ, {BOOT_ANN: "true"})])
    ldigest = "sha256:" + hashlib.sha256(layer).hexdigest()
    data = storage_blob(registry, ldigest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different bytes, as stored by the registry
    data.write_bytes(bytes(raw))
    with pytest.raises(PullIntegrityError, match=rf"crafted/mismatch:v1: bootstrap layer {ldigest}: digest "
                                                 rf"mismatch: expected {ldigest}, got sha256:\w+") as ei:
        pull(registry, "crafted/mismatch", "v1", tmp_path)
    assert isinstance(ei.value, IntegrityError) and isinstance(ei.value, SourceError)
    assert list(tmp_path.iterdir()) == []


def test_manifest_digest_mismatch(registry, nydus_image, tmp_path):
    boot = (nydus_image / "image.boot").read_bytes()
    mdigest = push_crafted(registry, "crafted/mdigest", "v1",
                           [(tar_gz([("image/image.boot", boot, None)]), TAR_GZ, {BOOT_ANN: "true"})])
    data = storage_blob(registry, mdigest)
    body = data.read_bytes()
    data.write_bytes(body.replace(b"\n  ", b"\n\t", 1))  # same JSON, other bytes
    with pytest.raises(PullIntegrityError, match=rf"crafted/mdigest@{mdigest}: manifest: digest mismatch: "
                                                 rf"asked for {mdigest}, the bytes received are sha256:"):
        pull(registry, "crafted/mdigest", mdigest, tmp_path)


# ------------------------------------------------------------------------------- auth
@needs_skopeo
def test_pull_with_basic_auth(auth_registry, nydus_image, tmp_path):
    skopeo_push(nydus_image / "oci", auth_registry, "nydus/secure:latest")
    p = pull(auth_registry, "nydus/secure", "latest", tmp_path / "ok")
    check_pulled(p, nydus_image, tmp_path / "ok")
    with pytest.raises(PullError, match=rf"nydus/secure:latest: manifest: .*401.*for user '{USER}': "
                                        "credentials rejected") as ei:
        pull(auth_registry, "nydus/secure", "latest", tmp_path / "bad", username=USER, password="wrong")
    assert "wrong" not in str(ei.value) and PASSWORD not in str(ei.value)
    with pytest.raises(PullError, match=r"401.*anonymous.*none are configured"):
        pull(auth_registry, "nydus/secure", "latest", tmp_path / "anon", username=None, password=None)


# ------------------------------------------------------------------------------- transport
@needs_skopeo
def test_retries_redirects_and_credentials_only_to_the_registry(pushed, nydus_image, tmp_path):
    """Through an aiohttp front: it wants Basic auth itself, fails the first manifest and blob
    GETs with 503, and redirects blob GETs to a second front standing in for object storage."""
    from frontserver import FrontServer

    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

    def front_behaviour(storage):
        async def behaviour(front, request):
            from aiohttp import web

            if not request.headers.get("Authorization", "").startswith("Basic "):
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="front"'})
            kind = "manifest" if "/manifests/" in request.path else "blob" if "/blobs/" in request.path else "other"
            seen = front.state.setdefault(kind, 0)
            front.state[kind] = seen + 1
            if seen == 0 and kind != "other":
                return web.Response(status=503, headers={"Retry-After": "0"})
            if kind == "blob":
                return web.Response(status=307, headers={"Location": f"{storage.url}{request.path}?X-Sig=secret"})
            return None
        return behaviour

    async def main():
        async with FrontServer(pushed.url, upstream_headers=accept) as storage:
            async with FrontServer(pushed.url, front_behaviour(storage), upstream_headers=accept) as front:
                src = RegistrySource(front.host, "nydus/app", scheme="http", username="u", password="p",
                                     retries=2, backoff=0.01)
                async with src:
                    p = await pull_bootstrap(src, "latest", tmp_path)
                return p, front, storage

    p, front, storage = run(main())
    check_pulled(p, nydus_image, tmp_path)
    assert front.state == {"manifest": 2, "blob": 2}
    assert storage.count("/v2/nydus/app/blobs/") == 1
    assert all("Authorization" not in headers for _m, _p, headers in storage.requests)


def test_always_failing_registry_gives_up(registry, tmp_path):
    from frontserver import FrontServer

    async def behaviour(front, request):
        from aiohttp import web

        return web.Response(status=500)

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, "x/y", scheme="http", retries=2, backoff=0.01) as src:
                with pytest.raises(PullError, match=r"x/y:latest: manifest: giving up after 3 attempts: .*HTTP 500"):
                    await pull_bootstrap(src, "latest", tmp_path)
            return front.count("/v2/x/y/manifests/")
    assert run(main()) == 3


# ------------------------------------------------------------------------------- one HTTP client
def test_pull_has_no_http_machinery_of_its_own():
    """pull.py goes through RegistrySource.get: no private attributes of the source, no retry,
    backoff, redirect or Authorization handling of its own."""
    import ast

    import fetcher.pull as pull_module

    text = Path(pull_module.__file__).read_text()
    tree = ast.parse(text)
    private = sorted({f"{ast.unparse(n.value)}.{n.attr}" for n in ast.walk(tree)
                      if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                      and ast.unparse(n.value) != "self"})
    assert private == [], private
    for banned in ("Authorization", "allow_redirects", "Retry-After", "retry_after", "asyncio.sleep",
                   "random", "backoff", "Location", "on_unauthorized", "ClientSession", "session"):
        assert banned not in text, banned


@needs_skopeo
def test_pull_through_token_auth_retry_after_and_storage_redirect(pushed, nydus_image, tmp_path, caplog):
    """A Bearer front (token realm wanting basic credentials) that answers the first manifest
    and blob GETs 503 with Retry-After and redirects blobs to a storage front with a signed URL:
    the pull succeeds through the source's own client (its retry counter moves, one token
    serves every request, Retry-After is waited), and neither the token nor the credentials
    reach the storage host or the logs."""
    import base64
    import logging
    import time

    from aiohttp import web

    from frontserver import FrontServer

    caplog.set_level(logging.DEBUG)
    accept = {"Accept": OCI_MANIFEST}
    user, password = "puller", "s3cret-Pa55"
    good = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def front_behaviour(storage):
        async def behaviour(front, request):
            st = front.state
            if request.path == "/token":
                if request.headers.get("Authorization") != good:
                    return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
                st["issued"] = st.get("issued", 0) + 1
                return web.json_response({"token": f"tok-{st['issued']}-xyzzy", "expires_in": 300})
            if not request.headers.get("Authorization", "").startswith("Bearer tok-"):
                return web.Response(status=401, headers={"WWW-Authenticate":
                                    f'Bearer realm="http://{front.host}/token",service="front"'})
            kind = "manifest" if "/manifests/" in request.path else "blob" if "/blobs/" in request.path else "other"
            seen = st.setdefault(kind, 0)
            st[kind] = seen + 1
            if seen == 0 and kind != "other":
                return web.Response(status=503, headers={"Retry-After": "1" if kind == "manifest" else "0"})
            if kind == "blob":
                return web.Response(status=307, headers={"Location": f"{storage.url}{request.path}?X-Sig=signature42"})
            return None
        return behaviour

    async def main():
        async with FrontServer(pushed.url, upstream_headers=accept) as storage:
            async with FrontServer(pushed.url, front_behaviour(storage), upstream_headers=accept) as front:
                src = RegistrySource(front.host, "nydus/app", scheme="http", username=user, password=password,
                                     retries=2, backoff=0.01)
                async with src:
                    t0 = time.monotonic()
                    p = await pull_bootstrap(src, "latest", tmp_path)
                    elapsed = time.monotonic() - t0
                    stats = dict(src.stats)
                return p, front, storage, stats, elapsed

    p, front, storage, stats, elapsed = run(main())
    check_pulled(p, nydus_image, tmp_path)
    assert front.state["manifest"] == 2 and front.state["blob"] == 2
    assert front.state["issued"] == 1  # one token for the manifest and the blob
    assert stats["retries"] == 2  # counted by the source: its retry loop did the work
    assert elapsed >= 0.95  # Retry-After: 1 was honoured
    assert storage.count("/v2/nydus/app/blobs/") == 1
    assert all("Authorization" not in headers for _m, _p, headers in storage.requests)
    for secret in (password, good[6:], "xyzzy", "signature42"):
        assert secret not in caplog.text, secret


def test_pull_request_errors_name_the_request(registry, tmp_path):
    """Final failures of the source's client come back as PullError naming the image and the
    request: a 403 with the distribution error code, a redirect loop."""
    from aiohttp import web

    from frontserver import FrontServer

    async def behaviour(front, request):
        if "/manifests/forbidden" in request.path:
            return web.json_response({"errors": [{"code": "DENIED"}]}, status=403)
        if "/manifests/loop" in request.path:
            return web.Response(status=302, headers={"Location": request.path})
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, "x/y", scheme="http", retries=2, backoff=0.01) as src:
                with pytest.raises(PullError, match=r"x/y:forbidden: manifest: HTTP 403 forbidden at "
                                                    r"http://127.0.0.1:\d+/v2/x/y/manifests/forbidden: DENIED$"):
                    await pull_bootstrap(src, "forbidden", tmp_path)
                with pytest.raises(PullError, match=r"x/y:loop: manifest: more than 5 redirects$"):
                    await pull_bootstrap(src, "loop", tmp_path)
                assert src.stats["retries"] == 0  # final, not retried
    run(main())
