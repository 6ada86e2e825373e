"""Start-up profiles in a registry, as OCI 1.1 referrers of the image manifest they belong to.

    async with RegistrySource("127.0.0.1:5000", "app", scheme="http") as src:
        artifact = await push_profile(src, manifest_digest, OCI_MANIFEST, manifest_size, data)
        data = await fetch_profile(src, manifest_digest)      # None: the image has no profile

The artifact (what `profile_artifact` builds; `fscached-image profile attach` writes the same
one into an OCI layout):
- an OCI image manifest with `artifactType` = erofs_image.profile.MEDIA_TYPE, `config` = the OCI
  empty descriptor (`{}`), one layer = the profile JSON (mediaType MEDIA_TYPE), `subject` = the
  image manifest's descriptor, annotations: `org.opencontainers.image.created` and
  `io.fscached.profile.bootstrap-digest`.

Discovery (`fetch_profile`): `GET /v2/<repo>/referrers/<digest>?artifactType=<MEDIA_TYPE>`;
when the registry answers 404 (Distribution 2.8 has no referrers API), the fallback tag
`sha256-<hex of the subject digest>`: an OCI image index listing the referrers, each with its
`artifactType`. From the fallback index the last profile entry is taken (pushes append); from
the referrers API, whose order is not defined, the newest by `org.opencontainers.image.created`
(the last one on a tie). The artifact manifest is fetched by digest and checked (bytes against
the digest, artifactType, subject = the image); its profile layer is bounded by
MAX_PROFILE_BYTES and checked against its digest and size. Errors are SourceError, one line;
"no profile" is None, never an error. The profile's content is not judged here: the daemon
parses it and checks it against the image (StartupProfile.from_json / check_against).

Discovery by the bootstrap (`fetch_profile_for_bootstrap`): a daemon that has an image's
bootstrap but not its manifest digest (nydus-snapshotter's fusedev driver hands nydusd only the
unpacked bootstrap and the repository) asks for the tag `fscached-profile-<hex of the
bootstrap's sha256>`, which `push_profile` also puts on the artifact; the artifact must name
that bootstrap digest in its annotation. The same checks as above apply.

Pushing (`push_profile`): the two blobs (uploaded unless the registry has them), the artifact
manifest PUT by digest; when the registry does not answer with an `OCI-Subject` header (it
does not index referrers itself) the fallback index is read, the artifact appended (other
referrers kept, an identical artifact moved to the end) and the index PUT back. That
read-modify-write is not atomic: two concurrent pushes to one image can lose one entry
(Distribution 2.8 has no conditional PUT); the artifact itself stays in the registry.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import re
from typing import Any

import aiohttp

from erofs_image.oci_media import MANIFEST_ACCEPT, OCI_INDEX, OCI_MANIFEST
from fetcher.registry import RegistryError, RegistrySource
from fetcher.source import IntegrityError, SourceError
from erofs_image.profile import MAX_PROFILE_BYTES, MEDIA_TYPE

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
EMPTY_DESCRIPTOR = {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_DATA)}
ANN_CREATED = "org.opencontainers.image.created"
ANN_TITLE = "org.opencontainers.image.title"
ANN_BOOTSTRAP = "io.fscached.profile.bootstrap-digest"
PROFILE_TITLE = "startup-profile.json"
MAX_DOCUMENT_SIZE = 4 << 20  # a manifest or a referrers index
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ReferrerError(SourceError):
    """A referrers index, an artifact manifest or a profile layer is unusable (one line)."""


class ReferrerIntegrityError(ReferrerError, IntegrityError):
    """Bytes from the registry do not match their digest or size."""


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for `digest`: sha256:<hex> -> sha256-<hex>."""
    _check_digest(digest)
    return digest.replace(":", "-", 1)


def _check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {str(digest)[:100]!r} (need sha256:<64 hex>)")
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def profile_artifact(profile: bytes, subject: dict[str, Any], bootstrap_digest: str,
                     created: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """(artifact manifest bytes, its descriptor for an index: mediaType, artifactType, digest,
    size, annotations) for the profile `profile` of the image manifest `subject` (a descriptor:
    mediaType, digest, size). The blobs it names are EMPTY_DATA and `profile`."""
    _check_digest(subject.get("digest"))
    _check_digest(bootstrap_digest)
    annotations = {ANN_CREATED: created or now_rfc3339(), ANN_BOOTSTRAP: bootstrap_digest}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MEDIA_TYPE,
        "config": dict(EMPTY_DESCRIPTOR),
        "layers": [{"mediaType": MEDIA_TYPE, "digest": sha256_digest(profile), "size": len(profile),
                    "annotations": {ANN_TITLE: PROFILE_TITLE}}],
        "subject": {"mediaType": subject["mediaType"], "digest": subject["digest"], "size": subject["size"]},
        "annotations": annotations,
    }
    body = json.dumps(manifest, indent=2).encode()
    desc = {"mediaType": OCI_MANIFEST, "artifactType": MEDIA_TYPE, "digest": sha256_digest(body),
            "size": len(body), "annotations": dict(annotations)}
    return body, desc


