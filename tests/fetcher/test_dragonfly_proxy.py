"""DragonflyProxySource through the REAL dfdaemon's HTTP proxy (dragonfly-client 1.5.10, with the
real scheduler: the `dragonfly_peer` fixture), and through a stand-in proxy
(tests/standins/http_proxy.py) only for what the real one cannot be made to do or show: answer
5xx / 429 / 403 on cue, answer 200 instead of 206 (older dfdaemons, other blob proxies), refuse
a CONNECT, show the headers a request arrived with; and an https registry (the cluster's
registry is plain http)."""
import asyncio
import logging
import os
import signal
import ssl
import time

import pytest

from asyncwait import wait_for
from registry_server import TEST_PASSWORD as PASSWORD, TEST_USER as USER
from standins.http_proxy import ProxyStandIn
from fetcher.dragonfly_proxy import DragonflyProxySource
from fetcher.registry import RegistrySource
from fetcher.source import BlobSource, SourceError

REPO = "fscached/dfproxy"
MiB = 1 << 20


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def blob(registry):
    data = os.urandom(700_000)
    return registry.push_blob(REPO, data), data


def real_registry(peer) -> dict:
    return {"host": peer.registry_host, "repo": REPO, "scheme": "http", "username": USER, "password": PASSWORD}


# ------------------------------------------------------------------ the real proxy


def test_reads_through_the_real_proxy(dragonfly_peer, caplog):
    """206 answers with the bytes asked for; the whole blob first (one task at the scheduler,
    registered once, without a range), the ranges after it from the peer's storage."""
    caplog.set_level(logging.DEBUG)
    data = os.urandom(10 * MiB + 777)
    digest = dragonfly_peer.push_blob(REPO, data)
    url = dragonfly_peer.blob_url(REPO, digest)

    async def main():
        async with DragonflyProxySource(real_registry(dragonfly_peer), dragonfly_peer.proxy_url("node1")) as src:
            assert isinstance(src, BlobSource)
            for off, n in [(100, 5000), (4 * MiB - 3, 6), (9 * MiB, len(data) - 9 * MiB), (0, 10)]:
                assert await src.read(digest, off, n) == data[off:off + n], (off, n)
            got = await asyncio.gather(*(src.read(digest, i * 333_333, 4096) for i in range(30)))
            assert got == [data[i * 333_333:i * 333_333 + 4096] for i in range(30)]
            assert await src.read(digest, 5, 10, prefetch=True) == data[5:15]
            stats = dict(src.stats)
        assert stats["whole_tasks"] == 1 and stats["whole_tasks_failed"] == 0, stats
        assert stats["full_body"] == 0 and stats["range_only_200"] == 0, stats  # every range: a 206
    run(main())
    asked = dragonfly_peer.downloads("node1", url)
    wholes = [i for i, a in enumerate(asked) if a["header_range"] is None]
    # the whole blob first (twice when the registry's 401 challenge came back through the proxy)
    assert wholes == list(range(len(wholes))) and 1 <= len(wholes) <= 2, asked
    assert len(asked) - len(wholes) >= 35, asked
    # the proxy's task id is the blob's digest (proxy.registryMirror.enableTaskIDBasedBlobDigest:
    # on by default there, off over gRPC): one task per blob whichever registry serves it
    assert {a["task_id"] for a in asked} == {digest}
    task = dragonfly_peer.tasks()[digest]
    assert task["peers"] == 1 and task["ranges"] == {None}, task
    assert USER not in caplog.text and PASSWORD not in caplog.text


def test_origin_errors_come_back_through_the_real_proxy(dragonfly_peer):
    data = os.urandom(50_000)
    digest = dragonfly_peer.push_blob(REPO, data)

    async def main():
        anonymous = {"host": dragonfly_peer.registry_host, "repo": REPO, "scheme": "http"}
        async with DragonflyProxySource(anonymous, dragonfly_peer.proxy_url("node1"), whole_task=False) as src:
            with pytest.raises(SourceError, match=r"HTTP (401|5\d\d)"):
                await src.read(digest, 0, 100)
        async with DragonflyProxySource(real_registry(dragonfly_peer), dragonfly_peer.proxy_url("node1")) as src:
            assert await src.read(digest, 1000, 2000) == data[1000:3000]
    run(main())


