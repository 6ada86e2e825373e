import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: registry_server, standins

from registry_server import (TEST_PASSWORD, TEST_USER, RegistryServer,
                             make_self_signed_cert, registry_available)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    if not registry_available():
        pytest.fail("docker-registry not installed (Debian package docker-registry: make deps installs it)")
    with RegistryServer(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory):
    if not registry_available():
        pytest.fail("docker-registry not installed (Debian package docker-registry: make deps installs it)")
    import bcrypt  # noqa: F401  (a test dependency: the registry's htpasswd)
    with RegistryServer(tmp_path_factory.mktemp("auth-registry"), users={TEST_USER: TEST_PASSWORD}) as reg:
        yield reg


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory):
    if not registry_available():
        pytest.fail("docker-registry not installed (Debian package docker-registry: make deps installs it)")
    import shutil

    if not shutil.which("openssl"):
        pytest.fail("openssl not installed")
    work = tmp_path_factory.mktemp("tls-registry")
    with RegistryServer(work, tls=make_self_signed_cert(work / "tls")) as reg:
        yield reg


@pytest.fixture(scope="module")
def dragonfly_peer(tmp_path_factory):
    """A REAL Dragonfly peer for the fetcher's unit tests: the scheduler (v2.5.1) and one
    dfdaemon (dragonfly-client 1.5.10) in network namespaces of their own, no seed peer (the
    node goes back to the registry itself), no shaping, a registry with basic auth
    (TEST_USER / TEST_PASSWORD). coldstart.dragonfly.DragonflyCluster; torn down after the
    module. A machine where it cannot run fails the tests that need it (root, the built peers:
    `python -m coldstart.peers install`, which make test runs)."""
    import os

    if os.geteuid() != 0:
        pytest.fail("the real Dragonfly peer needs root (network namespaces)")
    from coldstart import ColdstartError
    from coldstart.dragonfly import DragonflyCluster
    from coldstart.peers import PeerError

    cluster = DragonflyCluster(tmp_path_factory.mktemp("dragonfly"), nodes=1, seed=False, uplink="unshaped",
                               lan="unshaped", registry_users={TEST_USER: TEST_PASSWORD})
    try:
        cluster.start()
    except (ColdstartError, PeerError, RuntimeError, OSError) as exc:
        pytest.fail(f"the real Dragonfly cluster did not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
