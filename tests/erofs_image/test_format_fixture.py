"""The nydus-built fixture decodes as documented (docs: erofs-format.md, "Decoded fixture")."""
from __future__ import annotations


import pytest

from erofs_image import rafs as R
from erofs_image.reader import Bootstrap, read_blob_ci_table
from erofs_image.tree import walk
from test_format_helpers import FIXTURE_DIR

BOOT = FIXTURE_DIR / "rafs-v6-2.2.boot"
BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
PREFIX = b"// Copyright (C) 2020 Alibaba Cloud. All rights re"

pytestmark = pytest.mark.skipif(not BOOT.exists(), reason=f"fixture missing: {BOOT}")


@pytest.fixture(scope="module")
def boot() -> Bootstrap:
    return Bootstrap.open(BOOT)


def test_tree_listing(boot: Bootstrap) -> None:
    listing = {p: (n.size, n.is_reg) for p, n in walk(boot.image.root)}
    assert listing[b"/lib.rs"] == (16931, True)
    assert listing[b"/sync_io.rs"] == (13400, True)
    assert set(listing) == {b"/", b"/lib.rs", b"/sync_io.rs"}
    assert boot.chunk_size == 1 << 20
    assert boot.superblock.root_nid == 128
    assert boot.superblock.feature_incompat == 0x0C


def test_read_files_through_blob(boot: Bootstrap) -> None:
    for name, size in ((b"lib.rs", 16931), (b"sync_io.rs", 13400)):
        data = boot.read_file(boot.image.root.children[name], FIXTURE_DIR)
        assert len(data) == size
        assert data.startswith(PREFIX)


def test_blob_table(boot: Bootstrap) -> None:
    (b,) = boot.blobs
    assert b.blob_id == BLOB_ID
    assert (b.chunk_size, b.chunk_count, b.compressor, b.digest_algo) == (1 << 20, 2, "zstd", "blake3")
    assert b.features == 0x70000021
    assert (b.compressed_size, b.uncompressed_size) == (14554, 36864)
    assert (b.ci_offset, b.ci_compressed_size, b.ci_uncompressed_size) == (8314, 32, 32)
    assert boot.devices[0].tag == BLOB_ID.encode() and boot.devices[0].blocks == 9


def test_chunk_table_and_blob_ci_table_agree(boot: Bootstrap) -> None:
    assert boot.ext.chunk_table_offset == 16384 and boot.ext.chunk_table_size == 160
    header, entries = read_blob_ci_table(FIXTURE_DIR / BLOB_ID, boot.blobs[0])
    assert header.ci_entries == 2 and header.ci_offset == 8314 and header.ci_compressor == 0
    assert header.features == 0x70000021
    assert [(e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size)
            for e in entries] == [(0, 4828, 0, 16931), (4828, 2974, 20480, 13400)]
    raw = (FIXTURE_DIR / BLOB_ID).read_bytes()
    assert int.from_bytes(raw[8346:8350], "little") == R.CI_MAGIC
    for ci in boot.chunk_table:
        e = entries[ci.index]
        assert (e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size) == (
            ci.compressed_offset, ci.compressed_size, ci.uncompressed_offset, ci.uncompressed_size)
        assert ci.compressed
    # re-encoding reproduces the on-disk bytes
    for i, e in enumerate(entries):
        assert e.pack() == raw[8314 + 16 * i:8314 + 16 * (i + 1)]
    assert header.pack() == raw[8346:8346 + 4096]


def test_chunk_refs_use_ci_index_not_table_position(boot: Bootstrap) -> None:
    # the fixture's chunk table lists sync_io.rs's chunk (ci index 1) first
    assert [c.index for c in boot.chunk_table] == [1, 0]
    lib = boot.image.root.children[b"lib.rs"].chunks[0]
    sio = boot.image.root.children[b"sync_io.rs"].chunks[0]
    assert (lib.index, lib.uncompressed_offset, lib.uncompressed_size) == (0, 0, 16931)
    assert (sio.index, sio.uncompressed_offset, sio.uncompressed_size) == (1, 20480, 13400)