def test_a_stopped_proxy_is_unhealthy_and_used_again_once_restarted(dragonfly_peer):
    """dfdaemon stopped: the proxy refuses connections, the source says so at once and is
    unhealthy (the chain skips it); its health port answers again after the restart."""
    data = os.urandom(100_000)
    digest = dragonfly_peer.push_blob(REPO, data)
    ping = dragonfly_peer.health_url("node1")
    src = DragonflyProxySource(real_registry(dragonfly_peer), dragonfly_peer.proxy_url("node1"), ping_url=ping,
                               check_interval=0.2)

    async def before() -> None:
        assert await src.read(digest, 0, 100) == data[:100]
        assert src.healthy()

    async def stopped() -> None:
        t0 = time.monotonic()
        with pytest.raises(SourceError, match="cannot reach the proxy"):
            await src.read(digest, 200, 100)
        assert time.monotonic() - t0 < 5
        await wait_for(lambda: not src.healthy(), 5, "unhealthy")

    async def restarted() -> None:
        await wait_for(src.healthy, 10, "healthy again")
        assert await src.read(digest, 300, 100) == data[300:400]

    loop = asyncio.new_event_loop()  # the restart runs in this thread: see the grpc test's
    try:
        loop.run_until_complete(before())
        dragonfly_peer.kill_dfdaemon("node1", signal.SIGTERM)
        loop.run_until_complete(stopped())
        dragonfly_peer.start_dfdaemon("node1")
        loop.run_until_complete(restarted())
    finally:
        loop.run_until_complete(src.close())
        loop.close()


# ------------------------------------------------------------------ the stand-in proxy


def test_headers_the_source_sends(registry, blob):
    """What each request carries (the stand-in shows it; the real proxy logs no priority): the
    whole blob first (no Range, priority 6), then the ranges (6 on demand, 3 for prefetch);
    P2P and scheduling policy ALWAYS on all; no prefetch hint (the whole-blob GET is it)."""
    digest, data = blob

    async def main():
        async with ProxyStandIn() as proxy:
            reg = RegistrySource(registry.host, REPO, scheme="http")
            src = DragonflyProxySource(reg, proxy.url)
            assert isinstance(src, BlobSource)
            assert src.name == f"dragonfly proxy {proxy.url}"
            try:
                assert await src.read(digest, 100, 5000) == data[100:5100]
                assert await src.read(digest, 300_000, 4096) == data[300_000:304_096]
                assert await src.read(digest, 600_000, 100_000, prefetch=True) == data[600_000:]
                assert await src.read(digest, 0, 10) == data[:10]
            finally:
                await src.close()
                await reg.close()
            reqs = proxy.blob_requests()
            assert len(reqs) == 5
            assert all(r.url == registry.blob_url(REPO, digest) for r in reqs)  # absolute URI, via the proxy
            assert [r.status for r in reqs] == [200, 206, 206, 206, 206]
            assert [r.headers.get("Range") for r in reqs] == [
                None, "bytes=100-5099", "bytes=300000-304095", "bytes=600000-699999", "bytes=0-9"]
            assert [r.dragonfly.get("X-Dragonfly-Priority") for r in reqs] == ["6", "6", "6", "3", "6"]
            assert all(r.dragonfly.get("X-Dragonfly-Scheduling-Policy") == "always" for r in reqs)
            assert not any("X-Dragonfly-Prefetch" in r.dragonfly for r in reqs)
            assert all(r.dragonfly.get("X-Dragonfly-Use-P2P") == "true" for r in reqs)
            assert not any("X-Dragonfly-Registry" in r.dragonfly for r in reqs)
            assert src.stats["prefetch_hints"] == 0 and src.stats["whole_tasks"] == 1
    run(main())


