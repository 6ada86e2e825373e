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

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REGISTRY_BIN = "docker-registry"
# credentials for RegistryServer(users={TEST_USER: TEST_PASSWORD}); non-ASCII on purpose
TEST_USER = "alice"
TEST_PASSWORD = "pa55-W\u00f6rd-not-in-logs"


def registry_available() -> bool:
    return shutil.which(REGISTRY_BIN) is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _htpasswd_line(user: str, password: str) -> str:
    import bcrypt  # test dependency (pyproject [test]); the registry only accepts bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    return f"{user}:{hashed}\n"


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


class RegistryServer:
    def __init__(self, workdir: Path, users: dict[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None, start_timeout: float = 20.0) -> None:
        """users: htpasswd basic auth; tls: (certificate, key) PEM files to serve https."""
        self.workdir = Path(workdir)
        self.users = dict(users or {})
        self.tls = tls
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "registry.log"

    # -- addresses ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def auth_header(self) -> dict[str, str]:
        if not self.users:
            return {}
        user, password = next(iter(self.users.items()))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    # -- lifecycle ---------------------------------------------------------------------------
    def _write_config(self) -> Path:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {storage}",
            "  delete:",
            "    enabled: true",
            # no redirects: the filesystem driver serves blob bytes itself
            "  redirect:",
            "    disable: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: fscached-test-secret",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls[0]}", f"    key: {self.tls[1]}"]
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text("".join(_htpasswd_line(u, p) for u, p in self.users.items()))
            lines += ["auth:", "  htpasswd:", "    realm: fscached-test", f"    path: {htpasswd}"]
        config = self.workdir / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> "RegistryServer":
        exe = shutil.which(REGISTRY_BIN)
        if exe is None:
            raise RuntimeError("docker-registry is not installed (Debian package docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error = None
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = free_port()
            config = self._write_config()
            log = open(self.log_path, "ab")
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            self.proc = subprocess.Popen([exe, "serve", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
            log.close()
            try:
                self._wait_ready()
                return self
            except RuntimeError as exc:
                last_error = exc
                self.stop()
        raise RuntimeError(f"{last_error}\n--- registry log ---\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}")
            try:
                req = urllib.request.Request(self.url + "/v2/", headers=self.auth_header())
                with urllib.request.urlopen(req, timeout=1, context=self._ssl()) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and self.users:
                    return  # answering, just wants credentials
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer on {self.url}/v2/ in {self.start_timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "RegistryServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- distribution API --------------------------------------------------------------------
    def _request(self, method: str, url: str, data: bytes | None = None,
                 headers: dict[str, str] | None = None):
        hdrs = {**self.auth_header(), **(headers or {})}
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        return urllib.request.urlopen(req, timeout=30, context=self._ssl())

    def _ssl(self):
        if not self.tls:
            return None
        import ssl

        return ssl.create_default_context(cafile=str(self.tls[0]))

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

    def blob_url(self, repo: str, digest_hex: str) -> str:
        return f"{self.url}/v2/{repo}/blobs/sha256:{digest_hex}"
