"""erofs_image.index: what the daemon serves a bootstrap from (superblocks, blob and chunk tables,
no tree) holds exactly the chunks the whole parse finds, and refuses a bad chunk table in one line."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from erofs_image import rafs as R
from erofs_image.builder import convert
from erofs_image.index import BootstrapIndex, open_served
from erofs_image.reader import Bootstrap, BootstrapError
from fscached.core.chunkmap import ChunkMap, chunks_by_blob
from test_format_helpers import FIXTURE_DIR

CS = 64 * 1024
NYDUS_BOOT = FIXTURE_DIR / "rafs-v6-2.2.boot"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("index")
    src = tmp / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "multi").write_bytes(os.urandom(3 * CS + 100))
    (src / "same-a").write_bytes(b"dedup\n" * 1000)
    (src / "same-b").write_bytes(b"dedup\n" * 1000)  # one chunk for both
    for i in range(50):
        (src / f"f{i}").write_bytes(os.urandom(100 + 997 * i))
    convert(src, tmp / "out", compressor="zstd", chunk_size=CS, progress=False)
    return tmp / "out" / "image.boot"


@pytest.mark.parametrize("which", ["ours", "nydus"])
def test_the_index_holds_exactly_the_chunks_the_tree_references(image: Path, which: str) -> None:
    path = image if which == "ours" else NYDUS_BOOT
    index = BootstrapIndex.open(path)
    assert index is not None
    whole = Bootstrap.open(path)
    assert index.blobs == whole.blobs
    grouped = chunks_by_blob(whole.image)
    for i, blob in enumerate(whole.blobs):
        want = ChunkMap(grouped.get(i, []), blob.uncompressed_size)
        got = ChunkMap.from_index(index.chunks[i], blob.uncompressed_size)
        assert len(got) == len(want)
        assert got.ranges() == want.ranges()
        assert got.chunks == want.chunks  # made lazily, equal field by field (digests included)
        mid = want.chunks[len(want.chunks) // 2].uncompressed_offset
        assert got.chunks_in(mid, mid + 3 * CS) == want.chunks_in(mid, mid + 3 * CS)
        assert got.spans(mid + 10, 2 * CS) == want.spans(mid + 10, 2 * CS)


def corrupt(image: Path, tmp: Path, entry: int, field_at: int, fmt: str, value: int) -> Path:
    data = bytearray(image.read_bytes())
    ext = R.RafsSuperExt.unpack(bytes(data))
    struct.pack_into(fmt, data, ext.chunk_table_offset + entry * R.CHUNK_INFO_SIZE + field_at, value)
    out = tmp / "bad.boot"
    out.write_bytes(bytes(data))
    return out


def test_a_bad_chunk_table_entry_is_refused_in_one_line(image: Path, tmp_path: Path) -> None:
    bad = corrupt(image, tmp_path, 3, 32, "<I", 7)  # blob index 7 of 1
    with pytest.raises(BootstrapError, match=r"chunk table entry 3: blob index 7 past the blob table \(1 blobs\)"):
        BootstrapIndex.open(bad)
    bad = corrupt(image, tmp_path, 2, 44, "<I", 0)  # uncompressed size 0
    with pytest.raises(BootstrapError, match=r"chunk table entry 2 .*impossible uncompressed size"):
        BootstrapIndex.open(bad)
    index = BootstrapIndex.open(image)
    assert index is not None
    second = index.chunks[0].ref(1)
    # the second chunk moved onto the first one: an overlap
    entry = bytes(index.chunks[0]._table[index.chunks[0]._order[1] * 80:][:80])
    at = struct.unpack_from("<Q", entry, 56)[0]
    assert at == second.uncompressed_offset
    bad = corrupt(image, tmp_path, index.chunks[0]._order[1], 56, "<Q", index.chunks[0].ref(0).uncompressed_offset)
    with pytest.raises(BootstrapError, match="chunks overlap at uncompressed offset"):
        BootstrapIndex.open(bad)


def test_truncated_and_foreign_files(image: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.boot"
    short.write_bytes(image.read_bytes()[:4096 + 100])
    with pytest.raises(BootstrapError, match="past the end of the file"):
        BootstrapIndex.open(short)
    junk = tmp_path / "junk.boot"
    junk.write_bytes(os.urandom(8192))
    with pytest.raises(BootstrapError, match="bad superblock magic"):
        BootstrapIndex.open(junk)
    with pytest.raises(BootstrapError, match="not a regular file"):
        BootstrapIndex.open(tmp_path)


def test_open_served_takes_the_index_and_the_catalog_serves_from_it(image: Path) -> None:
    from fetcher.chain import SourceChain
    from fetcher.local import LocalDirectorySource
    from fscached.config import ImageSpec
    from fscached.core.catalog import Catalog, open_bootstrap

    assert isinstance(open_served(image), BootstrapIndex)
    spec = ImageSpec(fsid="x", bootstrap=image, blobs=image.parent / "blobs")
    parsed = open_bootstrap(spec, image)
    assert isinstance(parsed, BootstrapIndex)
    catalog = Catalog()
    catalog.add_image(spec, image, SourceChain([LocalDirectorySource(image.parent / "blobs")]), parsed)
    blob = catalog.devices[(spec.volume, spec.fsid)][0]
    whole = Bootstrap.open(image)
    assert blob.chunk_map.chunks == sorted(chunks_by_blob(whole.image)[0], key=lambda c: c.uncompressed_offset)
