"""Which sources serve an image's blobs, in which order: local files, the Dragonfly peer, the
registry. The chain falls back from one to the next per blob and logs why once.

Sources are shared: one per registry repository, peer or directory, whatever the number of
images using it, and one Dragonfly piece cache per dfdaemon socket. Memory (connections, piece
caches, health checks) grows with the places bytes come from, not with the images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Hashable

from fetcher.chain import SourceChain
from fetcher.local import LocalDirectorySource
from fetcher.source import BlobSource
from fscached.config import ImageSpec, RegistrySpec

if TYPE_CHECKING:  # imported on first use: aiohttp is a tenth of a second of a local image's start
    from fetcher.registry import RegistrySource


def registry_source(spec: RegistrySpec) -> RegistrySource:
    from fetcher.registry import RegistrySource

    return RegistrySource(spec.host, spec.repo, scheme=spec.scheme, auth=spec.auth,
                          ca_file=spec.ca_file, skip_verify=spec.skip_verify, timeout=spec.timeout)


class SourcePool:
    def __init__(self) -> None:
        self._sources: dict[Hashable, BlobSource] = {}
        self._piece_caches: dict[str, object] = {}

    def _shared(self, key: Hashable, make: Callable[[], BlobSource]) -> BlobSource:
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = make()
            start = getattr(source, "start_health_checks", None)  # the Dragonfly proxy's ping_url
            if start is not None:
                start()
        return source

    def registry(self, spec: RegistrySpec) -> RegistrySource:
        from fetcher.registry import RegistrySource

        source = self._shared(("registry", spec), lambda: registry_source(spec))
        assert isinstance(source, RegistrySource)
        return source

    def chain(self, spec: ImageSpec) -> SourceChain:
        sources: list[BlobSource] = []
        if spec.blobs is not None:
            blobs = spec.blobs
            sources.append(self._shared(("local", blobs), lambda: LocalDirectorySource(blobs)))
        if spec.registry is not None:
            registry_spec = spec.registry
            registry = self.registry(registry_spec)
            if spec.dragonfly_socket is not None:
                socket = str(spec.dragonfly_socket)
                sources.append(self._shared(("dragonfly", socket, registry_spec),
                                            lambda: self._dragonfly(registry, socket)))
            if spec.proxy is not None:
                from fetcher.dragonfly_proxy import DragonflyProxySource

                p = spec.proxy
                sources.append(self._shared(
                    ("proxy", p, registry_spec),
                    lambda: DragonflyProxySource(registry, p.url, p.ping_url, p.check_interval, p.use_http)))
                if not p.fallback:
                    return SourceChain(sources, fallback=False)
            sources.append(registry)
        return SourceChain(sources)

    def _dragonfly(self, registry: RegistrySource, socket: str) -> BlobSource:
        from fetcher.dragonfly_grpc import DEFAULT_PIECE_CACHE_BYTES, PieceCache, dragonfly_for_registry

        cache = self._piece_caches.get(socket)
        if cache is None:
            cache = self._piece_caches[socket] = PieceCache(DEFAULT_PIECE_CACHE_BYTES)
        return dragonfly_for_registry(registry, socket, piece_cache=cache)

    def sources(self) -> list[BlobSource]:
        return list(self._sources.values())

    async def close(self) -> None:
        await SourceChain(self.sources()).close()
