"""What nydusd checks before it serves a RAFS v6 bootstrap, applied to ours (and, as a check of
the checker, to the nydus-built fixture).

The rules are nydus-rafs's `RafsV6SuperBlock::validate` and `RafsV6SuperBlockExt::validate`
(rafs/src/metadata/layout/v6.rs, the same in nydus 2.2.0 and 2.4), plus the assertion of RAFS
v6's `ino()` (direct_v6.rs: the inode number is the nid, and nid 0 aborts nydusd). Our writer
broke three of them until bench/nydusd.py ran nydusd on our images: it set SB_CHKSUM ("invalid
checksum ... in Rafsv6 superblock"), put the chunk table right after the blob table ("invalid
chunk table offset 0x1100"), and gave the root nid 0 (a panic at mount); and an image with no
data blob (a layer of directories and empty files) had its bootstrap's block count in s_blocks
("invalid extra device count").
"""
from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from erofs_image import layout as L
from erofs_image import rafs as R
from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from test_format_helpers import FIXTURE_DIR

BS = 4096
COMPRESSION = R.FLAG_COMPRESSION_NONE | R.FLAG_COMPRESSION_LZ4 | R.FLAG_COMPRESSION_GZIP | R.FLAG_COMPRESSION_ZSTD
HASH = R.FLAG_HASH_BLAKE3 | R.FLAG_HASH_SHA256


def nydusd_refusals(raw: bytes) -> list[str]:
    """Each rule of nydusd's the bootstrap breaks, in nydusd's words (empty: it would load)."""
    out = []
    n = len(raw)
    sb = L.Superblock.unpack(raw[L.SUPER_OFFSET:L.SUPER_OFFSET + L.SUPER_SIZE])
    if n < BS or n % BS:
        out.append(f"invalid Rafs v6 metadata size: {n}")
    if sb.magic != L.EROFS_MAGIC:
        out.append(f"invalid EROFS magic number {sb.magic:#x}")
    if sb.checksum != 0:
        out.append(f"invalid checksum {sb.checksum} in Rafsv6 superblock")
    if sb.blkszbits != 12:
        out.append(f"invalid block size bits {sb.blkszbits}")
    if sb.inos == 0:
        out.append("invalid inode number")
    if sb.sb_extslots != 0:
        out.append("invalid extended slots")
    if sb.u1 != 0:
        out.append("invalid union field")
    if sb.xattr_blkaddr != 0:
        out.append("unsupported shared extended attribute namespace")
    if sb.extra_devices == 0 and sb.blocks not in (0, 4096):
        out.append("invalid extra device count")
    if sb.devt_slotoff * 128 != R.DEVICE_TABLE_OFFSET:
        out.append(f"invalid device table slot offset {sb.devt_slotoff}")
    if sb.feature_incompat != L.FEATURE_INCOMPAT_CHUNKED_FILE | L.FEATURE_INCOMPAT_DEVICE_TABLE:
        out.append("invalid incompatible feature bits")
    if not sb.feature_compat & L.FEATURE_COMPAT_RAFS_V6:
        out.append("invalid compatible feature bits")
    if sb.root_nid == 0:
        out.append("root nid 0: `assertion failed: self.offset > self.mapping.info.meta_offset`")
    ext = R.RafsSuperExt.unpack(raw)
    if bin(ext.flags & COMPRESSION).count("1") != 1:
        out.append(f"invalid flags {ext.flags:#x} related to compression algorithm")
    if bin(ext.flags & HASH).count("1") != 1:
        out.append(f"invalid flags {ext.flags:#x} related to digest algorithm")
    cs = ext.chunk_size
    if cs & (cs - 1) or not BS <= cs <= 16 << 20:
        out.append("invalid chunk size")
    bo, bsz = ext.blob_table_offset, ext.blob_table_size
    if bo % BS or bo < BS or bsz % R.BLOB_ENTRY_SIZE or bo + bsz > n:
        out.append(f"invalid blob table offset {bo:#x}/size {bsz:#x}")
    co, csz = ext.chunk_table_offset, ext.chunk_table_size
    if csz:
        if co < BS or co % BS or csz % R.CHUNK_INFO_SIZE or co + csz > n:
            out.append(f"invalid chunk table offset {co:#x}/size {csz:#x}")
        elif co < bo + bsz and bo < co + csz:
            out.append("blob table intersects with chunk table")
    po, psz = ext.prefetch_table_offset, ext.prefetch_table_size
    if psz and po:
        if po < BS or psz % 4 or po + psz > n:
            out.append(f"invalid prefetch table offset {po:#x}/size {psz:#x}")
        elif po < bo + bsz and bo < po + psz:
            out.append("blob table intersects with prefetch table")
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("nydusd-rules")
    src = tmp / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hello").write_bytes(b"hello\n")
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    (src / "link").symlink_to("etc/hello")
    for i in range(200):  # a directory over one block
        (src / "etc" / f"entry-{i:04d}").write_bytes(b"x" * i)
    convert(src, tmp / "out", compressor="zstd", chunk_size=1 << 20, progress=False, prefetch=["/etc/hello"])
    return tmp / "out" / "image.boot"


def test_our_bootstrap_breaks_no_rule_of_nydusd(ours: Path) -> None:
    raw = ours.read_bytes()
    assert nydusd_refusals(raw) == []
    boot = Bootstrap.open(ours)
    assert boot.superblock.root_nid == 128 and not boot.superblock.feature_compat & L.FEATURE_COMPAT_SB_CHKSUM
    assert boot.prefetch_nids and boot.chunk_table
    # no inode anywhere has nid 0 (nydusd's inode number)
    stack = [boot.image.root]
    while stack:
        node = stack.pop()
        assert node.nid, "an inode with nid 0"
        if stat.S_ISDIR(node.mode):
            stack.extend(node.children.values())


def test_an_image_without_data_breaks_no_rule_of_nydusd(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(300):  # the directory over several blocks: the bootstrap is not one block
        (src / "d" / f"empty-file-with-a-long-name-{i}").touch()
    convert(src, tmp_path / "out", progress=False)
    raw = (tmp_path / "out" / "image.boot").read_bytes()
    assert len(raw) > BS and L.Superblock.unpack(raw[L.SUPER_OFFSET:]).extra_devices == 0
    assert nydusd_refusals(raw) == []


def test_the_checker_finds_what_nydusd_refused(ours: Path) -> None:
    raw = bytearray(ours.read_bytes())
    struct.pack_into("<I", raw, L.SUPER_OFFSET + 4, 940378858)
    assert any("invalid checksum" in r for r in nydusd_refusals(bytes(raw)))
    raw = bytearray(ours.read_bytes())
    off = R.EXT_SUPER_OFFSET + 24  # s_chunk_table_offset
    struct.pack_into("<Q", raw, off, struct.unpack_from("<Q", raw, off)[0] + 256)
    assert any("invalid chunk table offset" in r for r in nydusd_refusals(bytes(raw)))


def test_the_nydus_built_fixture_passes_the_checker() -> None:
    assert (FIXTURE_DIR / "rafs-v6-2.2.boot").exists(), f"the nydus-built fixture is missing from {FIXTURE_DIR}"
    assert nydusd_refusals((FIXTURE_DIR / "rafs-v6-2.2.boot").read_bytes()) == []
