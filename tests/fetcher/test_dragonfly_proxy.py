"""DragonflyProxySource through a stand-in dfdaemon HTTP proxy in front of the real registry."""
import asyncio
import logging
import os
import ssl

import pytest

from asyncwait import wait_for
from registry_server import TEST_PASSWORD as PASSWORD, TEST_USER as USER
from standins.http_proxy import ProxyStandIn
from fetcher.dragonfly_proxy import DragonflyProxySource
from fetcher.registry import RegistrySource
from fetcher.source import BlobSource, SourceError

REPO = "fscached/dfproxy"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def blob(registry):
    data = os.urandom(700_000)
    return registry.push_blob(REPO, data), data


def test_reads_through_the_proxy_with_priority_and_prefetch_headers(registry, blob):
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
            assert len(reqs) == 4
            assert all(r.url == registry.blob_url(REPO, digest) for r in reqs)  # absolute URI, via the proxy
            assert all(r.status == 206 for r in reqs)
            assert [r.headers["Range"] for r in reqs] == [
                "bytes=100-5099", "bytes=300000-304095", "bytes=600000-699999", "bytes=0-9"]
            assert [r.dragonfly.get("X-Dragonfly-Priority") for r in reqs] == ["6", "6", "3", "6"]
            assert [r.dragonfly.get("X-Dragonfly-Prefetch") for r in reqs] == ["true", None, None, None]
            assert all(r.dragonfly.get("X-Dragonfly-Use-P2P") == "true" for r in reqs)
            assert not any("X-Dragonfly-Registry" in r.dragonfly for r in reqs)
            assert src.stats["prefetch_hints"] == 1
    run(main())


def test_prefetch_hint_once_per_blob_and_not_on_prefetch_reads(registry, blob):
    digest = blob[0]
    other = registry.push_blob(REPO, b"second blob " * 1000)

    async def main():
        async with ProxyStandIn() as proxy:
            async with DragonflyProxySource({"host": registry.host, "repo": REPO, "scheme": "http"},
                                            proxy.url) as src:
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
                                             "username": USER, "password": PASSWORD}, proxy_url) as src:
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
                                            proxy.url) as src:
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
                                            proxy.url) as src:
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
                                            proxy.url, check_interval=30) as src:
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
                                            proxy.url, check_interval=0.3) as src:
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
                                            proxy.url, ping_url=proxy.ping_url, check_interval=0.05) as src:
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
            async with DragonflyProxySource(reg, proxy.url, use_http=True) as src:
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
            async with DragonflyProxySource(reg, proxy.url, retries=2) as src:
                with pytest.raises(SourceError, match=r"refused the CONNECT tunnel: HTTP 4\d\d"):
                    await src.read(digest, 0, 10)
                assert not src.healthy()
            await reg.close()
            assert proxy.blob_requests() == []  # the stand-in answers CONNECT with a 4xx
    run(main())


def test_bad_config_is_refused(registry):
    cfg = {"host": registry.host, "repo": REPO, "scheme": "http"}
    with pytest.raises(ValueError):
        DragonflyProxySource(cfg, "unix:///var/run/x.sock")
    with pytest.raises(ValueError):
        DragonflyProxySource(cfg, "http://127.0.0.1:4001", ping_url="http://127.0.0.1:4003/healthy",
                             check_interval=0)
