"""fetcher.referrers against a real docker-registry (Distribution 2.8: no referrers API, so the
`sha256-<hex>` fallback tag), with images built by fscached-image and pushed by skopeo; a small
front server plays a Bearer-token registry and an OCI 1.1 registry with the referrers API."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import urllib.error
from pathlib import Path

import pytest

from aiohttp import web

from frontserver import FrontServer
from registry_server import TEST_PASSWORD as PASSWORD, TEST_USER as USER
from fetcher.referrers import (ANN_BOOTSTRAP, bootstrap_tag, fetch_profile_for_bootstrap, ANN_CREATED, EMPTY_DATA, EMPTY_DIGEST,
                               ReferrerError, fallback_tag, fetch_profile, manifest_descriptor,
                               profile_artifact, push_profile)
from fetcher.registry import RegistrySource
from fetcher.source import IntegrityError, SourceError
from erofs_image.profile import MEDIA_TYPE, ProfileRange, StartupProfile, bootstrap_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def run(coro):
    return asyncio.run(coro)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A converted image (OUT dir) and a profile recorded on it (two versions)."""
    from erofs_image.builder import convert
    from erofs_image.reader import Bootstrap

    root = tmp_path_factory.mktemp("ref-image")
    src = root / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(1_500_000))
    (src / "small.txt").write_bytes(b"hello\n")
    out = root / "out"
    convert(src, out, compressor="zstd", progress=False)
    boot = out / "image.boot"
    blob = Bootstrap.open(boot).blobs[0]
    digest = bootstrap_digest(boot)
    p1 = StartupProfile(digest, [ProfileRange(blob.blob_id, 0, 65536, 3)], 5.0, "first").to_json()
    p2 = StartupProfile(digest, [ProfileRange(blob.blob_id, 4096, 8192, 1),
                                 ProfileRange(blob.blob_id, 1 << 20, 4096, 40)], 9.0, "second").to_json()
    return out, p1, p2


def pushed(reg, image, repo: str) -> str:
    """Push the image to `repo`:v1 with skopeo; returns its manifest digest."""
    return reg.skopeo_push(image[0] / "oci", f"{repo}:v1")


def source(reg, repo: str, **kw) -> RegistrySource:
    if reg.users and "username" not in kw:
        kw.update(username=USER, password=PASSWORD)
    return RegistrySource(reg.host, repo, scheme="http", backoff=0.01, **kw)


async def push(reg, repo: str, digest: str, profile: bytes, **kw) -> str:
    async with source(reg, repo, **kw) as src:
        _, desc = await manifest_descriptor(src, digest)
        assert desc["mediaType"] == OCI_MANIFEST and desc["digest"] == digest
        return await push_profile(src, digest, desc["mediaType"], desc["size"], profile)


async def fetch(reg, repo: str, digest: str, **kw) -> bytes | None:
    async with source(reg, repo, **kw) as src:
        return await fetch_profile(src, digest)


def get_json(reg, repo: str, ref: str, accept: str = OCI_INDEX) -> dict:
    with reg._request("GET", f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept}) as resp:
        return json.loads(resp.read())


def get_status(reg, path: str) -> int:
    try:
        with reg._request("GET", f"{reg.url}/v2/{path}") as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def put_manifest(reg, repo: str, ref: str, body: bytes, media_type: str) -> str:
    with reg._request("PUT", f"{reg.url}/v2/{repo}/manifests/{ref}", data=body,
                      headers={"Content-Type": media_type}) as resp:
        assert resp.status == 201
    return "sha256:" + hashlib.sha256(body).hexdigest()


def blob_file(reg, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return reg.workdir / "storage/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


# -- the artifact --------------------------------------------------------------------------------
def test_artifact_shape():
    assert EMPTY_DIGEST == "sha256:" + hashlib.sha256(EMPTY_DATA).hexdigest() and EMPTY_DATA == b"{}"
    subject = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 123}
    body, desc = profile_artifact(b'{"x":1}', subject, "sha256:" + "2" * 64, created="2026-01-02T03:04:05Z")
    m = json.loads(body)
    assert m["mediaType"] == OCI_MANIFEST and m["artifactType"] == MEDIA_TYPE
    assert m["config"] == {"mediaType": "application/vnd.oci.empty.v1+json", "digest": EMPTY_DIGEST, "size": 2}
    assert [(layer["mediaType"], layer["digest"], layer["size"]) for layer in m["layers"]] == [
        (MEDIA_TYPE, "sha256:" + hashlib.sha256(b'{"x":1}').hexdigest(), 7)]
    assert m["subject"] == subject
    assert m["annotations"] == {ANN_CREATED: "2026-01-02T03:04:05Z", ANN_BOOTSTRAP: "sha256:" + "2" * 64}
    assert desc == {"mediaType": OCI_MANIFEST, "artifactType": MEDIA_TYPE, "size": len(body),
                    "digest": "sha256:" + hashlib.sha256(body).hexdigest(), "annotations": m["annotations"]}
    assert fallback_tag("sha256:" + "ab" * 32) == "sha256-" + "ab" * 32


