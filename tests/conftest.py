import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: registry_server, standins

from registry_server import (TEST_PASSWORD, TEST_USER, RegistryServer,
                             make_self_signed_cert, registry_available)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    if not registry_available():
        pytest.skip("docker-registry not installed (Debian package docker-registry)")
    with RegistryServer(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory):
    if not registry_available():
        pytest.skip("docker-registry not installed (Debian package docker-registry)")
    pytest.importorskip("bcrypt")
    with RegistryServer(tmp_path_factory.mktemp("auth-registry"), users={TEST_USER: TEST_PASSWORD}) as reg:
        yield reg


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory):
    if not registry_available():
        pytest.skip("docker-registry not installed (Debian package docker-registry)")
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    work = tmp_path_factory.mktemp("tls-registry")
    with RegistryServer(work, tls=make_self_signed_cert(work / "tls")) as reg:
        yield reg
