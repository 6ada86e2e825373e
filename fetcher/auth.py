"""Registry authentication: anonymous, HTTP basic, and the distribution token (Bearer) flow.

Credentials never appear in messages, logs or reprs: errors name the registry, the realm and
the HTTP status only.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from dataclasses import dataclass, field

import aiohttp

from fetcher.source import SourceError

log = logging.getLogger("fscached.fetcher.auth")

# auth-param = token "=" ( token / quoted-string )
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


class AuthError(SourceError):
    """Authentication failed for good: credentials missing or rejected, a token endpoint that
    refuses or answers nonsense. `why` is the message without the leading "registry <url>: "."""

    def __init__(self, registry: str, why: str) -> None:
        super().__init__(f"registry {registry}: {why}")
        self.why = why


class TransientAuthError(Exception):
    """The token endpoint failed in a way worth retrying (connection error, 5xx, 429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def as_auth(self) -> str:
        """The docker config.json style `auth`: base64 of "user:password" (make_credentials' input)."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")

    def basic_header(self) -> str:
        return "Basic " + self.as_auth()

    def __repr__(self) -> str:  # never show the password
        return f"Credentials(username={self.username!r}, password=***)"


def make_credentials(username: str | None = None, password: str | None = None,
                     auth: str | None = None) -> Credentials | None:
    """From username/password, or a docker config.json style `auth` (base64 "user:pass")."""
    if auth is not None:
        if username is not None or password is not None:
            raise ValueError("give either username/password or auth, not both")
        try:
            decoded = base64.b64decode(auth.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ValueError("auth is not base64 of 'user:password'") from None
        user, sep, pw = decoded.partition(":")
        if not sep or not user:
            raise ValueError("auth is not base64 of 'user:password'")
        return Credentials(user, pw)
    if username is None and password is None:
        return None
    if not username:
        raise ValueError("a password needs a username")
    return Credentials(username, password or "")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="https://auth",service="reg",scope="repository:x:pull"` ->
    ("bearer", {"realm": ..., "service": ..., "scope": ...}). Scheme lower-cased."""
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params


def parse_retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, min(seconds, cap))


class RegistryAuth:
    """Holds what to send as Authorization to one registry, and renews it on a 401.

    `actions`: what its Bearer tokens are asked for, "pull" (reads) or "pull,push" (writes: a
    RegistrySource keeps one RegistryAuth for each, so a read never carries a push token and a
    write never stalls on a pull-only one). Basic credentials are the same for both."""

    # a token is renewed this long before it says it expires
    EXPIRY_MARGIN = 10.0

    def __init__(self, registry: str, repo: str, credentials: Credentials | None,
                 actions: str = "pull") -> None:
        if actions not in ("pull", "pull,push"):
            raise ValueError(f"actions must be 'pull' or 'pull,push', not {actions!r}")
        self.registry = registry
        self.repo = repo
        self.credentials = credentials
        self.actions = actions
        self.scheme: str | None = None  # learned from the first challenge
        self._token: str | None = None
        self._token_expires = 0.0
        self._challenge: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RegistryAuth(registry={self.registry!r}, scheme={self.scheme!r}, credentials={self.credentials!r})"

    def header(self) -> str | None:
        """The Authorization value for the next request (None: anonymous so far)."""
        if self.scheme == "basic" and self.credentials is not None:
            return self.credentials.basic_header()
        if self.scheme == "bearer" and self._token is not None:
            if time.monotonic() < self._token_expires:
                return f"Bearer {self._token}"
        return None

    def needs_refresh(self) -> bool:
        return self.scheme == "bearer" and (self._token is None or time.monotonic() >= self._token_expires)

    async def refresh(self, session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> None:
        """Renew an expired token ahead of a request (a token scheme already learned)."""
        async with self._lock:
            if self.needs_refresh():
                await self._fetch_token(session, timeout)

    async def on_unauthorized(self, www_authenticate: str | None, sent: str | None,
                              session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> None:
        """A 401 came back for a request that carried `sent` (None: anonymous): get something
        better to send, or raise AuthError when there is nothing. The caller retries once
        and calls `denied()` on a second 401."""
        if not www_authenticate:
            raise self.denied("no WWW-Authenticate challenge")
        scheme, params = parse_challenge(www_authenticate)
        async with self._lock:
            if scheme == "basic":
                if self.credentials is None:
                    raise self.denied("the registry wants credentials and none are configured")
                if sent is not None and sent.startswith("Basic "):
                    raise self.denied("credentials rejected")
                self.scheme = "basic"
                return
            if scheme == "bearer":
                if "realm" not in params:
                    raise self.denied("Bearer challenge without a realm")
                self.scheme = "bearer"
                current = self.header()
                if current is not None and current != sent:
                    return  # another request renewed the token meanwhile
                self._challenge = params
                await self._fetch_token(session, timeout)
                return
            raise self.denied(f"unsupported auth scheme {scheme!r}")

    def renew(self, credentials: Credentials | None) -> None:
        """New credentials (nydusd's PUT /api/v1/config): the token the old ones bought is
        dropped, so the next request authenticates again with the new ones."""
        self.credentials = credentials
        self._token = None
        self._token_expires = 0.0

    def seed_token(self, token: str) -> None:
        """nydusd's `registry_token`: sent as a Bearer token until the registry answers 401,
        when the usual challenge (with the credentials, or anonymous) gets a new one."""
        self.scheme = "bearer"
        self._token = token
        self._token_expires = float("inf")

    def _who(self) -> str:
        return f" for user {self.credentials.username!r}" if self.credentials else " (anonymous)"

    def denied(self, why: str = "credentials rejected") -> AuthError:
        return AuthError(self.registry, f"HTTP 401 unauthorized for {self.repo}{self._who()}: {why}")

    async def _fetch_token(self, session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> None:
        params = self._challenge
        realm = params["realm"]
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        scope = params.get("scope") or f"repository:{self.repo}:{self.actions}"
        if "push" in self.actions and "push" not in scope:
            scope = f"repository:{self.repo}:{self.actions}"  # a write needs a push token, whatever was challenged
        query["scope"] = scope
        headers = {}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic_header()
            query["account"] = self.credentials.username
        realm_name = strip_query(realm)
        try:
            async with session.get(realm, params=query, headers=headers, timeout=timeout,
                                   allow_redirects=True) as resp:
                if resp.status == 429 or resp.status >= 500:
                    raise TransientAuthError(
                        f"token endpoint {realm_name}: HTTP {resp.status}",
                        parse_retry_after(resp.headers.get("Retry-After"), 60.0))
                if resp.status in (401, 403):
                    raise self.denied(f"token endpoint {realm_name} answered HTTP {resp.status}")
                if resp.status != 200:
                    raise AuthError(self.registry, f"token endpoint {realm_name} answered HTTP {resp.status}")
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    raise AuthError(self.registry, f"token endpoint {realm_name} sent no JSON") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransientAuthError(f"token endpoint {realm_name}: {type(exc).__name__}: {exc}") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not token or not isinstance(token, str):
            raise AuthError(self.registry, f"token endpoint {realm_name} sent no token")
        try:
            expires_in = float(body.get("expires_in") or 60)
        except (TypeError, ValueError):
            expires_in = 60.0
        now = time.monotonic()
        self._token = token
        self._token_expires = now + max(1.0, expires_in - min(self.EXPIRY_MARGIN, expires_in / 2))
        log.debug("registry %s: got a token from %s valid %.0fs", self.registry, realm_name, expires_in)


def strip_query(url: str) -> str:
    """For messages: presigned URLs carry signatures in their query strings."""
    return url.split("?", 1)[0]
