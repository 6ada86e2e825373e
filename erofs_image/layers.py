"""Apply OCI/Docker tar layers onto an `Image` tree.

A layer is read as a stream (`tarfile` mode ``r|``): gzip and zstd are detected by their
magic bytes, anything else is read as a plain tar. Regular files' data goes straight into
the `ChunkStore` chunk by chunk; nothing reads a whole file into memory.

OCI whiteouts are resolved here (the output image is one merged tree): ``.wh.NAME`` removes
NAME coming from lower layers, ``.wh..wh..opq`` hides everything a directory got from lower
layers while keeping what this same layer puts in it, whatever the member order.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import stat
import tarfile
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from .tree import ChunkRef, Image, Inode
from .whiteout import OPAQUE_MARKER, WHITEOUT_PREFIX

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class BuildError(Exception):
    """An expected build failure; the message names the file and the reason."""


class ChunkSink(Protocol):  # the part of ChunkStore this module uses
    def add_stream(self, read: Callable[[int], bytes], size: int) -> list[ChunkRef | None]: ...


class Readable(Protocol):
    """What a layer is read from: a binary file, or anything with its read()."""

    def read(self, n: int = -1, /) -> bytes: ...


def new_dir(mode: int = 0o755) -> Inode:
    return Inode(mode=stat.S_IFDIR | (mode & 0o7777))


# --------------------------------------------------------------------------- readers


class CountingReader:
    """Wraps a binary file: counts bytes, optionally hashes them, reports progress."""

    def __init__(self, raw: Readable, name: str, expected_digest: str | None = None,
                 on_bytes: Callable[[int], None] | None = None):
        self.raw = raw
        self.name = name
        self.count = 0
        self.on_bytes = on_bytes
        self.expected = expected_digest
        self.hasher = None
        if expected_digest:
            algo, _, hexd = expected_digest.partition(":")
            if algo not in ("sha256", "sha512") or not hexd:
                raise BuildError(f"{name}: unsupported digest {expected_digest!r}")
            self.hasher = hashlib.new(algo)

    def read(self, n: int = -1, /) -> bytes:
        data = self.raw.read(n)
        if data:
            self.count += len(data)
            if self.hasher is not None:
                self.hasher.update(data)
            if self.on_bytes is not None:
                self.on_bytes(len(data))
        return data

    def drain_and_verify(self) -> None:
        """Read to the end (tar readers stop early) and check the digest, if one is expected."""
        while self.read(1 << 20):
            pass
        if self.hasher is not None:
            got = f"{self.hasher.name}:{self.hasher.hexdigest()}"
            if got != self.expected:
                raise BuildError(f"{self.name}: digest mismatch: expected {self.expected}, "
                                 f"got {got} ({self.count} bytes)")


class _Prefixed(io.RawIOBase):
    """A raw stream that first returns `head`, then the rest of `raw`: the magic bytes read
    to tell the compression apart go back in front of the stream."""

    def __init__(self, head: bytes, raw: Readable):
        super().__init__()
        self.head = head
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        out = memoryview(buffer).cast("B")
        if self.head:
            n = min(len(out), len(self.head))
            out[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.raw.read(len(out))
        out[:len(data)] = data
        return len(data)


def _read_exact(raw: Readable, n: int) -> bytes:
    out = b""
    while len(out) < n:
        d = raw.read(n - len(out))
        if not d:
            break
        out += d
    return out


def open_tar_stream(raw: Readable, name: str) -> tuple[tarfile.TarFile, Readable]:
    """A streaming TarFile over `raw`, decompressing gzip or zstd (detected by magic), and
    the decompressed stream under it (read it to its end to check the gzip/zstd trailers)."""
    head = _read_exact(raw, 4)
    stream = io.BufferedReader(_Prefixed(head, raw), buffer_size=1 << 16)
    plain: Readable
    try:
        if head.startswith(ZSTD_MAGIC):
            import zstandard

            plain = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
        elif head.startswith(GZIP_MAGIC):
            # GzipFile (not tarfile's "r|gz") checks each member's CRC32 and length
            plain = gzip.GzipFile(fileobj=stream, mode="rb")
        elif not head:
            raise BuildError(f"{name}: empty layer (not a tar archive)")
        else:
            plain = stream
        return tarfile.open(fileobj=plain, mode="r|"), plain
    except BuildError:
        raise
    except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
        reason = _reason(e)
        if not reason.startswith(("corrupt", "truncated")):
            reason = f"not a readable tar archive: {reason}"
        raise BuildError(f"{name}: {reason}") from None
    except Exception as e:
        if type(e).__module__.startswith("zstandard"):
            raise BuildError(f"{name}: {_reason(e)}") from None
        raise


def _reason(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    if isinstance(e, EOFError) or "unexpected end" in msg:
        return f"truncated archive ({msg})"
    if isinstance(e, (zlib.error, gzip.BadGzipFile)) or "invalid compressed data" in msg \
            or "gzip" in msg or "CRC" in msg or "zlib" in msg:
        return f"corrupt gzip data ({msg})"
    if type(e).__module__.startswith("zstandard") or "zstd" in msg.lower():
        return f"corrupt zstd data ({msg})"
    return msg


# --------------------------------------------------------------------------- paths


def normalize(name: str | bytes, what: str = "member") -> list[bytes]:
    """Split an archive path into components; refuse '..' (escapes the root)."""
    b = os.fsencode(name)
    parts = []
    for part in b.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            raise ValueError(f"{what} path escapes the image root via '..'")
        parts.append(part)
    return parts


def pax_mtime(ti: tarfile.TarInfo) -> tuple[int, int]:
    """(seconds, nanoseconds) from the PAX mtime string when there is one."""
    raw = ti.pax_headers.get("mtime")
    if raw:
        try:
            neg = raw.startswith("-")
            whole, _, frac = raw.lstrip("-").partition(".")
            sec, nsec = int(whole or "0"), int((frac + "000000000")[:9])
            if neg:
                if nsec:
                    sec, nsec = -sec - 1, 1_000_000_000 - nsec
                else:
                    sec = -sec
            return sec, nsec
        except ValueError:
            pass
    return int(ti.mtime), 0


def pax_xattrs(ti: tarfile.TarInfo) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")] = \
                value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
            try:
                out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue
    return out


# --------------------------------------------------------------------------- applying


@dataclass
class LayerStats:
    members: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0


class _LayerApplier:
    def __init__(self, image: Image, store: ChunkSink, name: str):
        self.image = image
        self.store = store
        self.name = name
        # paths (b"a/b") this layer put in the tree, with their ancestors: opaque dirs and
        # whiteouts only act on what lower layers left there.
        self.mine: set[bytes] = set()
        self.opaque: list[list[bytes]] = []
        self.stats = LayerStats()

    def fail(self, member: str, reason: str) -> BuildError:
        return BuildError(f"{self.name}: member {member!r}: {reason}")

    # -- tree helpers

    def parent_dir(self, parts: list[bytes], member: str) -> Inode:
        """The directory `parts` goes in, made (with its ancestors) when missing."""
        node = self.image.root
        for i, part in enumerate(parts[:-1]):
            child = node.children.get(part)
            if child is None:
                child = new_dir()
                child.mtime = self.image.root.mtime
                node.children[part] = child
            elif child.is_symlink:
                raise self.fail(member, "parent path "
                                f"{b'/'.join(parts[:i + 1]).decode(errors='replace')!r} "
                                "is a symlink (refusing to write through it)")
            elif not child.is_dir:
                raise self.fail(member, "parent path "
                                f"{b'/'.join(parts[:i + 1]).decode(errors='replace')!r} "
                                "is not a directory")
            node = child
        return node

    def mark(self, parts: list[bytes]) -> None:
        for i in range(1, len(parts) + 1):
            self.mine.add(b"/".join(parts[:i]))

    def prune_lower(self, node: Inode, prefix: bytes) -> None:
        """Remove everything under `node` that this layer did not put there."""
        for name in list(node.children):
            path = prefix + name if not prefix else prefix + b"/" + name
            if path not in self.mine:
                del node.children[name]
            elif node.children[name].is_dir:
                self.prune_lower(node.children[name], path)

    # -- members

    def apply_opaque(self) -> None:
        for parts in self.opaque:
            node = self.find(parts)
            if node is not None and node.is_dir:
                self.prune_lower(node, b"/".join(parts))

    def member(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        member = ti.name
        if ti.issparse():
            raise self.fail(member, "sparse tar members are not supported")
        try:
            parts = normalize(ti.name)
        except ValueError as e:
            raise self.fail(member, str(e)) from None

        if not parts:  # the root itself ("./" or "/")
            if ti.isdir():
                self.set_meta(self.image.root, ti)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self.whiteout(parts, member)
            return

        parent = self.parent_dir(parts, member)
        existing = parent.children.get(base)

        if ti.isdir():
            if existing is not None and existing.is_dir:
                self.set_meta(existing, ti)
            else:
                node = new_dir()
                self.set_meta(node, ti)
                parent.children[base] = node
            self.mark(parts)
            return

        if ti.islnk():
            try:
                target_parts = normalize(ti.linkname, "hard link target")
            except ValueError as e:
                raise self.fail(member, str(e)) from None
            target = self.find(target_parts)
            if target is None:
                raise self.fail(member, f"hard link target {ti.linkname!r} does not exist "
                                "in this layer or the layers below")
            if target.is_dir:
                raise self.fail(member, f"hard link target {ti.linkname!r} is a directory")
            parent.children[base] = target
            self.mark(parts)
            return

        node = Inode(mode=0)
        self.set_meta(node, ti)
        if ti.isreg() or ti.type == tarfile.CONTTYPE:
            node.mode |= stat.S_IFREG
            node.size = ti.size
            node.chunks = self.file_data(tf, ti, member)
            self.stats.files += 1
            self.stats.bytes += ti.size
        elif ti.issym():
            # 0777 whatever the header says: a symlink's own mode means nothing on Linux, and
            # every unpacker (tar, docker, containerd) makes it lrwxrwxrwx
            node.mode = stat.S_IFLNK | 0o777
            node.target = os.fsencode(ti.linkname)
            node.size = len(node.target)
        elif ti.ischr() or ti.isblk():
            node.mode |= stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
            node.rdev = os.makedev(ti.devmajor, ti.devminor)
        elif ti.isfifo():
            node.mode |= stat.S_IFIFO
        else:
            raise self.fail(member, f"unsupported tar member type {ti.type!r}")
        parent.children[base] = node
        self.mark(parts)

    def whiteout(self, parts: list[bytes], member: str) -> None:
        self.stats.whiteouts += 1
        base = parts[-1]
        if base == OPAQUE_MARKER:
            self.parent_dir(parts, member)  # the dir exists (implicitly) in this layer
            self.mark(parts[:-1])
            self.opaque.append(parts[:-1])
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk ...): not part of the tree
        victim = parts[:-1] + [base[len(WHITEOUT_PREFIX):]]
        if b"/".join(victim) in self.mine:
            return  # whiteouts only hide lower layers' entries
        parent = self.find(parts[:-1])  # no lookup through symlinks: nothing to hide there
        if parent is not None and parent.is_dir:
            parent.children.pop(victim[-1], None)

    def find(self, parts: list[bytes]) -> Inode | None:
        node = self.image.root
        for part in parts:
            if not node.is_dir:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def set_meta(self, node: Inode, ti: tarfile.TarInfo) -> None:
        node.mode = stat.S_IFMT(node.mode) | (ti.mode & 0o7777)
        node.uid, node.gid = ti.uid, ti.gid
        node.mtime, node.mtime_nsec = pax_mtime(ti)
        node.xattrs = pax_xattrs(ti)

    def file_data(self, tf: tarfile.TarFile, ti: tarfile.TarInfo, member: str):
        f = tf.extractfile(ti)
        if f is None:
            raise self.fail(member, "cannot read file data")
        remaining = [ti.size]

        def read(n: int) -> bytes:
            n = min(n, remaining[0])
            out = f.read(n)
            while len(out) < n:
                more = f.read(n - len(out))
                if not more:
                    raise self.fail(member, "truncated archive (file data ends early)")
                out += more
            remaining[0] -= len(out)
            return out

        try:
            return self.store.add_stream(read, ti.size)
        except BuildError:
            raise
        except (tarfile.TarError, zlib.error, EOFError, gzip.BadGzipFile) as e:
            raise self.fail(member, _reason(e)) from None
        except Exception as e:
            if type(e).__module__.startswith("zstandard"):
                raise self.fail(member, _reason(e)) from None
            raise


def apply_layer(image: Image, raw: Readable, store: ChunkSink, name: str) -> LayerStats:
    """Merge the tar layer read from `raw` into `image`; `name` is used in error messages."""
    tf, plain = open_tar_stream(raw, name)
    applier = _LayerApplier(image, store, name)
    where = "at the first member"
    try:
        for ti in tf:
            where = f"after member {ti.name!r}"
            applier.stats.members += 1
            applier.member(tf, ti)
            # stream mode keeps every TarInfo otherwise: O(members) memory. typeshed's TarFile
            # does not declare the `members` list it keeps (CPython's tarfile has it since 2.x)
            tf.members.clear()  # type: ignore[attr-defined]
        applier.apply_opaque()
        where = f"at the end of the archive ({where})"
        while plain.read(1 << 20):  # to the end: checks the gzip CRC / zstd checksum
            pass
    except BuildError:
        raise
    except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
        raise BuildError(f"{name}: {where}: {_reason(e)}") from None
    except Exception as e:
        if type(e).__module__.startswith("zstandard"):
            raise BuildError(f"{name}: {where}: {_reason(e)}") from None
        raise
    return applier.stats