def add_to_index(index: dict[str, Any] | None, desc: dict[str, Any]) -> dict[str, Any]:
    """The referrers index `index` (None: a new one) with `desc` last: every other entry kept,
    an earlier entry of the same digest dropped."""
    if index is None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    entries = [m for m in index.get("manifests") or [] if not (isinstance(m, dict) and m.get("digest") == desc["digest"])]
    return {**index, "manifests": [*entries, desc]}


# -- reading -------------------------------------------------------------------------------------
def _what(source: RegistrySource) -> str:
    return f"registry {source.host}/{source.repo}"


async def _get_document(source: RegistrySource, path: str, name: str, accept: str,
                        params: dict[str, str] | None = None) -> tuple[bytes, str]:
    """(body, Content-Type) of a bounded JSON document; RegistryError passes through."""
    async def consume(resp: aiohttp.ClientResponse) -> tuple[bytes, str]:
        if resp.content_length is not None and resp.content_length > MAX_DOCUMENT_SIZE:
            raise ReferrerError(f"{_what(source)}: {name}: {resp.content_length} bytes, more than "
                                f"{MAX_DOCUMENT_SIZE} allowed")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):
            body += chunk
            if len(body) > MAX_DOCUMENT_SIZE:
                raise ReferrerError(f"{_what(source)}: {name}: more than {MAX_DOCUMENT_SIZE} bytes")
        return bytes(body), resp.headers.get("Content-Type", "").split(";")[0].strip()

    return await source.get(path, consume, accept=accept, what=name, params=params)


def _parse(body: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReferrerError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ReferrerError(f"{where}: not a JSON object")
    return obj


def _index_entries(index: dict[str, Any], where: str) -> list[dict[str, Any]]:
    mt = index.get("mediaType")
    if mt not in (OCI_INDEX, None) or not isinstance(index.get("manifests"), list):
        raise ReferrerError(f"{where}: not an OCI image index (mediaType {str(mt)[:80]!r})")
    return [m for m in index["manifests"] if isinstance(m, dict)]


async def _referrers_index(source: RegistrySource, subject: str) -> tuple[dict[str, Any] | None, bool]:
    """(the referrers index of `subject`, whether it came from the fallback tag); (None, True)
    when neither the API nor the fallback tag has one."""
    where = f"{_what(source)}: referrers of {subject}"
    try:
        body, _ = await _get_document(source, f"referrers/{subject}", f"referrers of {subject}", OCI_INDEX,
                                      params={"artifactType": MEDIA_TYPE})
        return _parse(body, where), False
    except RegistryError as exc:
        if exc.status != 404:
            raise
    tag = fallback_tag(subject)
    try:
        # every manifest type accepted: Distribution answers 404 to a GET whose Accept leaves
        # out the type of what the tag holds, and "nothing there" must not be mistaken for that
        body, ctype = await _get_document(source, f"manifests/{tag}", f"referrers tag {tag}", MANIFEST_ACCEPT)
    except RegistryError as exc:
        if exc.status == 404:
            return None, True
        raise
    index = _parse(body, f"{_what(source)}: referrers tag {tag}")
    if index.get("mediaType") is None and ctype:
        index["mediaType"] = ctype
    return index, True


def _newest(entries: list[dict[str, Any]], from_tag: bool) -> dict[str, Any]:
    if from_tag:
        return entries[-1]

    def key(item: tuple[int, dict[str, Any]]) -> tuple[str, int]:
        created = (item[1].get("annotations") or {}).get(ANN_CREATED)
        return (created if isinstance(created, str) else "", item[0])

    return max(enumerate(entries), key=key)[1]


async def _get_blob(source: RegistrySource, digest: str, size: int, name: str) -> bytes:
    where = f"{_what(source)}: {name}"

    async def consume(resp: aiohttp.ClientResponse) -> bytes:
        if resp.content_length is not None and resp.content_length != size:
            raise ReferrerIntegrityError(f"{where}: the registry sends {resp.content_length} bytes, "
                                         f"the manifest says {size}")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):
            body += chunk
            if len(body) > size:
                raise ReferrerIntegrityError(f"{where}: more than the {size} bytes the manifest says")
        return bytes(body)

    data = await source.get(f"blobs/{digest}", consume, what=name)
    if len(data) != size:
        raise ReferrerIntegrityError(f"{where}: {len(data)} bytes, the manifest says {size}")
    got = sha256_digest(data)
    if got != digest:
        raise ReferrerIntegrityError(f"{where}: digest mismatch: expected {digest}, got {got}")
    return data


