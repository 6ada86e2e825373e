"""RegistrySource behaviours that need a misbehaving server: a small aiohttp front in
front of the real docker-registry answers errors, redirects, token challenges or 200s."""
import asyncio
import base64
import logging
import os
import time

import pytest
from aiohttp import web

from registry_server import TEST_PASSWORD as PASSWORD, TEST_USER as USER
from frontserver import FrontServer
from fetcher.registry import RegistrySource
from fetcher.source import SourceError

REPO = "fscached/front"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def blob(registry):
    data = os.urandom(600_000)
    return registry.push_blob(REPO, data), data


def _is_blob(request):
    return "/blobs/sha256:" in request.path


def fail_first(n, status, headers=None):
    async def behaviour(front, request):
        if _is_blob(request) and front.state.setdefault("failed", 0) < n:
            front.state["failed"] += 1
            return web.Response(status=status, text="nope", headers=headers or {})
        return None
    return behaviour


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_retries_then_succeeds(registry, blob, status):
    digest, data = blob

    async def main():
        async with FrontServer(registry.url, fail_first(2, status)) as front:
            async with RegistrySource(front.host, REPO, scheme="http", retries=3, backoff=0.01) as src:
                assert await src.read(digest, 100, 5000) == data[100:5100]
                assert src.stats["retries"] == 2
            assert front.count(f"/v2/{REPO}/blobs/") == 3
    run(main())


def test_retry_after_is_respected(registry, blob):
    digest, data = blob

    async def main():
        async with FrontServer(registry.url, fail_first(1, 429, {"Retry-After": "1"})) as front:
            async with RegistrySource(front.host, REPO, scheme="http", retries=3, backoff=0.001) as src:
                t0 = time.monotonic()
                assert await src.read(digest, 0, 10) == data[:10]
                assert time.monotonic() - t0 >= 0.95
            assert front.count("/v2/") == 2
    run(main())


def test_always_500_gives_up_after_bounded_attempts(registry, blob):
    digest, _ = blob

    async def main():
        async with FrontServer(registry.url, fail_first(10**9, 500)) as front:
            async with RegistrySource(front.host, REPO, scheme="http", retries=2, backoff=0.01) as src:
                with pytest.raises(SourceError, match=r"giving up after 3 attempts.*HTTP 500") as info:
                    await src.read(digest, 0, 10)
                assert front.host in str(info.value)
            assert front.count("/v2/") == 3
    run(main())


def test_server_disconnect_is_retried(registry, blob):
    digest, data = blob

    async def behaviour(front, request):
        if _is_blob(request) and front.state.setdefault("dropped", 0) < 3:
            front.state["dropped"] += 1
            request.transport.close()  # drop the connection without an answer
            return web.Response(status=500)
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            # (aiohttp itself may retry an idempotent GET once on a dropped connection)
            async with RegistrySource(front.host, REPO, scheme="http", retries=3, backoff=0.01) as src:
                assert await src.read(digest, 5, 5) == data[5:10]
                assert src.stats["retries"] >= 1
            assert front.state["dropped"] == 3
    run(main())


# -- redirects ---------------------------------------------------------------------------------

def test_redirect_to_registry_blob_url_is_cached(registry, blob):
    digest, data = blob

    async def behaviour(front, request):
        if _is_blob(request):
            raise web.HTTPTemporaryRedirect(registry.blob_url(REPO, digest) + "?X-Sig=secret-signature")
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http") as src:
                for off in (0, 1000, 99_999, 500_000):
                    assert await src.read(digest, off, 4096) == data[off:off + 4096]
                assert front.count("/v2/") == 1  # resolved once, then straight to storage
                assert src.stats["redirects_resolved"] == 1
                assert src.stats["redirects_reused"] == 3
    run(main())


def test_302_redirect_relative_location(registry, blob):
    digest, data = blob

    async def behaviour(front, request):
        if _is_blob(request):
            raise web.HTTPFound(f"/storage/{digest}")
        if request.path.startswith("/storage/"):
            return await front.forward(request, path=f"/v2/{REPO}/blobs/sha256:{digest}")
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http") as src:
                assert await src.read(digest, 3, 300) == data[3:303]
                assert await src.read(digest, 3000, 300) == data[3000:3300]
            assert front.count("/v2/") == 1 and front.count("/storage/") == 2
    run(main())


