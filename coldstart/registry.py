"""Debian's docker-registry (Distribution 2.x) on a free loopback port: `make demo`'s registry
and, subclassed by tests/registry_server.py, the test suite's.

    with RegistryRunner(workdir) as reg:                       # anonymous, plain http
    with RegistryRunner(workdir, users={"alice": "pw"}) as reg:  # htpasswd basic auth
        reg.url, reg.host, reg.auth_header()

Storage, config, htpasswd and the log all live under `workdir`. Only ever binds 127.0.0.1.
Synchronous (subprocess + urllib), so it can be used from plain code and fixtures alike.
"""
from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TypeVar

REGISTRY_BIN = "docker-registry"

_R = TypeVar("_R", bound="RegistryRunner")
# an access-log line (Apache combined format, access_log=True): method, path, status, body bytes
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<bytes>\d+|-) ')


def free_port() -> int:
    """A loopback TCP port nobody was bound to a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def htpasswd_line(user: str, password: str) -> str:
    """One htpasswd line; the registry only accepts bcrypt hashes."""
    try:
        import bcrypt  # the [test] extra: only RegistryRunner(users=...) needs it
    except ImportError as exc:
        raise RuntimeError("RegistryRunner(users=...) needs the bcrypt package "
                           "(pip install 'fscached[test]')") from exc
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    return f"{user}:{hashed}\n"


class RegistryRunner:
    """docker-registry on a free loopback port, its storage under `workdir`; start() / stop(),
    or a context manager.

    users: htpasswd basic auth (then a 401 on /v2/ counts as ready); tls: (certificate, key)
    PEM files to serve https; log_level / access_log / delete_enabled / secret / realm: the
    registry's config; new_session: start it in a session of its own (the default: a Ctrl-C on
    the terminal reaches only the caller, which stops things in order); attempts: how many
    fresh ports to try (one can be taken between probe and bind)."""

    BIN = REGISTRY_BIN
    LOG_TAIL_LINES = 20  # log_tail()'s default, also what a failed start() quotes

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None, start_timeout: float = 20.0,
                 log_level: str = "warn", access_log: bool = False,
                 delete_enabled: bool = False, secret: str = "fscached-demo",
                 realm: str = "fscached", new_session: bool = True,
                 attempts: int = 3) -> None:
        self.workdir = Path(workdir)
        self.users = dict(users or {})
        self.tls = tls
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.access_log = access_log
        self.delete_enabled = delete_enabled
        self.secret = secret
        self.realm = realm
        self.new_session = new_session
        self.attempts = attempts
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "registry.log"

    @classmethod
    def available(cls) -> bool:
        return shutil.which(cls.BIN) is not None

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
        """Basic credentials of the first user ({} when anonymous)."""
        if not self.users:
            return {}
        user, password = next(iter(self.users.items()))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def _ssl(self) -> ssl.SSLContext | None:
        """A client context trusting our own certificate (None over plain http)."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.tls[0]))

    # -- lifecycle ---------------------------------------------------------------------------
    def _write_config(self) -> Path:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        lines = ["version: 0.1", "log:", f"  level: {self.log_level}"]
        if self.access_log:
            lines += ["  accesslog:", "    disabled: false"]
        lines += ["storage:", "  filesystem:", f"    rootdirectory: {storage}"]
        if self.delete_enabled:
            lines += ["  delete:", "    enabled: true"]
        lines += [
            # no redirects: the filesystem driver serves blob bytes itself
            "  redirect:",
            "    disable: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {self.secret}",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls[0]}", f"    key: {self.tls[1]}"]
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text("".join(htpasswd_line(u, p) for u, p in self.users.items()))
            lines += ["auth:", "  htpasswd:", f"    realm: {self.realm}", f"    path: {htpasswd}"]
        config = self.workdir / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self: _R) -> _R:
        exe = shutil.which(self.BIN)
        if exe is None:
            raise RuntimeError("docker-registry is not installed (Debian package docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        error = "?"
        for _attempt in range(self.attempts):  # a free port can be taken between probe and bind
            self.port = free_port()
            config = self._write_config()
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([exe, "serve", str(config)], stdout=log,
                                             stderr=subprocess.STDOUT, env=env,
                                             start_new_session=self.new_session)
            try:
                self._wait_ready()
                return self
            except RuntimeError as exc:
                error = str(exc)
                self.stop()
        raise RuntimeError(f"{error}\n--- registry log ---\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        assert self.proc is not None
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
        raise RuntimeError(f"docker-registry did not answer on {self.url}/v2/ "
                           f"in {self.start_timeout:g}s")

    def stop(self) -> None:
        """Idempotent: SIGTERM, SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # -- what was served ------------------------------------------------------------------------
    def log_size(self) -> int:
        """The log's length now: a mark for `blob_bytes_served(since=...)`."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def blob_bytes_served(self, digest: str, *, since: int = 0) -> int:
        """Body bytes the registry sent for GETs of the blob `digest` ("sha256:<hex>" or the hex),
        in any repository, as its access log records them from byte `since` of the log (ranged
        and aborted transfers count what was written). Needs access_log=True."""
        if not self.access_log:
            raise RuntimeError("RegistryRunner.blob_bytes_served needs access_log=True")
        hexd = digest.removeprefix("sha256:")
        total = 0
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return 0
        for m in _ACCESS.finditer(text):
            if (m["method"] == "GET" and m["bytes"] != "-"
                    and m["path"].split("?", 1)[0].endswith(f"/blobs/sha256:{hexd}")):
                total += int(m["bytes"])
        return total

    def log_tail(self, n: int | None = None) -> str:
        """The last `n` lines (default LOG_TAIL_LINES) of the registry's log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-(n if n is not None else self.LOG_TAIL_LINES):])

    def __enter__(self: _R) -> _R:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