async def manifest_descriptor(source: RegistrySource, digest: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the manifest `digest` of `source`'s repository, its descriptor {mediaType, digest,
    size}), the bytes checked against the digest. RegistryError / ReferrerError."""
    _check_digest(digest)
    name = f"manifest {digest}"
    accept = ", ".join((OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"))
    body, ctype = await _get_document(source, f"manifests/{digest}", name, accept)
    got = sha256_digest(body)
    if got != digest:
        raise ReferrerIntegrityError(f"{_what(source)}: {name}: digest mismatch: the bytes received are {got}")
    obj = _parse(body, f"{_what(source)}: {name}")
    media_type = obj.get("mediaType") or ctype or OCI_MANIFEST
    return obj, {"mediaType": media_type, "digest": digest, "size": len(body)}


async def fetch_profile(source: RegistrySource, manifest_digest: str) -> bytes | None:
    """The layer bytes of the newest start-up profile artifact whose subject is the image
    manifest `manifest_digest` (sha256:<hex>) in `source`'s repository; None when there is
    none. Raises SourceError (one line) for anything else: transport, auth, a malformed index
    or artifact, bytes that do not match their digest, a profile larger than MAX_PROFILE_BYTES."""
    try:
        _check_digest(manifest_digest)
    except ValueError as exc:
        raise ReferrerError(f"{_what(source)}: {exc}") from None
    index, from_tag = await _referrers_index(source, manifest_digest)
    if index is None:
        return None
    source_name = f"referrers tag {fallback_tag(manifest_digest)}" if from_tag else f"referrers of {manifest_digest}"
    where = f"{_what(source)}: {source_name}"
    entries = [m for m in _index_entries(index, where) if m.get("artifactType") == MEDIA_TYPE]
    if not entries:
        return None
    desc = _newest(entries, from_tag)
    digest, size = desc.get("digest"), desc.get("size")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ReferrerError(f"{where}: profile entry with unusable digest {str(digest)[:100]!r}")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_DOCUMENT_SIZE:
        raise ReferrerError(f"{where}: profile entry {digest} with unusable size {str(size)[:40]!r}")

    name = f"profile artifact {digest}"
    awhere = f"{_what(source)}: {name}"
    body, _ = await _get_document(source, f"manifests/{digest}", name, OCI_MANIFEST)
    got = sha256_digest(body)
    if got != digest or len(body) != size:
        raise ReferrerIntegrityError(f"{awhere}: digest mismatch: {where} says {digest} ({size} bytes), "
                                     f"the bytes received are {got} ({len(body)} bytes)")
    artifact = _parse(body, awhere)
    subject = artifact.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != manifest_digest:
        got_subject = subject.get("digest") if isinstance(subject, dict) else None
        raise ReferrerError(f"{awhere}: its subject is {str(got_subject)[:100]}, not {manifest_digest}")
    return await _profile_layer(source, artifact, awhere)


def bootstrap_tag(bootstrap_digest: str) -> str:
    """The tag `push_profile` also puts on a profile artifact: by the bootstrap it belongs to."""
    return "fscached-profile-" + _check_digest(bootstrap_digest).removeprefix("sha256:")


async def fetch_profile_for_bootstrap(source: RegistrySource, bootstrap_digest: str) -> bytes | None:
    """The profile tagged for the bootstrap `bootstrap_digest` (sha256:<hex>) in `source`'s
    repository (see the module's doc); None when there is none; SourceError otherwise."""
    try:
        tag = bootstrap_tag(bootstrap_digest)
    except ValueError as exc:
        raise ReferrerError(f"{_what(source)}: {exc}") from None
    name = f"profile tag {tag}"
    awhere = f"{_what(source)}: {name}"
    try:
        body, _ = await _get_document(source, f"manifests/{tag}", name, OCI_MANIFEST)
    except RegistryError as exc:
        if exc.status == 404:
            return None
        raise
    artifact = _parse(body, awhere)
    found = artifact.get("annotations")
    annotations: dict[str, Any] = found if isinstance(found, dict) else {}
    if annotations.get(ANN_BOOTSTRAP) != bootstrap_digest:
        raise ReferrerError(f"{awhere}: it is the profile of bootstrap {str(annotations.get(ANN_BOOTSTRAP))[:100]}, "
                            f"not {bootstrap_digest}")
    return await _profile_layer(source, artifact, awhere)


async def _profile_layer(source: RegistrySource, artifact: dict[str, Any], awhere: str) -> bytes:
    """The one profile layer of an artifact manifest, checked and fetched."""
    if artifact.get("artifactType") != MEDIA_TYPE:
        raise ReferrerError(f"{awhere}: artifactType {str(artifact.get('artifactType'))[:100]!r}, not {MEDIA_TYPE}")
    layers = [layer for layer in artifact.get("layers") or [] if isinstance(layer, dict)
              and layer.get("mediaType") == MEDIA_TYPE]
    if len(layers) != 1:
        raise ReferrerError(f"{awhere}: {len(layers)} layers of type {MEDIA_TYPE}; expected one")
    ldigest, lsize = layers[0].get("digest"), layers[0].get("size")
    if not isinstance(ldigest, str) or not _DIGEST.fullmatch(ldigest):
        raise ReferrerError(f"{awhere}: profile layer with unusable digest {str(ldigest)[:100]!r}")
    if not isinstance(lsize, int) or isinstance(lsize, bool) or lsize < 0:
        raise ReferrerError(f"{awhere}: profile layer {ldigest} has no valid size")
    if lsize > MAX_PROFILE_BYTES:
        raise ReferrerError(f"{awhere}: profile layer of {lsize} bytes, more than a profile may be "
                            f"({MAX_PROFILE_BYTES})")
    return await _get_blob(source, ldigest, lsize, f"profile layer {ldigest}")


# -- writing -------------------------------------------------------------------------------------
async def push_profile(source: RegistrySource, manifest_digest: str, subject_media_type: str,
                       subject_size: int, profile: bytes) -> str:
    """Attach `profile` (the profile file's bytes) to the image manifest `manifest_digest`
    (its media type and size in bytes given) in `source`'s repository; returns the artifact
    manifest's digest. The caller checks the profile against the image first (the bootstrap
    digest it names goes into the artifact's annotations as it is). Raises SourceError for
    registry failures, ValueError for arguments that cannot make an artifact."""
    from erofs_image.profile import StartupProfile

    _check_digest(manifest_digest)
    if not isinstance(subject_size, int) or subject_size <= 0:
        raise ValueError(f"subject size must be > 0, not {subject_size!r}")
    parsed = StartupProfile.from_json(profile)  # ProfileError (a ValueError): not a profile
    subject = {"mediaType": subject_media_type, "digest": manifest_digest, "size": subject_size}
    body, desc = profile_artifact(profile, subject, parsed.bootstrap_digest)
    for data in (EMPTY_DATA, profile):
        if not await source.blob_exists(sha256_digest(data)):
            await source.upload_blob(data)
    headers = await source.put_manifest(desc["digest"], body, OCI_MANIFEST)
    # found by its bootstrap too (a daemon that has the bootstrap but not the manifest digest)
    await source.put_manifest(bootstrap_tag(parsed.bootstrap_digest), body, OCI_MANIFEST)
    if headers.get("oci-subject") == manifest_digest:
        return str(desc["digest"])  # the registry keeps the referrers list itself
    index, _ = await _referrers_fallback(source, manifest_digest)
    new = add_to_index(index, desc)
    await source.put_manifest(fallback_tag(manifest_digest), json.dumps(new, indent=2).encode(), OCI_INDEX)
    return str(desc["digest"])


async def _referrers_fallback(source: RegistrySource, subject: str) -> tuple[dict[str, Any] | None, str]:
    """The fallback tag's index (None when the tag does not exist) and the tag. Anything
    else under that tag is an error: it is not ours to overwrite."""
    tag = fallback_tag(subject)
    where = f"{_what(source)}: referrers tag {tag}"
    try:
        body, ctype = await _get_document(source, f"manifests/{tag}", f"referrers tag {tag}", MANIFEST_ACCEPT)
    except RegistryError as exc:
        if exc.status == 404:
            return None, tag
        raise
    index = _parse(body, where)
    if index.get("mediaType") is None and ctype:
        index["mediaType"] = ctype
    _index_entries(index, where)
    return index, tag