def test_expired_redirect_is_re_resolved(registry, blob):
    """Storage URLs expire (403, 404): the source drops the cached one and asks the registry
    again, without spending a retry."""
    digest, data = blob

    async def behaviour(front, request):
        if _is_blob(request):
            front.state["gen"] = front.state.get("gen", 0) + 1
            raise web.HTTPTemporaryRedirect(f"/storage/{digest}?sig=gen{front.state['gen']}")
        if request.path.startswith("/storage/"):
            if request.query["sig"] in front.state.setdefault("expired", {}):
                return web.Response(status=front.state["expired"][request.query["sig"]], text="expired")
            return await front.forward(request, path=f"/v2/{REPO}/blobs/sha256:{digest}")
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http", retries=0) as src:
                assert await src.read(digest, 0, 100) == data[:100]
                assert await src.read(digest, 100, 100) == data[100:200]
                assert front.count("/v2/") == 1
                front.state["expired"] = {"gen1": 403}
                assert await src.read(digest, 200, 100) == data[200:300]
                assert front.count("/v2/") == 2
                front.state["expired"]["gen2"] = 404
                assert await src.read(digest, 300, 100) == data[300:400]
                assert front.count("/v2/") == 3
                assert await src.read(digest, 400, 100) == data[400:500]
                assert front.count("/v2/") == 3
                assert src.stats["retries"] == 0
    run(main())


def test_redirect_ttl_expiry(registry, blob):
    digest, data = blob

    async def behaviour(front, request):
        if _is_blob(request):
            raise web.HTTPTemporaryRedirect(registry.blob_url(REPO, digest))
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http", redirect_ttl=0.2) as src:
                await src.read(digest, 0, 10)
                await src.read(digest, 0, 10)
                assert front.count("/v2/") == 1
                await asyncio.sleep(0.3)
                assert await src.read(digest, 10, 10) == data[10:20]
                assert front.count("/v2/") == 2
    run(main())


def test_authorization_not_sent_to_storage(registry, blob):
    """Credentials stay with the registry: the storage URL (another origin) gets none."""
    digest, data = blob

    async def behaviour(front, request):
        if not _is_blob(request):
            return None
        if "Authorization" not in request.headers:
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="front"'})
        raise web.HTTPTemporaryRedirect(f"{storage.url}/v2/{REPO}/blobs/sha256:{digest}")

    async def main():
        nonlocal storage
        async with FrontServer(registry.url) as storage, FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http", username=USER, password=PASSWORD) as src:
                assert await src.read(digest, 0, 10) == data[:10]
                assert await src.read(digest, 10, 10) == data[10:20]
            assert front.count("/v2/") == 2  # 401, then the authorized request that redirects
            assert len(storage.requests) == 2
            assert all("Authorization" not in headers for _, _, headers in storage.requests)
    storage = None
    run(main())


def test_timeouts_are_retried_and_bounded(registry, blob):
    async def behaviour(front, request):
        try:
            await asyncio.wait_for(front.state["release"].wait(), 5)
        except TimeoutError:
            pass
        return web.Response(status=500)

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            front.state["release"] = asyncio.Event()
            async with RegistrySource(front.host, REPO, scheme="http", timeout=0.2, retries=1,
                                      backoff=0.01) as src:
                t0 = time.monotonic()
                with pytest.raises(SourceError, match=r"giving up after 2 attempts.*Timeout"):
                    await src.read(blob[0], 0, 10)
                assert time.monotonic() - t0 < 3
            assert front.count("/v2/") == 2
            front.state["release"].set()  # let the hanging handlers finish before shutdown
    run(main())


def test_redirect_loop_is_bounded(registry, blob):
    async def behaviour(front, request):
        raise web.HTTPTemporaryRedirect(f"/loop{len(front.requests)}")

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http") as src:
                with pytest.raises(SourceError, match="redirects"):
                    await src.read(blob[0], 0, 10)
    run(main())