# -- a real registry, fallback tag ---------------------------------------------------------------
def test_no_profile_is_none(registry, image):
    digest = pushed(registry, image, "ref/none")
    assert run(fetch(registry, "ref/none", digest)) is None
    # a digest the repository does not know: no referrers either
    assert run(fetch(registry, "ref/none", "sha256:" + "0" * 64)) is None
    # a fallback index with only other artifact types: still none
    foreign = put_foreign_referrer(registry, "ref/none", digest)
    assert get_json(registry, "ref/none", fallback_tag(digest))["manifests"][0]["digest"] == foreign
    assert run(fetch(registry, "ref/none", digest)) is None


def put_foreign_referrer(reg, repo: str, subject: str, index_extra: list | None = None) -> str:
    """Another tool's referrer (an SBOM-like artifact) in the fallback index, by hand."""
    reg.push_blob(repo, EMPTY_DATA)
    layer = b'{"sbom": true}'
    reg.push_blob(repo, layer)
    sub = get_json(reg, repo, subject, OCI_MANIFEST)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": EMPTY_DIGEST, "size": 2},
                "layers": [{"mediaType": "application/spdx+json", "size": len(layer),
                            "digest": "sha256:" + hashlib.sha256(layer).hexdigest()}],
                "subject": {"mediaType": OCI_MANIFEST, "digest": subject,
                            "size": len(json.dumps(sub, indent=2))}}
    body = json.dumps(manifest).encode()
    digest = put_manifest(reg, repo, "sha256:" + hashlib.sha256(body).hexdigest(), body, OCI_MANIFEST)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        *(index_extra or []),
        {"mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json", "digest": digest, "size": len(body)}]}
    put_manifest(reg, repo, fallback_tag(subject), json.dumps(index).encode(), OCI_INDEX)
    return digest