def test_prefetch_hint_once_per_blob_and_not_on_prefetch_reads(registry, blob):
    digest = blob[0]
    other = registry.push_blob(REPO, b"second blob " * 1000)

    async def main():
        async with ProxyStandIn() as proxy:
            async with DragonflyProxySource({"host": registry.host, "repo": REPO, "scheme": "http"},
                                            proxy.url, whole_task=False) as src:
                await src.read(digest, 0, 10, prefetch=True)  # prefetch: no hint, priority 3
                await src.read(digest, 10, 10)                # first on-demand read: hint
                await src.read(other, 0, 10)                  # another blob: its own hint
                await src.read(digest, 20, 10)
            hints = [(r.url.rsplit(":", 1)[1], r.dragonfly.get("X-Dragonfly-Prefetch"),
                      r.dragonfly["X-Dragonfly-Priority"]) for r in proxy.blob_requests()]
            assert hints == [(digest, None, "3"), (digest, "true", "6"), (other, "true", "6"), (digest, None, "6")]
    run(main())


def test_registry_credentials_go_through_the_proxy_and_never_into_logs(auth_registry, caplog):
    caplog.set_level(logging.DEBUG)
    data = os.urandom(50_000)
    digest = auth_registry.push_blob(REPO, data)

    async def main():
        async with ProxyStandIn() as proxy:
            proxy_url = proxy.url.replace("http://", "http://df:proxy-secret@")
            async with DragonflyProxySource({"host": auth_registry.host, "repo": REPO, "scheme": "http",
                                             "username": USER, "password": PASSWORD}, proxy_url, whole_task=False) as src:
                assert src.name == f"dragonfly proxy {proxy.url}"
                assert "proxy-secret" not in repr(src)
                assert await src.read(digest, 1000, 2000) == data[1000:3000]
            final = proxy.blob_requests()[-1]
            assert final.status == 206 and final.headers["Authorization"].startswith("Basic ")
    run(main())
    assert PASSWORD not in caplog.text and "proxy-secret" not in caplog.text


def test_200_instead_of_206_is_cut_and_logged_once(registry, blob, caplog):
    digest, data = blob
    caplog.set_level(logging.INFO)

    async def main():
        async with ProxyStandIn() as proxy:
            proxy.full_body = True
            async with DragonflyProxySource({"host": registry.host, "repo": REPO, "scheme": "http"},
                                            proxy.url, whole_task=False) as src:
                for off in (0, 123_456, 650_000):
                    assert await src.read(digest, off, 50_000) == data[off:off + 50_000]
                assert src.stats["full_body"] == 3
            assert [r.status for r in proxy.blob_requests()] == [200, 200, 200]
    run(main())
    warnings = [r for r in caplog.records if "HTTP 200" in r.getMessage()]
    assert len(warnings) == 1 and "dragonfly proxy" in warnings[0].getMessage()