# -- a registry that ignores Range, or answers it with 200 ----------------------------------------

async def answer_200(request, body, framing):
    """A 200 carrying `body`: with a Content-Length, or chunked (no length announced)."""
    if framing == "content-length":
        return web.Response(status=200, body=body)
    resp = web.StreamResponse(status=200)
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(0, len(body), 7000):
        await resp.write(body[i:i + 7000])
    await resp.write_eof()
    return resp


FRAMINGS = ["content-length", "chunked"]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_full_body_200_is_sliced_and_logged_once(registry, blob, caplog, framing):
    caplog.set_level(logging.WARNING, logger="fscached.fetcher.registry")
    digest, data = blob

    async def behaviour(front, request):
        if _is_blob(request):
            whole = await front.forward(request, drop_range=True)
            return await answer_200(request, whole.body, framing)
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http") as src:
                assert await src.read(digest, 0, 10) == data[:10]
                assert await src.read(digest, 123_456, 70_000) == data[123_456:193_456]
                assert await src.read(digest, len(data) - 5, 5) == data[-5:]
                with pytest.raises(SourceError, match="read past end"):
                    await src.read(digest, len(data) - 5, 10)
    run(main())
    warnings = [r for r in caplog.records if "ignores Range" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("framing", FRAMINGS)
def test_200_with_just_the_range_is_taken(registry, blob, caplog, framing):
    """A proxy that fetches the range but answers 200 without Content-Range (nydusd takes it)."""
    caplog.set_level(logging.INFO, logger="fscached.fetcher.registry")
    digest, data = blob

    async def behaviour(front, request):
        if _is_blob(request):
            part = await front.forward(request)
            assert part.status == 206
            return await answer_200(request, part.body, framing)
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http") as src:
                for off, n in ((0, 10), (123_456, 70_000), (len(data) - 5, 5), (1, len(data) - 1)):
                    assert await src.read(digest, off, n) == data[off:off + n]
                assert src.stats["retries"] == 0
            assert front.count("/v2/") == 4  # one GET a read
    run(main())
    said = [r for r in caplog.records if "just the bytes asked for" in r.getMessage()]
    assert len(said) == 1 and not any("ignores Range" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize(("offset", "length", "sent"), [(100, 1000, 1007), (0, 1000, 500), (300, 1000, 900)])
def test_200_of_another_length_is_refused_at_once(registry, blob, framing, offset, length, sent):
    """Neither the range (wrong length) nor a whole blob holding it (too short)."""
    digest, data = blob

    async def behaviour(front, request):
        if _is_blob(request):
            return await answer_200(request, data[offset:offset + sent], framing)
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http") as src:
                with pytest.raises(SourceError) as err:
                    await src.read(digest, offset, length)
                assert front.count("/v2/") == 1  # refused for good: not retried
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"registry {front.url}: blob {digest}: ")
        assert (f"HTTP 200 with {sent} bytes to a request for bytes {offset}..{offset + length}: "
                f"neither the {length} bytes asked for nor a whole blob holding them") in msg
    run(main())


def test_whole_blob_as_long_as_the_range_is_not_taken_for_it(registry):
    """A server ignoring Range sends a 1000-byte blob to a read of 1000 bytes at 10: the body
    has the range's length but is the whole blob (its sha256 is the blob id), so the read ran
    past the blob's end; its first 1000 bytes are not the bytes at 10."""
    small = os.urandom(1000)
    digest = registry.push_blob(REPO, small)

    async def behaviour(front, request):
        if _is_blob(request):
            return await front.forward(request, drop_range=True)
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http") as src:
                assert await src.read(digest, 0, 1000) == small  # from 0 both readings agree
                with pytest.raises(SourceError, match=r"read past end: wanted bytes 10\.\.1010 but the blob "
                                                      r"has 1000 bytes \(HTTP 200 with the whole blob\)"):
                    await src.read(digest, 10, 1000)
    run(main())


def test_bad_content_range_is_rejected(registry, blob):
    async def behaviour(front, request):
        if _is_blob(request):
            return web.Response(status=206, body=b"x" * 10, headers={"Content-Range": "bytes 5-14/100"})
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http") as src:
                with pytest.raises(SourceError, match="got 5-14"):
                    await src.read(blob[0], 0, 10)
    run(main())


# -- token auth --------------------------------------------------------------------------------

def token_behaviour(expires_in=300, password=PASSWORD):
    """Bearer-protected /v2/ plus a /token realm that wants basic USER:password."""
    good = "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()

    async def behaviour(front, request):
        st = front.state
        if request.path == "/token":
            if request.headers.get("Authorization") != good:
                return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
            assert request.query["scope"] == f"repository:{REPO}:pull"
            assert request.query["service"] == "front-test"
            st["issued"] = st.get("issued", 0) + 1
            token = f"tok-{st['issued']}"
            st.setdefault("valid", set()).add(token)
            return web.json_response({"token": token, "expires_in": expires_in})
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in st.get("valid", set()):
            realm = f"http://{front.host}/token"
            return web.Response(status=401, headers={"WWW-Authenticate":
                                f'Bearer realm="{realm}",service="front-test",scope="repository:{REPO}:pull"'})
        return None
    return behaviour


def test_token_auth(registry, blob, caplog):
    caplog.set_level(logging.DEBUG)
    digest, data = blob

    async def main():
        async with FrontServer(registry.url, token_behaviour()) as front:
            async with RegistrySource(front.host, REPO, scheme="http", username=USER, password=PASSWORD) as src:
                # many first reads at once: one token fetch, not one per read
                got = await asyncio.gather(*(src.read(digest, i * 100, 100) for i in range(20)))
                assert got == [data[i * 100:(i + 1) * 100] for i in range(20)]
                assert front.state["issued"] == 1
                for off in (0, 4096, 300_000):
                    assert await src.read(digest, off, 1000) == data[off:off + 1000]
                got = await asyncio.gather(*(src.read(digest, i * 1000, 1000) for i in range(20)))
                assert got == [data[i * 1000:(i + 1) * 1000] for i in range(20)]
                assert front.state["issued"] == 1  # the token is cached
                # the registry revokes it: one 401, a new token, the read succeeds
                front.state["valid"].clear()
                assert await src.read(digest, 5, 5) == data[5:10]
                assert front.state["issued"] == 2
    run(main())
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert PASSWORD not in caplog.text and b64 not in caplog.text
    assert "tok-1" not in caplog.text and "Authorization" not in caplog.text


def test_token_expiry_refetches(registry, blob):
    digest, data = blob

    async def main():
        async with FrontServer(registry.url, token_behaviour(expires_in=1)) as front:
            async with RegistrySource(front.host, REPO, scheme="http", username=USER, password=PASSWORD) as src:
                await src.read(digest, 0, 10)
                assert front.state["issued"] == 1
                await asyncio.sleep(1.1)
                assert await src.read(digest, 10, 10) == data[10:20]
                assert front.state["issued"] == 2
                # renewed ahead of the request: no extra 401 round trip
                assert front.count("/v2/") == 3
    run(main())


def test_token_auth_wrong_password(registry, blob, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-password"

    async def main():
        async with FrontServer(registry.url, token_behaviour()) as front:
            async with RegistrySource(front.host, REPO, scheme="http", username=USER, password=wrong) as src:
                with pytest.raises(SourceError) as info:
                    await src.read(blob[0], 0, 10)
                return str(info.value), front.host
    msg, host = run(main())
    assert "401" in msg and host in msg and wrong not in msg
    assert wrong not in caplog.text


def test_anonymous_token(registry, blob):
    """Public images: a Bearer challenge answered by an anonymous token request."""
    digest, data = blob

    async def behaviour(front, request):
        if request.path == "/token":
            assert "Authorization" not in request.headers
            return web.json_response({"access_token": "anon"})
        if request.headers.get("Authorization") != "Bearer anon":
            return web.Response(status=401, headers={"WWW-Authenticate":
                                f'Bearer realm="http://{front.host}/token",service="x"'})
        return None

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http") as src:
                assert await src.read(digest, 0, 10) == data[:10]
                assert await src.read(digest, 10, 10) == data[10:20]
            assert front.count("/token") == 1
    run(main())


def test_token_endpoint_5xx_is_retried(registry, blob):
    digest, data = blob
    inner = token_behaviour()

    async def behaviour(front, request):
        if request.path == "/token" and not front.state.get("flaked"):
            front.state["flaked"] = True
            return web.Response(status=503)
        return await inner(front, request)

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http", username=USER, password=PASSWORD,
                                      backoff=0.01) as src:
                assert await src.read(digest, 0, 10) == data[:10]
                assert src.stats["retries"] == 1
    run(main())


# -- RegistrySource.get: whole manifests and blobs through the same client ----------------------

def test_get_whole_blob_retries_redirects_and_keeps_credentials(registry, blob):
    """get() shares read()'s machinery: a 503 is retried, a Basic challenge answered, the
    redirect to storage followed without the Authorization header."""
    from fetcher.registry import RetryableError

    digest, data = blob

    async def behaviour(front, request):
        if not _is_blob(request):
            return None
        if "Authorization" not in request.headers:
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="front"'})
        if not front.state.get("failed"):
            front.state["failed"] = True
            return web.Response(status=503, headers={"Retry-After": "0"})
        raise web.HTTPTemporaryRedirect(f"{storage.url}/v2/{REPO}/blobs/sha256:{digest}?sig=abc")

    async def main():
        nonlocal storage
        async with FrontServer(registry.url) as storage, FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http", username=USER, password=PASSWORD,
                                      retries=2, backoff=0.01) as src:
                calls = []

                async def consume(resp):
                    calls.append(resp.status)
                    body = await resp.read()
                    if len(calls) == 1:
                        raise RetryableError("short body (test)")  # a consumer may ask for another try
                    return body

                assert await src.get(f"blobs/sha256:{digest}", consume) == data
                assert calls == [200, 200]
                assert src.stats["retries"] == 2  # the 503 and the consumer's retry
            assert len(storage.requests) == 2
            assert all("Authorization" not in headers for _, _, headers in storage.requests)
    storage = None
    run(main())


