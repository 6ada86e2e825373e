"""SourceChain: fallback order, health skipping, verification, once-only logging; and the
[Dragonfly proxy, registry] chain against the stand-in proxy and the real registry."""
import asyncio
import hashlib
import logging
import os

import pytest

from asyncwait import wait_for
from standins.http_proxy import ProxyStandIn
from fetcher.chain import SourceChain
from fetcher.dragonfly_proxy import DragonflyProxySource
from fetcher.registry import RegistrySource
from fetcher.source import IntegrityError, SourceError

REPO = "fscached/chain"
DATA = bytes(range(256)) * 64


def run(coro):
    return asyncio.run(coro)


class FakeSource:
    def __init__(self, name, data=DATA, *, corrupt=False, error=None, healthy=None):
        self.name = name
        self.data = data
        self.corrupt = corrupt
        self.error = error
        self._healthy = healthy
        self.calls = []
        self.closed = False
        if healthy is not None:
            self.healthy = lambda: self._healthy

    async def read(self, blob_id, offset, length, *, prefetch=False):
        self.calls.append((blob_id, offset, length, prefetch))
        if self.error is not None:
            raise SourceError(self.error)
        raw = self.data[offset:offset + length]
        return bytes(b ^ 0xFF for b in raw) if self.corrupt else raw

    async def close(self):
        self.closed = True


def verifier(data):
    def make(offset, length):
        want = hashlib.sha256(data[offset:offset + length]).digest()

        def verify(raw):
            if hashlib.sha256(raw).digest() != want:
                raise IntegrityError(f"sha256 mismatch for [{offset}+{length}]")
            return raw
        return verify
    return make


check = verifier(DATA)


def test_first_good_source_serves_and_prefetch_is_passed_on():
    a, b = FakeSource("a"), FakeSource("b")
    chain = SourceChain([a, b])
    assert run(chain.read_verified("blob1", 10, 100, check(10, 100), prefetch=True)) == DATA[10:110]
    assert a.calls == [("blob1", 10, 100, True)] and b.calls == []
    assert chain.stats["a:ok"] == 1
    assert chain.name == "a -> b"


def test_corrupt_bytes_fall_through_to_the_next_source_and_are_counted(caplog):
    bad, good = FakeSource("bad", corrupt=True), FakeSource("good")
    chain = SourceChain([bad, good])

    async def main():
        for _ in range(5):
            assert await chain.read_verified("blob1", 0, 500, check(0, 500)) == DATA[:500]
    run(main())
    assert chain.stats["bad:integrity"] == 5 and chain.stats["good:ok"] == 5
    assert chain.stats["bad:failed"] == 0
    logged = [r for r in caplog.records if "bad" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(logged) == 1 and "failed verification" in logged[0].getMessage()


def test_verify_result_is_returned_and_other_errors_propagate():
    chain = SourceChain([FakeSource("a")])
    assert run(chain.read_verified("b", 0, 4, len)) == 4

    def boom(raw):
        raise ValueError("a bug, not bad bytes")
    with pytest.raises(ValueError):
        run(chain.read_verified("b", 0, 4, boom))


def test_async_verify_is_awaited_and_its_integrity_errors_fall_through():
    async def averify(raw):
        await asyncio.sleep(0)
        return check(0, 64)(raw)
    bad, good = FakeSource("bad", corrupt=True), FakeSource("good")
    chain = SourceChain([bad, good])
    assert run(chain.read_verified("b", 0, 64, averify)) == DATA[:64]
    assert chain.stats["bad:integrity"] == 1 and chain.stats["good:ok"] == 1


def test_all_failing_raise_one_error_naming_every_reason():
    chain = SourceChain([FakeSource("proxy", error="HTTP 500"), FakeSource("mirror", corrupt=True),
                         FakeSource("registry", error="not found (HTTP 404)")])
    with pytest.raises(SourceError) as info:
        run(chain.read_verified("blob9", 0, 100, check(0, 100)))
    msg = str(info.value)
    assert msg.startswith("blob blob9: every source failed: ")
    assert "proxy: HTTP 500" in msg
    assert "mirror: bad bytes: sha256 mismatch" in msg
    assert "registry: not found (HTTP 404)" in msg
    assert msg.index("proxy:") < msg.index("mirror:") < msg.index("registry:")
    assert chain.stats["proxy:failed"] == 1 and chain.stats["mirror:integrity"] == 1


def test_no_fallback_uses_only_the_first_source():
    a, b = FakeSource("a", error="HTTP 503"), FakeSource("b")
    chain = SourceChain([a, b], fallback=False)
    with pytest.raises(SourceError, match=r"every source failed: a: HTTP 503$"):
        run(chain.read_verified("x", 0, 10, check(0, 10)))
    assert b.calls == []
    # and an unhealthy first source is still the one used
    a2 = FakeSource("a", healthy=False)
    chain = SourceChain([a2, FakeSource("b")], fallback=False)
    assert run(chain.read_verified("x", 0, 10, check(0, 10))) == DATA[:10]
    assert len(a2.calls) == 1


def test_unhealthy_sources_are_skipped_unless_last(caplog):
    sick, good = FakeSource("sick", healthy=False), FakeSource("good")
    chain = SourceChain([sick, good])

    async def main():
        for i in range(10):
            assert await chain.read_verified("x", i, 10, check(i, 10)) == DATA[i:i + 10]
    run(main())
    assert sick.calls == [] and chain.stats["sick:skipped"] == 10
    assert len([r for r in caplog.records if "skipping sick" in r.getMessage()]) == 1
    # the last source is tried even when it says it is unhealthy
    last = FakeSource("last", healthy=False)
    chain = SourceChain([FakeSource("dead", error="refused"), last])
    assert run(chain.read_verified("x", 0, 10, check(0, 10))) == DATA[:10]
    assert len(last.calls) == 1


def test_failure_logged_once_per_source_blob_and_kind(caplog):
    flaky, good = FakeSource("flaky", error="HTTP 500"), FakeSource("good")
    chain = SourceChain([flaky, good])

    async def main():
        for i in range(20):
            await chain.read_verified("blobA", i, 10, check(i, 10))
        await chain.read_verified("blobB", 0, 10, check(0, 10))  # another blob: logged again
        flaky.error, flaky.corrupt = None, True
        await chain.read_verified("blobA", 0, 10, check(0, 10))  # another kind: logged again
    run(main())
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in msgs if "blob blobA: flaky failed" in m]) == 1
    assert len([m for m in msgs if "blob blobB: flaky failed" in m]) == 1
    assert len([m for m in msgs if "blobA" in m and "failed verification" in m]) == 1
    assert chain.stats["flaky:failed"] == 21 and chain.stats["good:ok"] == 22


