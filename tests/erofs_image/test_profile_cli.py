"""fscached-image profile push / attach / show and convert --profile, run as a user would: a
real image converted, pushed by skopeo to a real docker-registry, the profile pushed next to it
and read back with fetcher.referrers.fetch_profile."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from registry_server import TEST_PASSWORD as PASSWORD, TEST_USER as USER
from erofs_image.profile import MEDIA_TYPE, ProfileRange, StartupProfile, bootstrap_digest

PREFIX = "fscached-image: error: "
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DATA = os.urandom(600_000)


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erofs_image.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, **kw)


def assert_one_line_error(r, *needles, code=1):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.startswith(PREFIX) and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def make_profile(boot: Path, path: Path, *, digest: str | None = None, past_end: bool = False,
                 image: str = "test") -> bytes:
    from erofs_image.reader import Bootstrap

    blobs = Bootstrap.open(boot).blobs
    b = blobs[0]
    ranges = [ProfileRange(b.blob_id, 0, 4096, 2), ProfileRange(b.blob_id, 65536, 10_000, 7)]
    if past_end:
        ranges.append(ProfileRange(b.blob_id, b.uncompressed_size - 10, 4096, 9))
    data = StartupProfile(digest or bootstrap_digest(boot), ranges, 4.5, image).to_json()
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("profile-src") / "src"
    (d / "bin").mkdir(parents=True)
    (d / "bin/tool").write_bytes(DATA)
    (d / "etc").mkdir()
    (d / "etc/conf").write_text("x = 1\n")
    return d


@pytest.fixture
def built(src, tmp_path) -> Path:
    out = tmp_path / "out"
    r = run("convert", src, out, "-q")
    assert r.returncode == 0, r.stderr
    return out


def layout_files(oci: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (oci / "blobs/sha256").iterdir()} | \
        {"index.json": (oci / "index.json").read_bytes()}


# -- show ----------------------------------------------------------------------------------------
def test_show(built, tmp_path):
    prof = tmp_path / "p.json"
    make_profile(built / "image.boot", prof)
    r = run("profile", "show", prof, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    from erofs_image.reader import Bootstrap

    blob = Bootstrap.open(built / "image.boot").blobs[0].blob_id
    assert s["ranges"] == 2 and s["bytes"] == 14096 and (s["first_at_ms"], s["last_at_ms"]) == (2, 7)
    assert s["bootstrap_digest"] == bootstrap_digest(built / "image.boot") and s["image"] == "test"
    assert s["blobs"] == [{"blob": blob, "ranges": 2, "bytes": 14096, "first_at_ms": 2, "last_at_ms": 7}]
    r = run("profile", "show", prof)
    assert r.returncode == 0, r.stderr
    assert "ranges     2, 14096 bytes" in r.stdout and "2 ms .. 7 ms" in r.stdout and blob in r.stdout
    empty = tmp_path / "empty.json"
    empty.write_bytes(StartupProfile("sha256:" + "0" * 64).to_json())
    r = run("profile", "show", empty, "--json")
    assert json.loads(r.stdout)["first_at_ms"] is None and json.loads(r.stdout)["blobs"] == []


@pytest.mark.parametrize("content, needle", [
    (None, "No such file"),
    (b"{not json", "not JSON"),
    (b'{"format": "other"}', "not a start-up profile"),
    (b'{"format": "fscached-startup-profile", "version": 2}', "version 2"),
])
def test_show_bad_profile(tmp_path, content, needle):
    prof = tmp_path / "p.json"
    if content is not None:
        prof.write_bytes(content)
    assert_one_line_error(run("profile", "show", prof), str(prof), needle)


def test_usage_errors(tmp_path):
    r = run("profile")
    assert r.returncode == 2 and r.stderr.startswith(PREFIX) and r.stderr.count("\n") == 1
    r = run("profile", "push", tmp_path / "p.json", "r.io/a:b", "--creds", "u:p", "--auth-file", tmp_path)
    assert_one_line_error(r, "not allowed with", code=2)
    prof = tmp_path / "p.json"
    prof.write_bytes(StartupProfile("sha256:" + "0" * 64).to_json())
    assert_one_line_error(run("profile", "push", prof, "r.io/App:b"), "invalid repository", code=2)
    assert_one_line_error(run("profile", "push", prof, "r.io/a:b", "--creds", "nocolon"), "USER:PASSWORD", code=2)
    assert_one_line_error(run("profile", "push", prof, "r.io/a:b", "--platform", "linux"), "--platform", code=2)


# -- attach and convert --profile ---------------------------------------------------------------
def test_attach_writes_a_valid_layout(built, tmp_path):
    prof = tmp_path / "p.json"
    data = make_profile(built / "image.boot", prof)
    oci = built / "oci"
    before = json.loads((oci / "index.json").read_text())
    r = run("profile", "attach", prof, built)
    assert r.returncode == 0, r.stderr
    artifact = r.stdout.split()[-1]
    index = json.loads((oci / "index.json").read_text())
    assert index["manifests"][0] == before["manifests"][0]  # the image entry, its tag, untouched
    entry = index["manifests"][1]
    assert (entry["digest"], entry["artifactType"], entry["mediaType"]) == (artifact, MEDIA_TYPE, OCI_MANIFEST)
    assert "org.opencontainers.image.ref.name" not in entry.get("annotations", {})
    # every blob of the layout is named by its digest; the artifact points at the image
    for p in (oci / "blobs/sha256").iterdir():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, p
    m_bytes = (oci / "blobs/sha256" / artifact[7:]).read_bytes()
    assert len(m_bytes) == entry["size"]
    m = json.loads(m_bytes)
    image = before["manifests"][0]
    assert m["subject"] == {"mediaType": OCI_MANIFEST, "digest": image["digest"], "size": image["size"]}
    assert m["artifactType"] == MEDIA_TYPE and m["config"]["size"] == 2
    assert (oci / "blobs/sha256" / m["config"]["digest"][7:]).read_bytes() == b"{}"
    layer = m["layers"][0]
    assert (oci / "blobs/sha256" / layer["digest"][7:]).read_bytes() == data and layer["size"] == len(data)
    # skopeo still reads the image by its tag
    if shutil.which("skopeo"):
        r2 = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{oci}:latest"], capture_output=True, text=True)
        assert r2.returncode == 0, r2.stderr
        assert hashlib.sha256(r2.stdout.encode()).hexdigest() == image["digest"][7:]
    # attaching again (another profile) keeps the first
    prof2 = tmp_path / "p2.json"
    make_profile(built / "image.boot", prof2, image="again")
    r = run("profile", "attach", prof2, built, "-q")
    assert r.returncode == 0 and r.stdout == ""
    digests = [m["digest"] for m in json.loads((oci / "index.json").read_text())["manifests"]]
    assert digests[:2] == [image["digest"], artifact] and len(digests) == 3


def test_attach_refuses_a_foreign_profile(built, tmp_path):
    before = layout_files(built / "oci")
    prof = tmp_path / "p.json"
    make_profile(built / "image.boot", prof, digest="sha256:" + "ab" * 32)
    assert_one_line_error(run("profile", "attach", prof, built), "recorded on bootstrap sha256:abab")
    make_profile(built / "image.boot", prof, past_end=True)
    assert_one_line_error(run("profile", "attach", prof, built), "ends past blob")
    assert layout_files(built / "oci") == before  # nothing written


def test_attach_refuses_a_layout_of_another_bootstrap(built, src, tmp_path):
    other = tmp_path / "other"
    (tmp_path / "src2").mkdir()
    (tmp_path / "src2/f").write_bytes(os.urandom(200_000))
    assert run("convert", tmp_path / "src2", other, "-q").returncode == 0
    shutil.copy(other / "image.boot", built / "image.boot")  # image.boot no longer what oci/ holds
    prof = tmp_path / "p.json"
    make_profile(built / "image.boot", prof)
    assert_one_line_error(run("profile", "attach", prof, built), "its bootstrap layer holds bootstrap")
    assert_one_line_error(run("profile", "attach", prof, tmp_path / "nothing"), "not a convert output")


def test_convert_with_profile(src, built, tmp_path):
    prof = tmp_path / "p.json"
    data = make_profile(built / "image.boot", prof)  # convert is deterministic: same bootstrap
    out = tmp_path / "again"
    r = run("convert", src, out, "--profile", prof)
    assert r.returncode == 0, r.stderr
    assert f"profile    {prof} attached" in r.stdout
    index = json.loads((out / "oci/index.json").read_text())
    assert [m.get("artifactType") for m in index["manifests"]] == [None, MEDIA_TYPE]
    m = json.loads((out / "oci/blobs/sha256" / index["manifests"][1]["digest"][7:]).read_bytes())
    assert (out / "oci/blobs/sha256" / m["layers"][0]["digest"][7:]).read_bytes() == data
    # a profile of another image: one line, exit 1, no OUTDIR left behind
    bad = tmp_path / "bad.json"
    make_profile(built / "image.boot", bad, digest="sha256:" + "cd" * 32)
    out2 = tmp_path / "refused"
    assert_one_line_error(run("convert", src, out2, "--profile", bad), "recorded on bootstrap sha256:cdcd")
    assert not out2.exists()
    # an empty OUTDIR given by the user stays, empty
    out3 = tmp_path / "empty"
    out3.mkdir()
    assert_one_line_error(run("convert", src, out3, "--profile", bad), "recorded on bootstrap")
    assert out3.is_dir() and not any(out3.iterdir())
    # an unreadable profile fails before converting
    assert_one_line_error(run("convert", src, out2, "--profile", tmp_path / "missing.json"), "missing.json")
    assert not out2.exists()


# -- push ----------------------------------------------------------------------------------------
def fetch(reg, repo: str, digest: str) -> bytes | None:
    from fetcher.referrers import fetch_profile
    from fetcher.registry import RegistrySource

    kw = {"username": USER, "password": PASSWORD} if reg.users else {}

    async def main():
        async with RegistrySource(reg.host, repo, scheme="http", **kw) as src:
            return await fetch_profile(src, digest)
    return asyncio.run(main())


def status(reg, path: str) -> int:
    try:
        with reg._request("GET", f"{reg.url}/v2/{path}") as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_push(registry, built, tmp_path):
    digest = registry.skopeo_push(built / "oci", "cli/app:v1")
    prof = tmp_path / "p.json"
    data = make_profile(built / "image.boot", prof)
    r = run("profile", "push", prof, f"{registry.host}/cli/app:v1", "--plain-http")
    assert r.returncode == 0, r.stderr
    artifact = r.stdout.strip()
    assert artifact.startswith("sha256:") and len(artifact) == 71 and r.stderr == ""
    assert fetch(registry, "cli/app", digest) == data
    # by digest, a second profile: both kept, the newest read
    prof2 = tmp_path / "p2.json"
    data2 = make_profile(built / "image.boot", prof2, image="second")
    r = run("profile", "push", prof2, f"{registry.host}/cli/app@{digest}", "--plain-http")
    assert r.returncode == 0, r.stderr
    with registry._request("GET", f"{registry.url}/v2/cli/app/manifests/sha256-{digest[7:]}",
                           headers={"Accept": OCI_INDEX}) as resp:
        index = json.loads(resp.read())
    assert [m["digest"] for m in index["manifests"]] == [artifact, r.stdout.strip()]
    assert fetch(registry, "cli/app", digest) == data2


def test_push_refuses_a_foreign_profile(registry, built, tmp_path):
    digest = registry.skopeo_push(built / "oci", "cli/refused:v1")
    prof = tmp_path / "p.json"
    data = make_profile(built / "image.boot", prof, digest="sha256:" + "ef" * 32)
    r = run("profile", "push", prof, f"{registry.host}/cli/refused:v1", "--plain-http")
    assert_one_line_error(r, "recorded on bootstrap sha256:efef", "cli/refused:v1")
    make_profile(built / "image.boot", prof, past_end=True)
    r = run("profile", "push", prof, f"{registry.host}/cli/refused:v1", "--plain-http")
    assert_one_line_error(r, "ends past blob")
    # nothing pushed: no fallback tag, no profile blob
    assert status(registry, f"cli/refused/manifests/sha256-{digest[7:]}") == 404
    assert status(registry, f"cli/refused/blobs/sha256:{hashlib.sha256(data).hexdigest()}") == 404
    assert fetch(registry, "cli/refused", digest) is None


def test_push_errors(registry, built, tmp_path):
    prof = tmp_path / "p.json"
    make_profile(built / "image.boot", prof)
    r = run("profile", "push", prof, f"{registry.host}/cli/missing:v1", "--plain-http")
    assert_one_line_error(r, "cli/missing:v1", "not found (HTTP 404")
    # https to a plain-http registry: one line, exit 1
    r = run("profile", "push", prof, f"{registry.host}/cli/missing:v1")
    assert_one_line_error(r, registry.host)
    assert_one_line_error(run("profile", "push", tmp_path / "nope.json", f"{registry.host}/x:y", "--plain-http"),
                          "nope.json")


def test_push_with_credentials(auth_registry, built, tmp_path):
    reg = auth_registry
    digest = reg.skopeo_push(built / "oci", "cli/auth:v1")
    prof = tmp_path / "p.json"
    data = make_profile(built / "image.boot", prof)
    ref = f"{reg.host}/cli/auth:v1"
    r = run("profile", "push", prof, ref, "--plain-http")
    assert_one_line_error(r, "401")
    assert fetch(reg, "cli/auth", digest) is None
    r = run("profile", "push", prof, ref, "--plain-http", "--creds", f"{USER}:wrong")
    assert_one_line_error(r, "401")
    assert "wrong" not in r.stderr
    r = run("profile", "push", prof, ref, "--plain-http", "--creds", f"{USER}:{PASSWORD}")
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    assert fetch(reg, "cli/auth", digest) == data
    # --auth-file: the daemon's base64 form, and a containers auth.json
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    plain = tmp_path / "auth"
    plain.write_text(b64 + "\n")
    data2 = make_profile(built / "image.boot", prof, image="via auth file")
    r = run("profile", "push", prof, ref, "--plain-http", "--auth-file", plain)
    assert r.returncode == 0, r.stderr
    assert fetch(reg, "cli/auth", digest) == data2
    authjson = tmp_path / "auth.json"
    authjson.write_text(json.dumps({"auths": {"other.example": {"auth": "eDp5"}, reg.host: {"auth": b64}}}))
    data3 = make_profile(built / "image.boot", prof, image="via auth.json")
    r = run("profile", "push", prof, ref, "--plain-http", "--auth-file", authjson)
    assert r.returncode == 0, r.stderr
    assert fetch(reg, "cli/auth", digest) == data3
    authjson.write_text(json.dumps({"auths": {"other.example": {"auth": b64}}}))
    assert_one_line_error(run("profile", "push", prof, ref, "--plain-http", "--auth-file", authjson),
                          f"no credentials for {reg.host}")
    plain.write_text("not base64!")
    assert_one_line_error(run("profile", "push", prof, ref, "--plain-http", "--auth-file", plain),
                          "base64")
