"""The read window around a miss (Filler.read_window): the configured one for local blobs, and
for a network source what its link carries in one request's fixed cost (fetcher.link), learnt
from the reads the chain timed. A real image, the real registry and local sources."""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from erofs_image.builder import convert
from fetcher.chain import SourceChain
from fetcher.link import LinkEstimate
from fetcher.local import LocalDirectorySource
from fetcher.registry import RegistrySource
from fscached.config import ImageSpec
from fscached.core.catalog import BlobObject, Catalog
from fscached.core.fill import MIN_READ_WINDOW, UNKNOWN_LINK_WINDOW, Filler

MIB = 1 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("tree")
    (tree / "data").write_bytes(os.urandom(3 * MIB))
    out = tmp_path_factory.mktemp("image") / "built"
    convert(tree, out, compressor="none", chunk_size=64 << 10)
    return out


def blob_of(image: Path, chain: SourceChain) -> BlobObject:
    spec = ImageSpec(fsid="w", bootstrap=image / "image.boot", blobs=image / "blobs")
    catalog = Catalog()
    catalog.add_image(spec, image / "image.boot", chain)
    (blob,) = catalog.devices[(spec.volume, spec.fsid)]
    return blob


def feed(chain: SourceChain, blob: BlobObject, fixed: float, rate: float) -> None:
    """The chain timed reads of the blob's source on a link of that fixed cost and rate."""
    name = chain.sources[-1].name
    chain.served_by[blob.info.blob_id] = name
    link = chain.links[name] = LinkEstimate()
    for n in (64 << 10, 256 << 10, MIB, 4 * MIB) * 4:
        link.observe(n, fixed + n / rate)


def filler(window: int = MIB) -> Filler:
    return Filler(ThreadPoolExecutor(1), Counter(), window)


def test_a_local_blob_gets_the_configured_window(image: Path) -> None:
    chain = SourceChain([LocalDirectorySource(image / "blobs")])
    assert not chain.is_remote("any")
    assert filler().read_window(blob_of(image, chain)) == MIB


def test_a_registry_blob_starts_at_the_unknown_link_window_then_follows_its_link(image: Path, registry) -> None:
    chain = SourceChain([RegistrySource(registry.host, "fscached/window", scheme="http")])
    blob = blob_of(image, chain)
    fill = filler()
    assert chain.is_remote(blob.info.blob_id)
    assert fill.read_window(blob) == UNKNOWN_LINK_WINDOW  # nothing timed yet
    feed(chain, blob, 0.005, 12.5e6)  # 100 Mbit/s, 5 ms a request: 62.5 KB per request's cost
    assert fill.read_window(blob) == MIN_READ_WINDOW
    feed(chain, blob, 0.005, 125e6)  # 1 Gbit/s: 625 KB
    assert fill.read_window(blob) == 512 << 10
    feed(chain, blob, 0.002, 2e9)  # a loopback: 4 MB, more than the configured window
    assert fill.read_window(blob) == MIB
    assert filler(128 << 10).read_window(blob) == 128 << 10  # the configured window is the largest


def test_reads_through_the_real_registry_are_timed_per_source(image: Path, registry, tmp_path: Path) -> None:
    """The chain times every ranged read of a network source (not local files) and remembers
    which source served each blob: the estimate is that source's."""
    import asyncio

    data = os.urandom(4 * MIB)
    digest = registry.push_blob("fscached/window", data)
    remote = RegistrySource(registry.host, "fscached/window", scheme="http")
    local_dir = tmp_path / "blobs"
    local_dir.mkdir()
    local = LocalDirectorySource(local_dir)
    chain = SourceChain([local, remote])

    async def reads() -> None:
        try:
            for n in (4096, 64 << 10, 256 << 10, MIB, 3 * MIB, 8192):
                got = await chain.read_verified(digest, 0, n, lambda raw: raw, local=True)
                assert bytes(got) == data[:n]
        finally:
            await chain.close()

    asyncio.run(reads())
    assert chain.served_by[digest] == remote.name
    assert chain.is_remote(digest)
    assert remote.name in chain.links and local.name not in chain.links
    assert chain.links[remote.name] is remote.link  # the registry's own: it times headers and body apart
    assert chain.links[remote.name].samples == 12  # each read timed whole by the chain and split by the source
    assert chain.bytes_per_request(digest) is not None  # one read told apart is enough