def test_push_then_fetch_exact_bytes(registry, image):
    _, p1, _ = image
    digest = pushed(registry, image, "ref/one")
    assert get_status(registry, f"ref/one/manifests/{fallback_tag(digest)}") == 404
    artifact = run(push(registry, "ref/one", digest, p1))
    assert run(fetch(registry, "ref/one", digest)) == p1
    # what the registry holds: the fallback index lists the artifact, which points back at the image
    index = get_json(registry, "ref/one", fallback_tag(digest))
    assert index["mediaType"] == OCI_INDEX
    assert [(m["digest"], m["artifactType"]) for m in index["manifests"]] == [(artifact, MEDIA_TYPE)]
    m = get_json(registry, "ref/one", artifact, OCI_MANIFEST)
    assert m["subject"]["digest"] == digest and m["artifactType"] == MEDIA_TYPE
    assert m["annotations"][ANN_BOOTSTRAP] == bootstrap_digest(image[0] / "image.boot")
    assert get_status(registry, f"ref/one/blobs/{m['layers'][0]['digest']}") == 200
    assert get_status(registry, f"ref/one/blobs/{EMPTY_DIGEST}") == 200
    # the image itself is untouched: its tag still names the same manifest
    with registry._request("HEAD", f"{registry.url}/v2/ref/one/manifests/v1",
                           headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.headers["Docker-Content-Digest"] == digest


def test_second_push_keeps_other_referrers_and_fetch_takes_newest(registry, image):
    _, p1, p2 = image
    digest = pushed(registry, image, "ref/two")
    foreign = put_foreign_referrer(registry, "ref/two", digest)
    a1 = run(push(registry, "ref/two", digest, p1))
    assert run(fetch(registry, "ref/two", digest)) == p1
    a2 = run(push(registry, "ref/two", digest, p2))
    assert a2 != a1
    index = get_json(registry, "ref/two", fallback_tag(digest))
    assert [m["digest"] for m in index["manifests"]] == [foreign, a1, a2]
    assert run(fetch(registry, "ref/two", digest)) == p2
    # the same artifact pushed again moves to the end instead of appearing twice
    body = get_json(registry, "ref/two", a1, OCI_MANIFEST)
    async def again():
        async with source(registry, "ref/two") as src:
            from fetcher.referrers import _referrers_fallback, add_to_index
            idx, tag = await _referrers_fallback(src, digest)
            desc = next(m for m in idx["manifests"] if m["digest"] == a1)
            await src.put_manifest(tag, json.dumps(add_to_index(idx, desc)).encode(), OCI_INDEX)
    assert body["subject"]["digest"] == digest
    run(again())
    index = get_json(registry, "ref/two", fallback_tag(digest))
    assert [m["digest"] for m in index["manifests"]] == [foreign, a2, a1]
    assert run(fetch(registry, "ref/two", digest)) == p1


def test_fallback_tag_that_is_not_an_index_is_not_overwritten(registry, image):
    _, p1, _ = image
    digest = pushed(registry, image, "ref/clash")
    # someone tagged an image manifest as sha256-<hex>: push refuses to replace it
    image_manifest = get_json(registry, "ref/clash", digest, OCI_MANIFEST)
    put_manifest(registry, "ref/clash", fallback_tag(digest), json.dumps(image_manifest, indent=2).encode(),
                 OCI_MANIFEST)
    with pytest.raises(ReferrerError, match="not an OCI image index"):
        run(push(registry, "ref/clash", digest, p1))
    with pytest.raises(ReferrerError, match="not an OCI image index"):
        run(fetch(registry, "ref/clash", digest))
    assert get_json(registry, "ref/clash", fallback_tag(digest), OCI_MANIFEST)["layers"] == image_manifest["layers"]


def test_tampered_index_and_layer_are_source_errors(registry, image):
    _, p1, p2 = image
    digest = pushed(registry, image, "ref/tamper")
    artifact = run(push(registry, "ref/tamper", digest, p1))
    index = get_json(registry, "ref/tamper", fallback_tag(digest))
    entry = index["manifests"][-1]

    def set_index(entries):
        put_manifest(registry, "ref/tamper", fallback_tag(digest),
                     json.dumps({**index, "manifests": entries}).encode(), OCI_INDEX)

    # an entry whose size is not the artifact's
    set_index([{**entry, "size": entry["size"] + 1}])
    with pytest.raises(IntegrityError, match="digest mismatch") as info:
        run(fetch(registry, "ref/tamper", digest))
    assert isinstance(info.value, SourceError) and "\n" not in str(info.value)
    # an entry naming a profile artifact of another image (its subject is not this manifest)
    other = pushed_other(registry, image, "ref/tamper")
    other_artifact = run(push(registry, "ref/tamper", other, p2))
    set_index([entry, {**entry, "digest": other_artifact,
                       "size": len(json.dumps(get_json(registry, "ref/tamper", other_artifact, OCI_MANIFEST),
                                              indent=2))}])
    with pytest.raises(SourceError, match=f"its subject is {other}, not {digest}"):
        run(fetch(registry, "ref/tamper", digest))
    # back to the good index: the bytes come back; then the stored artifact manifest is altered
    set_index([entry])
    assert run(fetch(registry, "ref/tamper", digest)) == p1
    mfile = blob_file(registry, artifact)
    good = mfile.read_bytes()
    mfile.write_bytes(good.replace(b'"org.opencontainers.image.created": "2', b'"org.opencontainers.image.created": "3'))
    try:
        with pytest.raises(IntegrityError, match=f"profile artifact {artifact}: digest mismatch"):
            run(fetch(registry, "ref/tamper", digest))
    finally:
        mfile.write_bytes(good)
    # the profile layer's bytes altered in storage (same length): the digest check catches it
    layer = get_json(registry, "ref/tamper", artifact, OCI_MANIFEST)["layers"][0]["digest"]
    lfile = blob_file(registry, layer)
    data = lfile.read_bytes()
    assert data == p1
    lfile.write_bytes(data.replace(b'"first"', b'"fir5t"'))
    try:
        with pytest.raises(IntegrityError, match=f"profile layer {layer}: digest mismatch") as info:
            run(fetch(registry, "ref/tamper", digest))
        assert isinstance(info.value, SourceError) and "\n" not in str(info.value)
    finally:
        lfile.write_bytes(data)
    assert run(fetch(registry, "ref/tamper", digest)) == p1


def pushed_other(reg, image, repo: str) -> str:
    """A second image manifest in `repo` (the same layers, another config): its digest."""
    m = get_json(reg, repo, "v1", OCI_MANIFEST)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                         "other": True}).encode()
    reg.push_blob(repo, config)
    m["config"] = {"mediaType": m["config"]["mediaType"], "size": len(config),
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest()}
    return put_manifest(reg, repo, "other", json.dumps(m, indent=2).encode(), OCI_MANIFEST)


