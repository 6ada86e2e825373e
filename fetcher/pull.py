"""Pull a nydus (RAFS v6) image's bootstrap from a registry: manifest -> bootstrap layer ->
`image/image.boot`, written to `<dest_dir>/<manifest digest hex>.boot`.

    async with RegistrySource("127.0.0.1:5000", "app", scheme="http") as src:
        pulled = await pull_bootstrap(src, "latest", Path("/var/lib/fscached/boot"))
        pulled.bootstrap, pulled.blob_ids   # blob ids = the nydus-blob layers' sha256 hex

- The manifest is fetched with Accept for OCI manifest/index and Docker v2 manifest/list; an
  index is followed to the running machine's platform (linux/arm64 on an aarch64 host; the
  rules, shared with the converter, are in erofs_image.oci_media). A digest reference is
  verified against the bytes received (and so is every manifest reached through an index).
- The bootstrap layer is the one annotated `containerd.io/snapshot/nydus-bootstrap: "true"`;
  without one, the last layer, which must then hold `image/image.boot`.
- The layer is streamed to a temporary file while hashed (bounded memory, bounded size),
  checked against its descriptor's digest and size, and only then decompressed; only the
  regular file `image/image.boot` is taken out of the tar (nothing else is ever written).
  The bootstrap lands atomically (temp + fsync + rename); a valid one already present is
  reused without downloading.
- HTTP goes through `RegistrySource.get`, the source's one registry client (basic / Bearer,
  same rules as its blob reads: credentials only to the registry's origin, redirects followed
  by hand, bounded retries on connection errors, timeouts, 5xx and 429).
Errors are `PullError` (a SourceError; digest problems also IntegrityError), one line naming
the registry, repository and reference and what went wrong.
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from erofs_image.oci_media import (ANN_NYDUS_BLOB, ANN_NYDUS_BOOTSTRAP, BOOTSTRAP_ENTRY, MANIFEST_ACCEPT,
                                   MANIFEST_TYPES, NYDUS_BLOB, Platform, PlatformError, choose_manifest,
                                   is_index)
from fetcher.image_ref import check_reference
from fetcher.registry import RegistryError, RegistrySource, RetryableError
from fetcher.source import IntegrityError, SourceError

log = logging.getLogger("fscached.fetcher.pull")

MAX_MANIFEST_SIZE = 4 << 20
MAX_BOOTSTRAP_SIZE = 1 << 30
MAX_INDEX_DEPTH = 4
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_EROFS_MAGIC = 0xE0F5E1E2
_COPY = 1 << 20


class PullError(SourceError):
    """The image could not be pulled (missing, not nydus, malformed, transport)."""


class PullIntegrityError(PullError, IntegrityError):
    """Bytes from the registry do not match their digest (or size)."""


@dataclass
class PulledImage:
    bootstrap: Path  # dest_dir/<manifest digest hex>.boot
    manifest_digest: str  # "sha256:<hex>" of the image manifest (not of an index above it)
    blob_ids: list[str]  # sha256 hex of the nydus-blob layers, in manifest order
    layers: list[dict] = field(default_factory=list)  # the manifest's layer descriptors


class _Puller:
    def __init__(self, source: RegistrySource, reference: str, dest_dir: Path,
                 max_bootstrap_size: int, platform: Platform | None = None) -> None:
        self.src = source
        self.platform = platform
        self.reference = reference
        self.dest_dir = Path(dest_dir)
        self.max_bootstrap_size = max_bootstrap_size
        sep = "@" if reference.startswith("sha256:") else ":"
        self.image = f"{source.repo}{sep}{reference}"
        self.what = f"registry {source.host}/{self.image}"

    def error(self, why: str, cls: type[PullError] = PullError) -> PullError:
        return cls(f"{self.what}: {why}")

    # -- HTTP ------------------------------------------------------------------------------
    async def get(self, path: str, name: str, handler: Callable[[aiohttp.ClientResponse], Awaitable[Any]],
                  accept: str | None = None, timeout: aiohttp.ClientTimeout | None = None) -> Any:
        """GET <registry>/v2/<repo>/<path> through the source's client; `handler` consumes the
        200 response (restartable: the source retries). Request failures become PullError."""
        try:
            return await self.src.get(path, handler, accept=accept, what=f"{self.image}: {name}", timeout=timeout)
        except RegistryError as exc:
            raise self.error(f"{name}: {exc.why}") from None

    # -- manifests -------------------------------------------------------------------------
    async def fetch_manifest(self, reference: str, name: str) -> tuple[dict, str]:
        """(parsed manifest or index, "sha256:<hex>" of its bytes), verified for digests."""
        async def handler(resp: aiohttp.ClientResponse) -> tuple[bytes, str]:
            if resp.content_length is not None and resp.content_length > MAX_MANIFEST_SIZE:
                raise self.error(f"{name}: {resp.content_length} bytes, more than a manifest may be "
                                 f"({MAX_MANIFEST_SIZE})")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > MAX_MANIFEST_SIZE:
                    raise self.error(f"{name}: more than {MAX_MANIFEST_SIZE} bytes, too large for a manifest")
            return bytes(body), resp.headers.get("Content-Type", "").split(";")[0].strip()

        body, ctype = await self.get(f"manifests/{reference}", name, handler, accept=MANIFEST_ACCEPT)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise self.error(f"{name}: digest mismatch: asked for {reference}, the bytes received are {digest}",
                             PullIntegrityError)
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self.error(f"{name}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise self.error(f"{name}: not a JSON object")
        if obj.get("schemaVersion") == 1:
            raise self.error(f"{name}: Docker schema 1 manifests are not supported")
        if obj.get("mediaType") is None and ctype:
            obj["mediaType"] = ctype  # Docker v2 manifests always say it; OCI ones may not
        return obj, digest

    async def resolve_manifest(self) -> tuple[dict, str]:
        """Follow indexes down to the image manifest for the wanted platform."""
        name = "manifest"
        obj, digest = await self.fetch_manifest(self.reference, name)
        for depth in range(MAX_INDEX_DEPTH + 1):
            mt = obj.get("mediaType")
            if not is_index(obj):
                if mt not in (*MANIFEST_TYPES, None, ""):
                    raise self.error(f"{name} {digest}: unsupported media type {str(mt)[:100]!r}")
                return obj, digest
            if depth == MAX_INDEX_DEPTH:
                break
            chosen, plat = self.pick_platform(obj, f"index {digest}")
            name = f"manifest {chosen} ({plat} in index {digest})"
            obj, digest = await self.fetch_manifest(chosen, name)
        raise self.error(f"image indexes nested more than {MAX_INDEX_DEPTH} deep")

    def pick_platform(self, index: dict, where: str) -> tuple[str, str]:
        """(digest, platform) of the index entry for this machine (or the platform asked for)."""
        try:
            chosen = choose_manifest(index, self.platform)
        except PlatformError as exc:
            raise self.error(f"{where}: {exc}") from None
        digest = chosen.get("digest")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise self.error(f"{where}: manifest entry with unusable digest {str(digest)[:100]!r} (need sha256)")
        plat = chosen.get("platform") or {}
        shown = "/".join(str(plat.get(k)) for k in ("os", "architecture", "variant") if plat.get(k))
        return digest, shown or "the only image"

    # -- layers ----------------------------------------------------------------------------
    def layers(self, manifest: dict, mdigest: str) -> list[dict]:
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not layers:
            raise self.error(f"not a nydus image: manifest {mdigest} has no layers")
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise self.error(f"manifest {mdigest}: layer {i} is not an object")
            digest = layer.get("digest")
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                raise self.error(f"manifest {mdigest}: layer {i} has an unusable digest "
                                 f"{str(digest)[:100]!r} (need sha256:<hex>)")
            size = layer.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise self.error(f"manifest {mdigest}: layer {i} ({digest}) has no valid size")
        return layers

    async def download(self, layer: dict, tmp: Path, limit: int, name: str) -> None:
        """Stream the layer blob into `tmp`, checking size and sha256 as it arrives."""
        digest, size = layer["digest"], layer["size"]
        if size > limit:
            raise self.error(f"{name}: {size} bytes, more than the {limit} allowed")
        # a big layer may take longer than the source's per-request total: bound the idle time instead
        total = self.src.timeout.total
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.src.timeout.sock_connect,
                                        sock_read=total)

        async def handler(resp: aiohttp.ClientResponse) -> None:
            if resp.content_length is not None and resp.content_length != size:
                raise self.error(f"{name}: the registry sends {resp.content_length} bytes, the manifest "
                                 f"says {size}", PullIntegrityError)
            h = hashlib.sha256()
            n = 0
            # the disk work goes to a thread, a MiB at a time: other images' reads run on this loop
            f = await asyncio.to_thread(open, tmp, "wb")
            try:
                pending = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    n += len(chunk)
                    if n > size:
                        raise self.error(f"{name}: more than the {size} bytes the manifest says",
                                         PullIntegrityError)
                    h.update(chunk)
                    pending += chunk
                    if len(pending) >= _COPY:
                        full, pending = pending, bytearray()
                        await asyncio.to_thread(f.write, full)
                if pending:
                    await asyncio.to_thread(f.write, pending)
            finally:
                await asyncio.to_thread(f.close)
            if n != size:
                raise RetryableError(f"{name}: short body: {n} of {size} bytes")
            got = "sha256:" + h.hexdigest()
            if got != digest:
                raise self.error(f"{name}: digest mismatch: expected {digest}, got {got}", PullIntegrityError)

        await self.get(f"blobs/{digest}", name, handler, timeout=timeout)

    def extract(self, layer_file: Path, media_type: str, out: Path, name: str) -> bool:
        """Write image/image.boot from the (verified) layer into `out`; False when the tar
        holds no such entry. Runs in a thread."""
        with open(layer_file, "rb") as raw:
            magic = raw.read(4)
            raw.seek(0)
            if "zstd" in media_type or (not media_type.endswith("gzip") and magic == b"\x28\xb5\x2f\xfd"):
                kind = "zstd"
            elif media_type.endswith("gzip") or magic[:2] == b"\x1f\x8b":
                kind = "gzip"
            else:
                kind = "tar"
            found = False
            try:
                if kind == "zstd":
                    import zstandard

                    stream = zstandard.ZstdDecompressor().stream_reader(raw)
                    tf = tarfile.open(fileobj=stream, mode="r|")
                else:
                    tf = tarfile.open(fileobj=raw, mode="r|gz" if kind == "gzip" else "r|")
                with tf:
                    for member in tf:
                        entry = member.name
                        while entry.startswith("./"):
                            entry = entry[2:]
                        if entry != BOOTSTRAP_ENTRY:
                            continue  # never extracted: only image/image.boot leaves this function
                        if found:
                            raise self.error(f"{name}: {BOOTSTRAP_ENTRY} appears twice in the tar")
                        if not member.isreg():
                            raise self.error(f"{name}: {BOOTSTRAP_ENTRY} is not a regular file in the tar")
                        if member.size > self.max_bootstrap_size:
                            raise self.error(f"{name}: {BOOTSTRAP_ENTRY} is {member.size} bytes, more than "
                                             f"the {self.max_bootstrap_size} allowed")
                        src = tf.extractfile(member)
                        if src is None:  # a regular member always has a file object
                            raise self.error(f"{name}: {BOOTSTRAP_ENTRY} cannot be read from the tar")
                        n = 0
                        with open(out, "wb") as f:
                            while data := src.read(_COPY):
                                n += len(data)
                                f.write(data)
                            f.flush()
                            os.fsync(f.fileno())
                        if n != member.size:
                            raise self.error(f"{name}: {BOOTSTRAP_ENTRY} truncated in the tar")
                        found = True
            except (tarfile.TarError, zlib.error, EOFError, gzip.BadGzipFile) as exc:
                raise self.error(f"{name}: corrupt {kind} layer: "
                                 f"{type(exc).__name__}: {exc}") from None
            except Exception as exc:
                if type(exc).__name__ == "ZstdError":
                    raise self.error(f"{name}: corrupt zstd layer: {exc}") from None
                raise
        return found

    # -- the whole pull --------------------------------------------------------------------
    async def run(self) -> PulledImage:
        manifest, mdigest = await self.resolve_manifest()
        layers = self.layers(manifest, mdigest)
        boot_layers = [i for i, layer in enumerate(layers)
                       if (layer.get("annotations") or {}).get(ANN_NYDUS_BOOTSTRAP) == "true"]
        annotated = bool(boot_layers)
        if len(boot_layers) > 1:
            raise self.error(f"manifest {mdigest}: {len(boot_layers)} layers annotated "
                             f"{ANN_NYDUS_BOOTSTRAP}; expected one")
        boot_index = boot_layers[0] if annotated else len(layers) - 1
        boot = layers[boot_index]
        blob_ids = []
        for i, layer in enumerate(layers):
            if i == boot_index:
                continue
            if layer.get("mediaType") == NYDUS_BLOB or (layer.get("annotations") or {}).get(ANN_NYDUS_BLOB) == "true":
                blob_ids.append(layer["digest"][len("sha256:"):])
        hexd = mdigest[len("sha256:"):]
        dest = self.dest_dir / f"{hexd}.boot"
        result = PulledImage(dest, mdigest, blob_ids, layers)

        if await asyncio.to_thread(self.valid_bootstrap, dest):
            log.info("%s: bootstrap %s already present", self.what, dest)
            return result

        name = f"bootstrap layer {boot['digest']}"
        not_nydus = (f"not a nydus image: no layer is annotated {ANN_NYDUS_BOOTSTRAP}=true and the last "
                     f"layer ({boot['digest']}, {boot.get('mediaType', '?')})")
        limit = self.max_bootstrap_size + (1 << 20) + self.max_bootstrap_size // 100  # tar + gzip overhead
        if not annotated and boot["size"] > limit:
            raise self.error(f"{not_nydus} is {boot['size']} bytes, too large to hold a bootstrap")
        self.dest_dir.mkdir(parents=True, exist_ok=True)
        fd, layer_tmp = tempfile.mkstemp(prefix=f".{hexd}.", suffix=".layer.tmp", dir=self.dest_dir)
        os.close(fd)
        fd, boot_tmp = tempfile.mkstemp(prefix=f".{hexd}.", suffix=".boot.tmp", dir=self.dest_dir)
        os.close(fd)
        try:
            await self.download(boot, Path(layer_tmp), limit, name)
            found = await asyncio.to_thread(self.extract, Path(layer_tmp), str(boot.get("mediaType", "")),
                                            Path(boot_tmp), name)
            if not found:
                if annotated:
                    raise self.error(f"{name}: the tar holds no {BOOTSTRAP_ENTRY}")
                raise self.error(f"{not_nydus} holds no {BOOTSTRAP_ENTRY}")
            problem = await asyncio.to_thread(_bootstrap_problem, Path(boot_tmp))
            if problem:
                raise self.error(f"{name}: {BOOTSTRAP_ENTRY} is not an EROFS (RAFS v6) bootstrap: {problem}")
            os.chmod(boot_tmp, 0o644)
            os.replace(boot_tmp, dest)
            _fsync_dir(self.dest_dir)
        finally:
            for p in (layer_tmp, boot_tmp):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        log.info("%s: pulled bootstrap %s (%d bytes, %d blobs)", self.what, dest, dest.stat().st_size,
                 len(blob_ids))
        return result

    def valid_bootstrap(self, path: Path) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        problem = _bootstrap_problem(path) if os.path.isfile(path) else "not a regular file"
        if problem is None and st.st_size <= self.max_bootstrap_size:
            return True
        log.warning("%s: existing %s is unusable (%s); pulling it again", self.what, path,
                    problem or "too large")
        return False


def _bootstrap_problem(path: Path) -> str | None:
    """None when `path` starts like an EROFS image (superblock magic, checksum, block count)."""
    from erofs_image import layout as L

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            block0 = f.read(L.BLOCK_SIZE)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if len(block0) < L.SUPER_OFFSET + L.SUPER_SIZE:
        return f"truncated ({size} bytes)"
    sb = L.Superblock.unpack(block0[L.SUPER_OFFSET:])
    if sb.magic != _EROFS_MAGIC:
        return f"bad magic {sb.magic:#x}"
    if len(block0) < L.BLOCK_SIZE:
        return f"truncated ({size} bytes)"
    if sb.feature_compat & L.FEATURE_COMPAT_SB_CHKSUM and L.superblock_checksum(block0) != sb.checksum:
        return "superblock checksum mismatch"
    if sb.blocks and sb.blocks * L.BLOCK_SIZE > size and not sb.feature_compat & L.FEATURE_COMPAT_RAFS_V6:
        return f"truncated: {size} bytes, superblock says {sb.blocks} blocks"
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


async def pull_bootstrap(source: RegistrySource, reference: str, dest_dir: Path, *,
                         max_bootstrap_size: int = MAX_BOOTSTRAP_SIZE,
                         platform: Platform | None = None) -> PulledImage:
    """Fetch `reference` (a tag or "sha256:<hex>") of `source`'s repository and write its nydus
    bootstrap to `dest_dir/<manifest digest hex>.boot` (reused when already there). From an
    index, the image for `platform` is taken, by default the running machine's."""
    try:
        reference = check_reference(reference)
    except ValueError as exc:
        raise PullError(f"registry {source.host}/{source.repo}: {exc}") from None
    return await _Puller(source, reference, Path(dest_dir), max_bootstrap_size, platform).run()
