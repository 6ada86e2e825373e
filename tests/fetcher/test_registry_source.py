"""RegistrySource against a real docker-registry (Debian's distribution 2.x) on 127.0.0.1."""
import asyncio
import base64
import logging
import os

import pytest

from registry_server import TEST_PASSWORD as PASSWORD, TEST_USER as USER
from fetcher.registry import RegistrySource
from fetcher.source import BlobSource, SourceError

REPO = "fscached/test"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def blob(registry):
    data = os.urandom(3 * 1024 * 1024 + 123)
    return registry.push_blob(REPO, data), data


def test_is_a_blob_source():
    assert isinstance(RegistrySource("127.0.0.1:1", "a/b", scheme="http"), BlobSource)


def test_ranged_reads_return_exact_bytes(registry, blob):
    digest, data = blob
    size = len(data)
    ranges = [(0, 1), (0, 4096), (1, 4095), (4095, 2), (1 << 20, 1 << 20), (size - 1, 1),
              (size - 4096, 4096), (12345, 678), (0, size)]

    async def main():
        async with RegistrySource(registry.host, REPO, scheme="http") as src:
            for off, n in ranges:
                assert await src.read(digest, off, n) == data[off:off + n], (off, n)
            # concurrent reads share the session's pool
            got = await asyncio.gather(*(src.read(digest, i * 7919, 5000) for i in range(40)))
            assert got == [data[i * 7919:i * 7919 + 5000] for i in range(40)]
            assert await src.read(digest, 10, 0) == b""
            assert src.stats["retries"] == 0
    run(main())


def test_read_past_end(registry, blob):
    digest, data = blob
    size = len(data)

    async def main():
        async with RegistrySource(registry.host, REPO, scheme="http") as src:
            with pytest.raises(SourceError, match=rf"read past end.*{size} bytes"):
                await src.read(digest, size - 10, 20)  # overlaps the end
            with pytest.raises(SourceError, match=rf"read past end.*{size} bytes"):
                await src.read(digest, size + 5, 10)  # entirely beyond: 416
            assert src.stats["retries"] == 0
    run(main())


def test_unknown_blob_and_bad_ids(registry, blob):
    async def main():
        async with RegistrySource(registry.host, REPO, scheme="http") as src:
            with pytest.raises(SourceError, match=r"not found.*404"):
                await src.read("0" * 64, 0, 10)
            for bad in ("../../etc/passwd", "abc", "A" * 64, ""):
                with pytest.raises(SourceError):
                    await src.read(bad, 0, 10)
            with pytest.raises(SourceError, match="invalid range"):
                await src.read(blob[0], -1, 10)
        # unknown repository: still a SourceError
        async with RegistrySource(registry.host, "no/such-repo", scheme="http") as src:
            with pytest.raises(SourceError, match=r"404|unknown|not found"):
                await src.read(blob[0], 0, 10)
    run(main())


def test_connection_refused_gives_up(registry):
    from registry_server import free_port

    async def main():
        async with RegistrySource(f"127.0.0.1:{free_port()}", REPO, scheme="http",
                                  retries=2, backoff=0.01) as src:
            with pytest.raises(SourceError, match="giving up after 3 attempts"):
                await src.read("a" * 64, 0, 1)
    run(main())


def test_closed_source(registry, blob):
    async def main():
        src = RegistrySource(registry.host, REPO, scheme="http")
        assert await src.read(blob[0], 0, 3) == blob[1][:3]
        await src.close()
        await src.close()
        with pytest.raises(SourceError, match="closed"):
            await src.read(blob[0], 0, 3)
    run(main())


def test_constructor_validation():
    with pytest.raises(ValueError):
        RegistrySource("127.0.0.1:5000", "UPPER/case", scheme="http")
    with pytest.raises(ValueError):
        RegistrySource("127.0.0.1:5000", "a/b", scheme="ftp")
    with pytest.raises(ValueError):
        RegistrySource("user:pw@host", "a/b")
    with pytest.raises(ValueError, match="auth is not base64") as info:
        RegistrySource("127.0.0.1:5000", "a/b", auth="not base64 secret!")
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="either"):
        RegistrySource("127.0.0.1:5000", "a/b", username="u", auth=base64.b64encode(b"u:p").decode())


# -- basic auth (htpasswd) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_blob(auth_registry):
    data = os.urandom(200_000)
    return auth_registry.push_blob(REPO, data), data


def _assert_no_secrets(text: str):
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert PASSWORD not in text
    assert b64 not in text
    assert "Authorization" not in text


def test_basic_auth(auth_registry, auth_blob, caplog):
    caplog.set_level(logging.DEBUG)
    digest, data = auth_blob
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    async def main():
        async with RegistrySource(auth_registry.host, REPO, scheme="http",
                                  username=USER, password=PASSWORD) as src:
            assert await src.read(digest, 1000, 5000) == data[1000:6000]
            assert await src.read(digest, 0, len(data)) == data
            assert PASSWORD not in repr(src) and b64 not in repr(src)
        async with RegistrySource(auth_registry.host, REPO, scheme="http", auth=b64) as src:
            assert await src.read(digest, 7, 7) == data[7:14]
    run(main())
    _assert_no_secrets(caplog.text)


def test_basic_auth_wrong_password(auth_registry, auth_blob, caplog):
    caplog.set_level(logging.DEBUG)
    digest, _ = auth_blob
    wrong = PASSWORD + "-wrong"

    async def main():
        async with RegistrySource(auth_registry.host, REPO, scheme="http",
                                  username=USER, password=wrong, retries=1, backoff=0.01) as src:
            with pytest.raises(SourceError) as info:
                await src.read(digest, 0, 10)
            return info.value, src.stats
    exc, stats = run(main())
    msg = str(exc)
    assert "401" in msg and auth_registry.host in msg and USER in msg
    assert wrong not in msg and PASSWORD not in msg
    assert stats["retries"] == 0  # auth failures are final, not retried
    assert wrong not in caplog.text
    _assert_no_secrets(caplog.text)


def test_basic_auth_missing_credentials(auth_registry, auth_blob):
    async def main():
        async with RegistrySource(auth_registry.host, REPO, scheme="http") as src:
            with pytest.raises(SourceError, match=r"401.*none are configured"):
                await src.read(auth_blob[0], 0, 10)
    run(main())


# -- https -------------------------------------------------------------------------------------

def test_https_with_ca_file_and_skip_verify(tls_registry):
    data = os.urandom(50_000)
    digest = tls_registry.push_blob(REPO, data)
    ca = str(tls_registry.tls[0])

    async def main():
        async with RegistrySource(tls_registry.host, REPO, ca_file=ca) as src:
            assert await src.read(digest, 100, 1000) == data[100:1100]
        async with RegistrySource(tls_registry.host, REPO, skip_verify=True) as src:
            assert await src.read(digest, 0, 10) == data[:10]
        async with RegistrySource(tls_registry.host, REPO, retries=3) as src:  # system CAs only
            with pytest.raises(SourceError, match=r"TLS|certificate|SSL"):
                await src.read(digest, 0, 10)
            assert src.stats["retries"] == 0
    run(main())


def test_bad_ca_file(tmp_path):
    with pytest.raises(ValueError, match="CA file"):
        RegistrySource("127.0.0.1:5000", "a/b", ca_file=str(tmp_path / "missing.pem"))