def test_get_manifest_errors(registry, blob):
    from fetcher.registry import RegistryError

    async def main():
        async with FrontServer(registry.url) as front:
            async with RegistrySource(front.host, REPO, scheme="http", retries=2, backoff=0.01) as src:
                async def consume(resp):
                    return await resp.read()

                with pytest.raises(RegistryError) as info:
                    await src.get("manifests/nope", consume, accept="application/vnd.oci.image.manifest.v1+json")
                e = info.value
                assert (e.status, e.what) == (404, "manifests/nope")
                assert e.why.startswith("not found (HTTP 404: MANIFEST_UNKNOWN")
                assert str(e).startswith(f"registry http://{front.host}: manifests/nope: not found")
                with pytest.raises(RegistryError, match=r"^registry \S+: the manifest: not found"):
                    await src.get("manifests/nope", consume, what="the manifest")
                assert src.stats["retries"] == 0

                async def broken(resp):
                    raise KeyError("consumer bug")

                with pytest.raises(KeyError):  # what the consumer raises passes through, not retried
                    await src.get(f"blobs/sha256:{blob[0]}", broken)
                assert src.stats["retries"] == 0
                for bad in ("../x", "tags/list", "blobs/sha256:xyz", "manifests/a/b", "manifests/"):
                    with pytest.raises(ValueError, match="not a manifest or blob path"):
                        await src.get(bad, consume)
    run(main())


def test_get_gives_up_after_bounded_attempts(registry):
    from fetcher.registry import RegistryError

    async def behaviour(front, request):
        return web.Response(status=502)

    async def main():
        async with FrontServer(registry.url, behaviour) as front:
            async with RegistrySource(front.host, REPO, scheme="http", retries=1, backoff=0.01) as src:
                with pytest.raises(RegistryError, match=r"manifests/latest: giving up after 2 attempts: .*HTTP 502"):
                    await src.get("manifests/latest", lambda resp: resp.read())
            assert front.count(f"/v2/{REPO}/manifests/") == 2
    run(main())
