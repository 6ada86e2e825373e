"""A real Distribution registry (Debian's `docker-registry`, 2.x) on a loopback port, for tests.

    with RegistryServer(tmp_path) as reg:                      # anonymous
    with RegistryServer(tmp_path, users={"alice": "pw"}) as reg:  # htpasswd basic auth
        digest_hex = reg.push_blob("some/repo", b"bytes")
        reg.url, reg.host, reg.auth_header()

Pushes go through the distribution API (POST /v2/<repo>/blobs/uploads/, PUT ?digest=), so
the blob lands in the registry exactly as a client would put it there. Synchronous (urllib),
so it can be used from plain fixtures. Only ever binds 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from coldstart.registry import REGISTRY_BIN, RegistryRunner, free_port

__all__ = ["REGISTRY_BIN", "TEST_PASSWORD", "TEST_USER", "RegistryServer", "free_port",
           "make_self_signed_cert", "registry_available"]

# credentials for RegistryServer(users={TEST_USER: TEST_PASSWORD}); non-ASCII on purpose
TEST_USER = "alice"
TEST_PASSWORD = "pa55-W\u00f6rd-not-in-logs"


def registry_available() -> bool:
    return RegistryRunner.available()


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (it is its own CA): (cert.pem, key.pem)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class RegistryServer(RegistryRunner):
    """The shipped RegistryRunner (coldstart/registry.py: start with port retries,
    readiness, stop, log_tail, users / tls) set up for tests: info log with access lines,
    deletes enabled, in pytest's session; plus pushes through the distribution API."""

    LOG_TAIL_LINES = 40

    def __init__(self, workdir: Path, users: dict[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None, start_timeout: float = 20.0) -> None:
        """users: htpasswd basic auth; tls: (certificate, key) PEM files to serve https."""
        super().__init__(workdir, users=users, tls=tls, start_timeout=start_timeout,
                         log_level="info", access_log=True, delete_enabled=True,
                         secret="fscached-test-secret", realm="fscached-test",
                         new_session=False)

    # -- distribution API --------------------------------------------------------------------
    def _request(self, method: str, url: str, data: bytes | None = None,
                 headers: dict[str, str] | None = None):
        hdrs = {**self.auth_header(), **(headers or {})}
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        return urllib.request.urlopen(req, timeout=30, context=self._ssl())

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload `data` as a blob of `repo` (monolithic POST + PUT); return its sha256 hex."""
        digest = hashlib.sha256(data).hexdigest()
        with self._request("POST", f"{self.url}/v2/{repo}/blobs/uploads/", data=b"") as resp:
            if resp.status != 202:
                raise RuntimeError(f"upload start: HTTP {resp.status}")
            location = resp.headers["Location"]
        location = urllib.parse.urljoin(self.url + "/", location)
        sep = "&" if "?" in location else "?"
        put_url = f"{location}{sep}digest=sha256:{digest}"
        with self._request("PUT", put_url, data=data,
                           headers={"Content-Type": "application/octet-stream",
                                    "Content-Length": str(len(data))}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"upload finish: HTTP {resp.status}")
        return digest

    def skopeo_push(self, oci: Path, dest: str, tag: str = "latest") -> str:
        """`skopeo copy oci:OCI:TAG docker://<this registry>/DEST` (with the first user's
        credentials when it has users); the pushed manifest's digest."""
        from erofs_image.oci_media import OCI_MANIFEST

        cmd = ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{oci}:{tag}", f"docker://{self.host}/{dest}"]
        if self.users:
            user, password = next(iter(self.users.items()))
            cmd[2:2] = ["--dest-creds", f"{user}:{password}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        repo, _, ref = dest.rpartition(":")
        with self._request("HEAD", f"{self.url}/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST}) as resp:
            return str(resp.headers["Docker-Content-Digest"])

    def blob_url(self, repo: str, digest_hex: str) -> str:
        return f"{self.url}/v2/{repo}/blobs/sha256:{digest_hex}"
