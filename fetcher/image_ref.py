"""Image references: `host[:port]/repo[/more][:tag]` or `...@sha256:<hex>`.

    parse_image_ref("127.0.0.1:5000/app/web:v1") -> ImageRef("127.0.0.1:5000", "app/web", "v1")
    parse_image_ref("reg.example.com/app@sha256:<64 hex>") -> reference "sha256:<64 hex>"

Choices (docker's own normalisation, where it matters):
- The first path component is the registry host when it contains '.' or ':' or is
  'localhost'; otherwise the reference is a Docker Hub one: host `registry-1.docker.io`
  (the Hub's API endpoint; `docker.io` / `index.docker.io` are mapped to it too) and a
  single-component repository gets `library/` ("alpine" -> "library/alpine").
- No tag and no digest means `latest`. With both (`repo:tag@sha256:...`) the digest wins:
  it names the content, the tag is only informational (and is kept in `ImageRef.tag`).
- Only sha256 digests (what registries and nydus use; it is also what we verify).
- No scheme (`https://...`) in a reference: http vs https is the source's setting.
All errors are ValueError with a message naming the reference and what is wrong with it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB_HOST = "registry-1.docker.io"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
DEFAULT_TAG = "latest"

# distribution's reference grammar
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_HOSTNAME_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)"
                          r"(?:\.(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?))*")
_IPV6_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]")


@dataclass(frozen=True)
class ImageRef:
    host: str  # "host[:port]" as RegistrySource wants it
    repo: str  # "app/web"
    reference: str  # a tag, or "sha256:<hex>"
    tag: str | None = None  # the tag written next to a digest, if any (informational)

    @property
    def is_digest(self) -> bool:
        return self.reference.startswith("sha256:")

    def __str__(self) -> str:
        sep = "@" if self.is_digest else ":"
        return f"{self.host}/{self.repo}{sep}{self.reference}"

    def __iter__(self):  # host, repo, reference = parse_image_ref(...)
        return iter((self.host, self.repo, self.reference))


def check_reference(reference: str) -> str:
    """A tag or a `sha256:<hex>` digest (a leading '@' is dropped); ValueError otherwise."""
    if not isinstance(reference, str):
        raise ValueError(f"reference must be a string, not {type(reference).__name__}")
    ref = reference[1:] if reference.startswith("@") else reference
    if ":" in ref:
        algo = ref.split(":", 1)[0]
        if algo != "sha256":
            raise ValueError(f"unsupported digest algorithm {algo[:20]!r} in {reference[:200]!r} "
                             "(only sha256)")
        if not _DIGEST_RE.fullmatch(ref):
            raise ValueError(f"invalid digest {reference[:200]!r}: expected sha256: and 64 lowercase hex digits")
        return ref
    if not _TAG_RE.fullmatch(ref):
        raise ValueError(f"invalid tag {reference[:200]!r}: expected up to 128 letters, digits, "
                         "'_', '.', '-' (not starting with '.' or '-')")
    return ref


def _check_host(host: str, ref: str) -> str:
    name, port = host, None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ValueError(f"invalid registry host {host!r} in {ref!r}: unclosed '['")
        name, rest = host[:end + 1], host[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid registry host {host!r} in {ref!r}")
            port = rest[1:]
        if not _IPV6_RE.fullmatch(name):
            raise ValueError(f"invalid registry host {host!r} in {ref!r}")
    else:
        if host.count(":") > 1:
            raise ValueError(f"invalid registry host {host!r} in {ref!r} (IPv6 addresses go in [brackets])")
        if ":" in host:
            name, port = host.split(":")
        if not _HOSTNAME_RE.fullmatch(name):
            raise ValueError(f"invalid registry host {host!r} in {ref!r}")
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid port {port!r} in {ref!r}: expected 1..65535")
    return host


def parse_image_ref(ref: str) -> ImageRef:
    """Split `host[:port]/repo[/more][:tag][@sha256:<hex>]`; see the module doc for defaults."""
    if not isinstance(ref, str):
        raise ValueError(f"image reference must be a string, not {type(ref).__name__}")
    text = ref.strip()
    shown = text[:200]
    if not text:
        raise ValueError("empty image reference")
    if "://" in text:
        raise ValueError(f"invalid image reference {shown!r}: no scheme, write host[:port]/repo:tag")
    if any(c.isspace() for c in text):
        raise ValueError(f"invalid image reference {shown!r}: contains whitespace")

    name, digest = text, None
    if "@" in text:
        name, digest = text.split("@", 1)
        if "@" in digest:
            raise ValueError(f"invalid image reference {shown!r}: more than one '@'")
        try:
            digest = check_reference(digest)
        except ValueError as exc:
            raise ValueError(f"invalid image reference {shown!r}: {exc}") from None
        if ":" not in digest:
            raise ValueError(f"invalid image reference {shown!r}: '@' must be followed by sha256:<hex>")

    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:  # a ':' after the last '/' separates the tag (before it: a port)
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise ValueError(f"invalid tag {tag[:200]!r} in {shown!r}: expected up to 128 letters, "
                             "digits, '_', '.', '-' (not starting with '.' or '-')")
    if not name:
        raise ValueError(f"invalid image reference {shown!r}: no repository")

    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, repo = _check_host(first, shown), rest
        if host.lower() in _HUB_ALIASES:
            host = DOCKER_HUB_HOST
            if "/" not in repo:
                repo = f"library/{repo}"
    else:
        host, repo = DOCKER_HUB_HOST, name
        if "/" not in repo:
            repo = f"library/{repo}"
    if not repo:
        raise ValueError(f"invalid image reference {shown!r}: no repository after the host")
    if not _REPO_RE.fullmatch(repo):
        raise ValueError(f"invalid repository {repo[:200]!r} in {shown!r}: lowercase letters, digits and "
                         "separators ('.', '_', '__', '-') in '/'-separated components")
    if len(host) + 1 + len(repo) > 255:
        raise ValueError(f"invalid image reference {shown!r}: name longer than 255 characters")
    if digest is not None:
        return ImageRef(host, repo, digest, tag)
    return ImageRef(host, repo, tag or DEFAULT_TAG, None)