def test_close_closes_every_source_even_when_one_fails():
    class Broken(FakeSource):
        async def close(self):
            raise OSError("boom")
    a, b, c = FakeSource("a"), Broken("b"), FakeSource("c")
    run(SourceChain([a, b, c]).close())
    assert a.closed and c.closed


def test_chain_is_a_blob_source_itself():
    chain = SourceChain([FakeSource("a", error="gone"), FakeSource("b")])
    assert run(chain.read("x", 5, 5)) == DATA[5:10]
    with pytest.raises(ValueError):
        SourceChain([])


# -- [Dragonfly proxy, registry] against the stand-in and the real registry ------------------

@pytest.fixture(scope="module")
def blob(registry):
    data = os.urandom(500_000)
    return registry.push_blob(REPO, data), data


def _pair(registry, proxy, **kw):
    reg = RegistrySource(registry.host, REPO, scheme="http")
    return reg, DragonflyProxySource(reg, proxy.url, whole_task=False, **kw)  # range requests alone


def test_proxy_500_falls_back_to_the_registry_logged_once(registry, blob, caplog):
    digest, data = blob
    make = verifier(data)
    caplog.set_level(logging.INFO)

    async def main():
        async with ProxyStandIn() as proxy:
            proxy.fail(500)
            reg, dfp = _pair(registry, proxy, check_interval=0)  # retried on every read
            chain = SourceChain([dfp, reg])
            try:
                for i in range(20):
                    off = i * 20_000
                    assert await chain.read_verified(digest, off, 7000, make(off, 7000)) == data[off:off + 7000]
            finally:
                await chain.close()
            assert len(proxy.blob_requests()) == 20  # the proxy really was tried each time
            assert chain.stats[f"{dfp.name}:failed"] == 20 and chain.stats[f"{reg.name}:ok"] == 20
    run(main())
    failures = [r for r in caplog.records if "failed" in r.getMessage() and "HTTP 500" in r.getMessage()
                and r.name == "fscached.fetcher.chain"]
    assert len(failures) == 1


def test_unhealthy_proxy_is_bypassed_without_a_request(registry, blob):
    digest, data = blob
    make = verifier(data)

    async def main():
        async with ProxyStandIn() as proxy:
            proxy.health_status = 503
            reg, dfp = _pair(registry, proxy, ping_url=proxy.ping_url, check_interval=0.05)
            chain = SourceChain([dfp, reg])
            try:
                dfp.start_health_checks()
                await wait_for(lambda: not dfp.healthy(), what="the failing ping marking the proxy unhealthy")
                for off in (0, 100_000, 400_000):
                    assert await chain.read_verified(digest, off, 5000, make(off, 5000)) == data[off:off + 5000]
                assert proxy.blob_requests() == []
                assert chain.stats[f"{dfp.name}:skipped"] == 3
                # healthy again: back through the proxy
                proxy.health_status = 200
                await wait_for(dfp.healthy, what="a good ping marking the proxy healthy")
                assert await chain.read_verified(digest, 0, 5000, make(0, 5000)) == data[:5000]
                assert len(proxy.blob_requests()) == 1 and chain.stats[f"{dfp.name}:ok"] == 1
            finally:
                await chain.close()
    run(main())


def test_proxy_refusing_connections_falls_back(registry, blob):
    digest, data = blob
    make = verifier(data)

    async def main():
        async with ProxyStandIn() as proxy:
            await proxy.stop()
            reg, dfp = _pair(registry, proxy)
            chain = SourceChain([dfp, reg])
            try:
                assert await chain.read_verified(digest, 10, 10, make(10, 10)) == data[10:20]
                assert not dfp.healthy()
                assert await chain.read_verified(digest, 20, 10, make(20, 10)) == data[20:30]
                assert chain.stats[f"{dfp.name}:failed"] == 1 and chain.stats[f"{dfp.name}:skipped"] == 1
            finally:
                await chain.close()
    run(main())


def test_no_fallback_with_a_failing_proxy_raises(registry, blob):
    digest, data = blob

    async def main():
        async with ProxyStandIn() as proxy:
            proxy.fail(500)
            reg, dfp = _pair(registry, proxy)
            chain = SourceChain([dfp, reg], fallback=False)
            try:
                with pytest.raises(SourceError, match=r"every source failed: dragonfly proxy .*HTTP 500"):
                    await chain.read_verified(digest, 0, 10, verifier(data)(0, 10))
                assert reg.stats["requests"] == 0
            finally:
                await chain.close()
    run(main())