def test_200_with_just_the_range_is_taken(registry, blob, caplog):
    """The proxy source reads answers through the registry's one range reader: a 200 holding
    only the bytes asked for is the range, not a whole blob to cut it from."""
    digest, data = blob
    caplog.set_level(logging.INFO)

    async def main():
        async with ProxyStandIn() as proxy:
            proxy.range_as_200 = True
            async with DragonflyProxySource({"host": registry.host, "repo": REPO, "scheme": "http"},
                                            proxy.url, whole_task=False) as src:
                for off in (0, 123_456, 650_000):
                    assert await src.read(digest, off, 50_000) == data[off:off + 50_000]
                assert src.stats["range_only_200"] == 3 and src.stats["full_body"] == 0
            assert [r.status for r in proxy.blob_requests()] == [200, 200, 200]
            assert all("Range" in r.headers for r in proxy.blob_requests())
    run(main())
    assert not any("whole blob" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("status", [500, 503, 429, 403])
def test_proxy_errors_raise_at_once_and_mark_unhealthy(registry, blob, status):
    digest, data = blob

    async def main():
        async with ProxyStandIn() as proxy:
            proxy.fail(status, 1)
            async with DragonflyProxySource({"host": registry.host, "repo": REPO, "scheme": "http"},
                                            proxy.url, check_interval=30, whole_task=False) as src:
                assert src.healthy()
                with pytest.raises(SourceError, match=rf"dragonfly proxy .*: HTTP {status}"):
                    await src.read(digest, 0, 100)
                assert len(proxy.blob_requests()) == 1  # no retries through a failing proxy
                assert not src.healthy()
                # the proxy itself still works when asked directly (the chain decides to skip it)
                assert await src.read(digest, 0, 100) == data[:100]
                # the failed first read did not use up the prefetch hint
                assert proxy.blob_requests()[-1].dragonfly.get("X-Dragonfly-Prefetch") == "true"
    run(main())


def test_connection_refused_marks_unhealthy_until_check_interval(registry, blob):
    digest, data = blob

    async def main():
        async with ProxyStandIn() as proxy:
            async with DragonflyProxySource({"host": registry.host, "repo": REPO, "scheme": "http"},
                                            proxy.url, check_interval=0.3, whole_task=False) as src:
                await proxy.stop()
                with pytest.raises(SourceError, match="cannot reach the proxy"):
                    await src.read(digest, 0, 100)
                assert not src.healthy()
                await proxy.start()
                await asyncio.sleep(0.35)
                assert src.healthy()  # no ping url: the mark lapses after check_interval
                assert await src.read(digest, 0, 100) == data[:100]
    run(main())


def test_health_check_follows_the_ping_url(registry, blob):
    digest = blob[0]

    async def main():
        async with ProxyStandIn() as proxy:
            async with DragonflyProxySource({"host": registry.host, "repo": REPO, "scheme": "http"},
                                            proxy.url, ping_url=proxy.ping_url, check_interval=0.05, whole_task=False) as src:
                assert src.healthy()
                await wait_for(lambda: proxy.pings >= 1)
                assert src.healthy()
                proxy.health_status = 503
                await wait_for(lambda: not src.healthy())
                proxy.health_status = 200
                await wait_for(src.healthy)
                # a failed read marks it unhealthy until the next good ping
                proxy.fail(500, 1)
                with pytest.raises(SourceError):
                    await src.read(digest, 0, 10)
                assert not src.healthy()
                await wait_for(src.healthy)
                # the daemon gone entirely: pings fail too
                await proxy.stop(health=True)
                await wait_for(lambda: not src.healthy())
            assert src._health_task is None  # closed with the source
    run(main())


def test_use_http_rewrites_https_and_names_the_registry(tls_registry):
    data = os.urandom(40_000)
    digest = tls_registry.push_blob(REPO, data)
    ca = str(tls_registry.tls[0])

    async def main():
        async with ProxyStandIn(origin_ssl=ssl.create_default_context(cafile=ca)) as proxy:
            reg = RegistrySource(tls_registry.host, REPO, scheme="https", ca_file=ca)
            async with DragonflyProxySource(reg, proxy.url, use_http=True, whole_task=False) as src:
                assert await src.read(digest, 5, 30_000) == data[5:30_005]
            await reg.close()
            (req,) = proxy.blob_requests()
            assert req.url == f"http://{tls_registry.host}/v2/{REPO}/blobs/sha256:{digest}"
            assert req.dragonfly["X-Dragonfly-Registry"] == f"https://{tls_registry.host}"
    run(main())


def test_https_without_use_http_needs_connect(tls_registry):
    """An https registry without use_http tunnels through CONNECT; a proxy refusing it is a
    proxy failure (unhealthy, no retries), not a registry error."""
    digest = tls_registry.push_blob(REPO, b"tunnelled" * 100)
    ca = str(tls_registry.tls[0])

    async def main():
        async with ProxyStandIn() as proxy:
            reg = RegistrySource(tls_registry.host, REPO, scheme="https", ca_file=ca)
            async with DragonflyProxySource(reg, proxy.url, retries=2, whole_task=False) as src:
                with pytest.raises(SourceError, match=r"refused the CONNECT tunnel: HTTP 4\d\d"):
                    await src.read(digest, 0, 10)
                assert not src.healthy()
            await reg.close()
            assert proxy.blob_requests() == []  # the stand-in answers CONNECT with a 4xx
    run(main())


def test_bad_config_is_refused(registry):
    cfg = {"host": registry.host, "repo": REPO, "scheme": "http"}
    with pytest.raises(ValueError):
        DragonflyProxySource(cfg, "unix:///var/run/x.sock", whole_task=False)
    with pytest.raises(ValueError):
        DragonflyProxySource(cfg, "http://127.0.0.1:4001", ping_url="http://127.0.0.1:4003/healthy",
                             check_interval=0, whole_task=False)
