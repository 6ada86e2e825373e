"""Several BlobSources for the same blobs, tried in order: e.g. [Dragonfly proxy, registry].

`read_verified` hands each source's bytes to the caller's `verify` (digest / decompression
checks, run in the caller's context); a SourceError or IntegrityError moves on to the next
source. A source with a `healthy()` method answering False is skipped, unless it is the last
one left (something has to be tried). With fallback=False only the first source is used (nydus's
proxy `fallback = false`).

Logs stay readable under load: the reason a source was skipped or failed is logged once per
(source, blob, kind of reason), while `stats` counts every event:
"<source name>:ok", ":failed", ":integrity", ":skipped".
"""
from __future__ import annotations

import collections
import inspect
import logging
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from fetcher.link import LinkEstimate
from fetcher.source import BlobSource, IntegrityError, SourceError

log = logging.getLogger("fscached.fetcher.chain")

T = TypeVar("T")

# how many (source, blob, kind) keys to remember before starting over (bounded memory)
MAX_SEEN = 4096


def _reason(source: BlobSource, exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    prefix = f"{source.name}: "
    if text.startswith(prefix):  # the message names its source already: say it once
        text = text[len(prefix):]
    return text if len(text) <= 500 else text[:497] + "..."


class SourceChain:
    def __init__(self, sources: Sequence[BlobSource], *, fallback: bool = True) -> None:
        if not sources:
            raise ValueError("a source chain needs at least one source")
        self.sources = list(sources)
        self.fallback = fallback
        self.name = " -> ".join(s.name for s in self.sources) if fallback else self.sources[0].name
        self.stats: collections.Counter[str] = collections.Counter()
        # metrics: bytes each source delivered (verified or not), ranged reads outstanding per source
        self.bytes: collections.Counter[str] = collections.Counter()
        self.in_flight: collections.Counter[str] = collections.Counter()
        self._seen: set[tuple[str, str, str]] = set()
        # what a read costs on each source's link (fetcher.link), learnt from its ranged reads,
        # and which source served each blob last: the read window worth fetching around a miss
        self.links: dict[str, LinkEstimate] = {}
        self.served_by: dict[str, str] = {}
        self._last_served = ""

    def bytes_per_request(self, blob_id: str) -> int | None:
        """How many stored bytes the link of the source that last served `blob_id` carries in
        one request's fixed cost (fetcher.link); None: local files, or no estimate yet."""
        link = self.links.get(self.served_by.get(blob_id, self._last_served))  # a new blob: the last link
        return link.bytes_per_request() if link is not None else None

    def _link(self, source: BlobSource) -> LinkEstimate:
        """The source's own estimate when it keeps one (it can tell a read's first byte from
        its last: fetcher.link), else one the chain keeps for it."""
        link = self.links.get(source.name)
        if link is None:
            own = getattr(source, "link", None)
            link = self.links[source.name] = own if isinstance(own, LinkEstimate) else LinkEstimate()
        return link

    def is_remote(self, blob_id: str) -> bool:
        """Whether `blob_id` comes (or, not read yet, will most likely come) over a network:
        from a source with no local files (fetcher.local's `local_range`)."""
        name = self.served_by.get(blob_id)
        source = next((s for s in self.sources if s.name == name), self.sources[0])
        return getattr(source, "local_range", None) is None

    def __repr__(self) -> str:
        return f"SourceChain({self.name!r}, fallback={self.fallback})"

    def _once(self, source: BlobSource, blob_id: str, kind: str) -> bool:
        """True the first time (source, blob, kind) comes up."""
        key = (source.name, blob_id, kind)
        if key in self._seen:
            return False
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()
        self._seen.add(key)
        return True

    async def read_verified(self, blob_id: str, offset: int, length: int, verify: Callable[[Any], T | Awaitable[T]],
                            *, prefetch: bool = False, local: bool = False) -> T:
        """verify(raw) for the first source whose bytes pass it; SourceError when none does.
        `local`: a source of local files (`local_range`) hands verify a fetcher.source.LocalRange
        to read itself instead of the bytes (verify may raise SourceError for a short file)."""
        sources = self.sources if self.fallback else self.sources[:1]
        reasons: list[str] = []
        for i, source in enumerate(sources):
            last = i == len(sources) - 1
            healthy = getattr(source, "healthy", None)
            if healthy is not None and not last and not healthy():
                self.stats[f"{source.name}:skipped"] += 1
                reasons.append(f"{source.name}: unhealthy, skipped")
                if self._once(source, blob_id, "skipped"):
                    log.warning("blob %s: skipping %s: unhealthy; trying %s (logged once per source and blob)",
                                blob_id, source.name, sources[i + 1].name)
                continue
            try:
                local_range = getattr(source, "local_range", None) if local else None
                if local_range is not None:
                    raw: Any = await local_range(blob_id, offset, length)
                    self.bytes[source.name] += length
                else:
                    self.in_flight[source.name] += 1
                    asked = time.monotonic()
                    try:
                        raw = await source.read(blob_id, offset, length, prefetch=prefetch)
                    finally:
                        self.in_flight[source.name] -= 1
                    self._link(source).observe(len(raw), time.monotonic() - asked)
                    self.bytes[source.name] += len(raw)
                result = verify(raw)
                if inspect.isawaitable(result):  # verification may run in a worker thread
                    result = await result
            except SourceError as exc:
                kind, what, detail = "failed", "failed", _reason(source, exc)
                why = detail
            except IntegrityError as exc:
                kind, what, detail = "integrity", "delivered bytes that failed verification", _reason(source, exc)
                why = f"bad bytes: {detail}"
            else:
                self.stats[f"{source.name}:ok"] += 1
                self.served_by[blob_id] = self._last_served = source.name
                if reasons:
                    log.debug("blob %s [%d+%d]: served by %s after: %s", blob_id, offset, length,
                              source.name, "; ".join(reasons))
                return result
            self.stats[f"{source.name}:{kind}"] += 1
            reasons.append(f"{source.name}: {why}")
            if self._once(source, blob_id, kind):
                then = f"; trying {sources[i + 1].name}" if not last else ""
                log.warning("blob %s: %s %s: %s%s (logged once per source and blob)", blob_id, source.name,
                            what, detail, then)
            else:
                log.debug("blob %s [%d+%d]: %s: %s", blob_id, offset, length, source.name, why)
        raise SourceError(f"blob {blob_id}: every source failed: " + "; ".join(reasons))

    async def read(self, blob_id: str, offset: int, length: int, *, prefetch: bool = False) -> bytes:
        """BlobSource.read over the chain, for callers that verify later (no per-source retry on
        bad bytes then)."""
        return await self.read_verified(blob_id, offset, length, lambda raw: raw, prefetch=prefetch)

    async def close(self) -> None:
        for source in self.sources:
            try:
                await source.close()
            except Exception as exc:  # closing one must not leak the others
                log.warning("closing %s: %s", source.name, _reason(source, exc))
