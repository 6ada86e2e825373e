"""The cachefiles on-demand kernel path (/dev/cachefiles): frontend and culling."""
from fscached.frontends.cachefiles.frontend import CachefilesFrontend, RestoreUnsupported

__all__ = ["CachefilesFrontend", "RestoreUnsupported"]
