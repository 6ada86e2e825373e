"""Which sources serve an image's blobs, in which order: local files, the Dragonfly peer, the
registry. The chain falls back from one to the next per blob and logs why once."""
from __future__ import annotations

from fetcher.chain import SourceChain
from fetcher.local import LocalDirectorySource
from fetcher.registry import RegistrySource
from fetcher.source import BlobSource
from fscached.config import ImageSpec, RegistrySpec


def registry_source(spec: RegistrySpec) -> RegistrySource:
    return RegistrySource(spec.host, spec.repo, scheme=spec.scheme, auth=spec.auth,
                          ca_file=spec.ca_file, skip_verify=spec.skip_verify, timeout=spec.timeout)


def build_chain(spec: ImageSpec) -> SourceChain:
    sources: list[BlobSource] = []
    if spec.blobs is not None:
        sources.append(LocalDirectorySource(spec.blobs))
    if spec.registry is not None:
        registry = registry_source(spec.registry)
        if spec.dragonfly_socket is not None:
            from fetcher.dragonfly_grpc import dragonfly_for_registry

            sources.append(dragonfly_for_registry(registry, str(spec.dragonfly_socket)))
        if spec.proxy is not None:
            from fetcher.dragonfly_proxy import DragonflyProxySource

            p = spec.proxy
            sources.append(DragonflyProxySource(registry, p.url, p.ping_url, p.check_interval, p.use_http))
            if not p.fallback:
                return SourceChain(sources, fallback=False)
        sources.append(registry)
    return SourceChain(sources)
