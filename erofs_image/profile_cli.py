"""`fscached-image profile ...`: fold a start-up profile (erofs_image.profile) into an image.

    fscached-image profile push PROFILE REF [--plain-http] [--creds USER:PASS | --auth-file FILE]
    fscached-image profile attach PROFILE OUTDIR
    fscached-image profile show PROFILE [--json]
    fscached-image convert SOURCE OUTDIR --profile PROFILE     (attach right after convert)

`push` resolves REF (a tag or a digest; from an index, this machine's platform or --platform)
to its image manifest with fetcher.pull, pulls the bootstrap into a temporary directory,
checks the profile against it (bootstrap digest, every range inside a blob of the image) and
only then pushes the profile as an OCI 1.1 referrer of the manifest (fetcher.referrers: the
referrers API or, on Distribution 2.8, the `sha256-<hex>` fallback tag). It prints the
artifact's digest.

`attach` writes the same artifact into a convert output's OCI layout (OUTDIR/oci: the blobs,
and a descriptor in index.json without a ref name, so `skopeo copy oci:OUTDIR/oci:latest`
still picks the image), after checking the profile against OUTDIR/image.boot and that the
layout's bootstrap layer holds that same bootstrap. skopeo copies only the tagged manifest:
to get the profile into a registry after skopeo, use `push`.

Failures raise Failed (one line); the CLI prints it and exits with its code (1, or 2 for a
command-line mistake). This is the one place in erofs_image that imports fetcher (push needs
the registry client; the artifact format is fetcher.referrers').
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import gzip
import hashlib
import json
import os
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

from .oci import sha256_file
from .oci_media import ANN_NYDUS_BOOTSTRAP, BOOTSTRAP_ENTRY, OCI_MANIFEST


class Failed(Exception):
    """A profile command failed: one line for the user; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_parser(sub: Any) -> None:
    p = sub.add_parser("profile", help="attach a start-up profile to an image, or show one")
    psub = p.add_subparsers(dest="profile_command", required=True, parser_class=type(p))
    push = psub.add_parser("push", help="validate PROFILE against the image REF in a registry and "
                                        "push it as a referrer of REF's manifest")
    push.add_argument("profile", type=Path, help="the profile file (JSON, fscached-startup-profile v1)")
    push.add_argument("ref", help="host[:port]/repo[:tag|@sha256:<hex>]")
    push.add_argument("--plain-http", action="store_true", help="talk http, not https, to the registry")
    creds = push.add_mutually_exclusive_group()
    creds.add_argument("--creds", metavar="USER:PASS", help="registry credentials")
    creds.add_argument("--auth-file", type=Path, metavar="FILE",
                       help="credentials: a file with base64 of 'user:password' (the daemon's auth_file), "
                            "or a containers/docker auth.json with an entry for the registry")
    push.add_argument("--ca-file", type=Path, metavar="FILE", help="CA certificates for https")
    push.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                      help="the image to take from an index (default: this machine's)")
    attach = psub.add_parser("attach", help="add PROFILE to a convert output's OCI layout (OUTDIR/oci)")
    attach.add_argument("profile", type=Path)
    attach.add_argument("outdir", type=Path, help="a directory written by fscached-image convert")
    attach.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    show = psub.add_parser("show", help="ranges, bytes and timings of a profile, per blob")
    show.add_argument("profile", type=Path)
    show.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from erofs_image.profile import ProfileError

    try:
        if args.profile_command == "push":
            print(push(args))
        elif args.profile_command == "attach":
            digest = attach(args.profile, args.outdir)
            if not args.quiet:
                print(f"attached {args.profile} to {args.outdir}/oci as artifact {digest}")
        else:
            show(args.profile, args.json)
    except ProfileError as exc:
        raise Failed(str(exc)) from None
    return 0


def load_profile(path: Path) -> tuple[bytes, Any]:
    """(the file's bytes, the StartupProfile); ProfileError."""
    from erofs_image.profile import MAX_PROFILE_BYTES, ProfileError, StartupProfile

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"profile {path}: {exc.strerror or exc}") from None
    return data, StartupProfile.from_json(data, f"profile {path}")


def _check(profile: Any, bootstrap: Path, where: str) -> str:
    """Check `profile` against the bootstrap file; returns the bootstrap's digest."""
    from erofs_image.profile import bootstrap_digest

    from .reader import Bootstrap

    try:
        bs = Bootstrap.open(bootstrap)
        digest = bootstrap_digest(bootstrap)
    except OSError as exc:
        raise Failed(f"{bootstrap}: {exc.strerror or exc}") from None
    except ValueError as exc:  # BootstrapError
        raise Failed(f"{bootstrap}: not a valid bootstrap: {exc}") from None
    profile.check_against(digest, {b.blob_id: b.uncompressed_size for b in bs.blobs}, where)
    return digest