def test_oversized_profile_layer_is_refused_unread(registry, image):
    from erofs_image.profile import MAX_PROFILE_BYTES

    digest = pushed(registry, image, "ref/huge")
    big = image[1] + b" " * (MAX_PROFILE_BYTES + 1 - len(image[1]))  # valid JSON, one byte too many
    registry.push_blob("ref/huge", EMPTY_DATA)
    registry.push_blob("ref/huge", big)
    sub = get_json(registry, "ref/huge", digest, OCI_MANIFEST)
    body, desc = profile_artifact(big, {"mediaType": OCI_MANIFEST, "digest": digest,
                                        "size": len(json.dumps(sub, indent=2))}, "sha256:" + "0" * 64)
    put_manifest(registry, "ref/huge", desc["digest"], body, OCI_MANIFEST)
    put_manifest(registry, "ref/huge", fallback_tag(digest),
                 json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}).encode(), OCI_INDEX)
    with pytest.raises(SourceError, match="more than a profile may be"):
        run(fetch(registry, "ref/huge", digest))


def test_auth_registry_push_and_fetch(auth_registry, image):
    _, p1, _ = image
    digest = pushed(auth_registry, image, "ref/auth")
    assert run(push(auth_registry, "ref/auth", digest, p1)).startswith("sha256:")
    assert run(fetch(auth_registry, "ref/auth", digest)) == p1
    # without credentials: a one-line 401, nothing leaked
    with pytest.raises(SourceError, match="401") as info:
        run(fetch(auth_registry, "ref/auth", digest, username=None, password=None))
    assert "\n" not in str(info.value) and PASSWORD not in str(info.value)
    with pytest.raises(SourceError, match="401"):
        run(push(auth_registry, "ref/auth", digest, p1, username=USER, password="wrong"))


# -- a Bearer-token registry and an OCI 1.1 one, in front of the real registry -------------------
_FORWARD = ("Content-Type", "Docker-Content-Digest", "Location", "Content-Length", "Range")


async def forward_with_body(front: FrontServer, request: web.Request) -> web.Response:
    """FrontServer.forward plus request bodies and Content-Type; Location rewritten to the front."""
    body = await request.read()
    headers = {k: request.headers[k] for k in ("Content-Type", "Accept") if k in request.headers}
    async with front._client.request(request.method, front.upstream + request.path_qs, data=body or None,
                                     headers=headers, allow_redirects=False) as up:
        data = await up.read()
        out = {k: up.headers[k] for k in _FORWARD if k in up.headers and k != "Content-Length"}
        if "Location" in out:
            out["Location"] = out["Location"].replace(front.upstream, front.url)
        return web.Response(status=up.status, body=data if request.method != "HEAD" else None, headers=out)


def test_token_auth_pull_and_push_scopes(registry, image):
    """Reads use a pull token, writes a pull,push token: the token endpoint sees both scopes,
    and a pull token is refused for writes as a real token registry would."""
    _, p1, _ = image
    repo = "ref/token"
    digest = pushed(registry, image, repo)
    good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    async def behaviour(front, request):
        st = front.state
        if request.path == "/token":
            assert request.headers.get("Authorization") == good
            scope = request.query["scope"]
            st.setdefault("scopes", []).append(scope)
            token = f"tok-{len(st['scopes'])}-{scope.rsplit(':', 1)[1]}"
            st.setdefault("tokens", {})[token] = scope
            return web.json_response({"token": token, "expires_in": 300})
        write = request.method in ("POST", "PUT", "PATCH", "DELETE")
        need = f"repository:{repo}:pull,push" if write else f"repository:{repo}:pull"
        auth = request.headers.get("Authorization", "")
        scope = st.get("tokens", {}).get(auth[7:]) if auth.startswith("Bearer ") else None
        if scope is None or (write and "push" not in scope):
            return web.Response(status=401, headers={"WWW-Authenticate":
                                f'Bearer realm="http://{front.host}/token",service="t",scope="{need}"'})
        return await forward_with_body(front, request)

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, repo, scheme="http", username=USER, password=PASSWORD) as src:
                assert await fetch_profile(src, digest) is None
                _, desc = await manifest_descriptor(src, digest)
                artifact = await push_profile(src, digest, desc["mediaType"], desc["size"], p1)
                assert await fetch_profile(src, digest) == p1
            return front.state["scopes"], artifact

    scopes, artifact = run(main())
    assert scopes == [f"repository:{repo}:pull", f"repository:{repo}:pull,push"]
    assert get_json(registry, repo, fallback_tag(digest))["manifests"][-1]["digest"] == artifact


def test_registry_with_referrers_api(registry, image):
    """An OCI 1.1 registry: push sees OCI-Subject and leaves the fallback tag alone; fetch
    uses the referrers API and takes the newest profile by its created annotation."""
    _, p1, p2 = image
    repo = "ref/api"
    digest = pushed(registry, image, repo)
    referrers: list[dict] = []

    async def behaviour(front, request):
        if request.path == f"/v2/{repo}/referrers/{digest}":
            front.state["api"] = front.state.get("api", 0) + 1
            assert request.query.get("artifactType") == MEDIA_TYPE
            return web.json_response({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": referrers},
                                     content_type=OCI_INDEX)
        if request.path.startswith("/v2/") and "/referrers/" in request.path:
            return web.json_response({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []},
                                     content_type=OCI_INDEX)
        resp = await forward_with_body(front, request)
        if request.method == "PUT" and "/manifests/sha256:" in request.path and resp.status == 201:
            m = json.loads(await request.read())
            if m.get("subject"):
                desc = {"mediaType": OCI_MANIFEST, "artifactType": m["artifactType"], "size": len(await request.read()),
                        "digest": request.path.rsplit("/", 1)[1], "annotations": m.get("annotations", {})}
                referrers.insert(0, desc)  # the API's order means nothing
                resp.headers["OCI-Subject"] = m["subject"]["digest"]
        return resp

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, repo, scheme="http") as src:
                assert await fetch_profile(src, digest) is None
                _, desc = await manifest_descriptor(src, digest)
                a1 = await push_profile(src, digest, desc["mediaType"], desc["size"], p1)
                await asyncio.sleep(1.1)  # created annotations have second resolution
                a2 = await push_profile(src, digest, desc["mediaType"], desc["size"], p2)
                assert [r["digest"] for r in referrers] == [a2, a1]
                assert await fetch_profile(src, digest) == p2  # the newest, though listed first
                referrers.reverse()
                assert await fetch_profile(src, digest) == p2  # and when listed last
                return front.state["api"]

    assert run(main()) == 3  # one referrers API call per fetch; push never needed the fallback
    assert get_status(registry, f"{repo}/manifests/{fallback_tag(digest)}") == 404


def test_bad_arguments():
    async def main():
        async with RegistrySource("127.0.0.1:9", "x", scheme="http") as src:
            with pytest.raises(SourceError, match="not a sha256 digest"):
                await fetch_profile(src, "latest")
            with pytest.raises(ValueError):
                await push_profile(src, "sha256:" + "0" * 64, OCI_MANIFEST, 10, b"not a profile")
    run(main())


# -- found by the bootstrap (an image bound from its bootstrap file, no manifest digest) -------------
async def fetch_by_bootstrap(reg, repo: str, digest: str) -> bytes | None:
    async with source(reg, repo) as src:
        return await fetch_profile_for_bootstrap(src, digest)


def test_a_pushed_profile_is_found_by_its_bootstrap(registry, image):
    out, p1, p2 = image
    digest = pushed(registry, image, "ref/byboot")
    boot = bootstrap_digest(out / "image.boot")
    assert run(fetch_by_bootstrap(registry, "ref/byboot", boot)) is None  # nothing pushed yet
    run(push(registry, "ref/byboot", digest, p1))
    assert run(fetch_by_bootstrap(registry, "ref/byboot", boot)) == p1
    run(push(registry, "ref/byboot", digest, p2))  # a newer profile of the same image replaces it
    assert run(fetch_by_bootstrap(registry, "ref/byboot", boot)) == p2
    tag = bootstrap_tag(boot)
    assert tag == "fscached-profile-" + boot.removeprefix("sha256:") and len(tag) <= 128
    # another bootstrap: not found; a tag whose artifact names another bootstrap: refused
    other = "sha256:" + "0" * 64
    assert run(fetch_by_bootstrap(registry, "ref/byboot", other)) is None
    artifact = get_json(registry, "ref/byboot", tag, OCI_MANIFEST)
    put_manifest(registry, "ref/byboot", bootstrap_tag(other), json.dumps(artifact).encode(), OCI_MANIFEST)
    with pytest.raises(SourceError, match="it is the profile of bootstrap"):
        run(fetch_by_bootstrap(registry, "ref/byboot", other))