# -- push ----------------------------------------------------------------------------------------
def registry_credentials(args: argparse.Namespace, host: str, repo: str) -> dict[str, str]:
    """RegistrySource keyword arguments for --creds / --auth-file ({}: anonymous)."""
    if args.creds is not None:
        user, sep, password = args.creds.partition(":")
        if not sep or not user:
            raise Failed("--creds must be USER:PASSWORD", 2)
        return {"username": user, "password": password}
    if args.auth_file is None:
        return {}
    path = args.auth_file
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not readable text"
        raise Failed(f"auth file {path}: {why}") from None
    text = text.strip()
    if not text.startswith("{"):
        auth = text
    else:
        auth = _auth_from_json(text, path, host, repo)
    try:
        decoded = base64.b64decode(auth, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    if ":" not in decoded or decoded.startswith(":"):
        raise Failed(f"auth file {path}: expected base64 of 'user:password'")
    return {"auth": auth}


def _auth_from_json(text: str, path: Path, host: str, repo: str) -> str:
    """The `auth` of a containers-auth.json / docker config.json entry for host (or host/repo
    prefix: the longest that matches)."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise Failed(f"auth file {path}: not valid JSON") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise Failed(f"auth file {path}: no \"auths\" object")
    best: tuple[int, str] | None = None
    for key, entry in auths.items():
        name = str(key)
        for prefix in ("https://", "http://"):
            if name.startswith(prefix):
                name = name[len(prefix):]
        name = name.rstrip("/")
        if name.endswith("/v1") or name.endswith("/v2"):
            name = name[:-3]
        if name == host or ((f"{host}/{repo}" + "/").startswith(name + "/") and name.startswith(host + "/")):
            auth = entry.get("auth") if isinstance(entry, dict) else None
            if isinstance(auth, str) and auth and (best is None or len(name) > best[0]):
                best = (len(name), auth)
    if best is None:
        raise Failed(f"auth file {path}: no credentials for {host}")
    return best[1]


def push(args: argparse.Namespace) -> str:
    from fetcher.image_ref import parse_image_ref
    from fetcher.registry import RegistrySource
    from fetcher.source import SourceError

    from .oci_media import Platform

    try:
        ref = parse_image_ref(args.ref)
    except ValueError as exc:
        raise Failed(str(exc), 2) from None
    platform = None
    if args.platform:
        try:
            platform = Platform.parse(args.platform)
        except ValueError as exc:
            raise Failed(f"--platform: {exc}", 2) from None
    data, profile = load_profile(args.profile)
    kwargs: dict[str, Any] = registry_credentials(args, ref.host, ref.repo)
    if args.ca_file is not None:
        kwargs["ca_file"] = str(args.ca_file)
    try:
        source = RegistrySource(ref.host, ref.repo, scheme="http" if args.plain_http else "https", **kwargs)
    except ValueError as exc:
        raise Failed(f"{ref}: {exc}") from None
    try:
        return asyncio.run(_push(source, ref, platform, data, profile, args.profile))
    except SourceError as exc:
        raise Failed(str(exc)) from None


async def _push(source: Any, ref: Any, platform: Any, data: bytes, profile: Any, path: Path) -> str:
    from fetcher.pull import pull_bootstrap
    from fetcher.referrers import manifest_descriptor, push_profile

    async with source:
        with tempfile.TemporaryDirectory(prefix="fscached-profile-") as tmp:
            pulled = await pull_bootstrap(source, ref.reference, Path(tmp), platform=platform)
            await asyncio.to_thread(_check, profile, pulled.bootstrap,
                                    f"profile {path} for {ref}")
        _, subject = await manifest_descriptor(source, pulled.manifest_digest)
        return await push_profile(source, pulled.manifest_digest, subject["mediaType"], subject["size"], data)


# -- attach --------------------------------------------------------------------------------------
def attach(profile_path: Path, outdir: Path, loaded: tuple[bytes, Any] | None = None) -> str:
    """Write the profile artifact into OUTDIR/oci; returns its digest. Nothing is written
    unless every check passes."""
    from fetcher.referrers import EMPTY_DATA, add_to_index, profile_artifact

    data, profile = loaded or load_profile(profile_path)
    boot = outdir / "image.boot"
    oci = outdir / "oci"
    if not boot.is_file() or not (oci / "index.json").is_file():
        raise Failed(f"{outdir}: not a convert output (needs image.boot and oci/index.json)")
    digest = _check(profile, boot, f"profile {profile_path}")
    index = _read_json(oci / "index.json")
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise Failed(f"{oci}/index.json: no manifests list")
    images = [m for m in manifests if isinstance(m, dict) and m.get("mediaType") == OCI_MANIFEST
              and not m.get("artifactType")]
    if len(images) != 1:
        raise Failed(f"{oci}/index.json: {len(images)} image manifests; expected the one convert writes")
    subject = {k: images[0].get(k) for k in ("mediaType", "digest", "size")}
    manifest = _read_json(_blob_path(oci, subject["digest"], subject["size"]))
    in_layout = _layout_bootstrap_digest(oci, manifest)
    if in_layout != digest:
        raise Failed(f"{oci}: its bootstrap layer holds bootstrap {in_layout}, not {boot}'s {digest}")
    body, desc = profile_artifact(data, subject, profile.bootstrap_digest)
    for blob in (EMPTY_DATA, data, body):
        _put_blob(oci, blob)
    _write_atomic(oci / "index.json", json.dumps(add_to_index(index, desc), indent=2).encode())
    return str(desc["digest"])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_bytes())
    except OSError as exc:
        raise Failed(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Failed(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise Failed(f"{path}: not a JSON object")
    return obj


def _blob_path(oci: Path, digest: Any, size: Any) -> Path:
    """The layout blob `digest`, checked against its digest and size."""
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise Failed(f"{oci}: unusable digest {str(digest)[:100]!r}")
    path = oci / "blobs" / "sha256" / digest[7:]
    try:
        hexd, n = sha256_file(path)
    except OSError as exc:
        raise Failed(f"{path}: {exc.strerror or exc}") from None
    if "sha256:" + hexd != digest or (isinstance(size, int) and n != size):
        raise Failed(f"{path}: does not match its digest and size ({digest}, {size} bytes)")
    return path


def _layout_bootstrap_digest(oci: Path, manifest: dict[str, Any]) -> str:
    """"sha256:<hex>" of image/image.boot inside the manifest's bootstrap layer."""
    layers = [layer for layer in manifest.get("layers") or [] if isinstance(layer, dict)
              and (layer.get("annotations") or {}).get(ANN_NYDUS_BOOTSTRAP) == "true"]
    if len(layers) != 1:
        raise Failed(f"{oci}: the image manifest has {len(layers)} nydus bootstrap layers; expected one")
    path = _blob_path(oci, layers[0].get("digest"), layers[0].get("size"))
    try:
        with gzip.open(path, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tf:
            for member in tf:
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if name != BOOTSTRAP_ENTRY or not member.isreg():
                    continue
                src = tf.extractfile(member)
                if src is None:
                    break
                h = hashlib.sha256()
                while block := src.read(1 << 20):
                    h.update(block)
                return "sha256:" + h.hexdigest()
    except (OSError, tarfile.TarError, zlib.error, EOFError) as exc:
        raise Failed(f"{path}: unreadable bootstrap layer: {exc}") from None
    raise Failed(f"{path}: the bootstrap layer holds no {BOOTSTRAP_ENTRY}")


def _put_blob(oci: Path, data: bytes) -> None:
    path = oci / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    try:
        if path.is_file() and path.read_bytes() == data:
            return
    except OSError:
        pass
    _write_atomic(path, data)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise Failed(f"{path}: {exc.strerror or exc}") from None


# -- show ----------------------------------------------------------------------------------------
def summarize(profile: Any) -> dict[str, Any]:
    blobs: dict[str, dict[str, Any]] = {}
    for r in profile.ranges:
        b = blobs.setdefault(r.blob_id, {"blob": r.blob_id, "ranges": 0, "bytes": 0,
                                         "first_at_ms": r.at_ms, "last_at_ms": r.at_ms})
        b["ranges"] += 1
        b["bytes"] += r.length
        b["first_at_ms"] = min(b["first_at_ms"], r.at_ms)
        b["last_at_ms"] = max(b["last_at_ms"], r.at_ms)
    ats = [r.at_ms for r in profile.ranges]
    return {"bootstrap_digest": profile.bootstrap_digest, "image": profile.image,
            "recorded_seconds": profile.recorded_seconds, "ranges": len(profile.ranges),
            "bytes": profile.total_bytes, "first_at_ms": min(ats) if ats else None,
            "last_at_ms": max(ats) if ats else None, "blobs": list(blobs.values())}


def show(path: Path, as_json: bool) -> None:
    from .cli import human

    _, profile = load_profile(path)
    s = summarize(profile)
    if as_json:
        print(json.dumps(s, indent=2))
        return
    when = f", read at {s['first_at_ms']} ms .. {s['last_at_ms']} ms" if s["ranges"] else ""
    print(f"profile    {path}")
    print(f"bootstrap  {s['bootstrap_digest']}")
    if s["image"]:
        print(f"image      {s['image']}")
    print(f"recorded   {s['recorded_seconds']:g} s")
    print(f"ranges     {s['ranges']}, {s['bytes']} bytes ({human(s['bytes'])}){when}")
    if s["blobs"]:
        print(f"\n{'blob id':<64} {'ranges':>7} {'bytes':>12} {'first ms':>9} {'last ms':>9}")
        for b in s["blobs"]:
            print(f"{b['blob']:<64} {b['ranges']:>7} {b['bytes']:>12} {b['first_at_ms']:>9} {b['last_at_ms']:>9}")
