"""Who may import whom (docs/architecture.md), checked on every module's imports (the ast, not
a grep): lower rooms never import upper ones, and nothing outside the frontends asks which
kernel path it talks to."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# room -> the project's modules it may import (prefixes); every room may import itself and
# the standard library and third-party packages
ALLOWED = {
    "fscached.util": ["native"],
    "fscached.config": ["fscached.util", "fetcher.auth", "fetcher.image_ref"],
    "fscached.core": ["fscached.util", "fscached.config", "erofs_image", "fetcher", "native"],
    "fscached.frontends": ["fscached.util", "fscached.config", "fscached.core", "fscached.lifecycle.fdnames",
                           "cachefiles", "fanotify", "fetcher.source", "erofs_image", "native"],
    "fscached.lifecycle": ["fscached.util", "fscached.config", "fscached._proto", "fscached.frontends.fanotify.keeper",
                           "cachefiles.device"],
    "fscached.images": ["fscached.config", "fscached.core.catalog"],
    "fscached.kernel_path": ["fanotify"],
    # the wiring: everything below it, nothing above it (the API, the command lines)
    "fscached.daemon": ["fscached.util", "fscached.config", "fscached.core", "fscached.frontends", "fscached.lifecycle",
                        "fscached.images", "fscached.kernel_path", "fscached.cache_gc", "cachefiles", "fanotify",
                        "erofs_image", "fetcher"],
    "fscached.cache_gc": ["fscached.util", "fscached.config", "fscached.frontends.base"],
    "fscached.metrics": ["fscached.util", "fscached.core.stats", "fscached.daemon", "fscached.frontends.base"],
    "fscached.api": ["fscached.util", "fscached.config", "fscached.core", "fscached.daemon", "fscached.frontends.base",
                     "fscached.images", "fscached.lifecycle.supervisor", "fscached.metrics", "fscached.api",
                     "fetcher", "erofs_image"],
    # the lower packages know nothing of the daemon (but its shared helpers)
    "erofs_image": ["erofs_image", "fscached.util", "native"],
    "fetcher": ["fetcher", "fscached.util", "erofs_image"],
    "cachefiles": ["cachefiles", "fscached.util", "native"],
    "fanotify": ["fanotify", "native"],
    "native": ["native"],
}
# the command lines (fscached, nydusd, fscachedctl, fscached-image): the top of the house
TOPS = {"fscached.cli", "fscached.nydusd_cli", "fscached.ctl", "erofs_image.cli", "erofs_image.profile_cli",
        "erofs_image.demo"}
PROJECT = ("fscached", "erofs_image", "fetcher", "cachefiles", "fanotify", "native", "coldstart")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every project module the file imports, at any depth of the file (lazy imports count)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from a.b import c": a.b.c when c is a module, else a.b (checked as such below)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PROJECT}


def room_of(module: str) -> str | None:
    best = None
    for room in ALLOWED:
        if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best)):
            best = room
    return best


def allowed(room: str, target: str) -> bool:
    if target == room or target.startswith(room + "."):
        return True
    return any(target == prefix or target.startswith(prefix + ".") for prefix in ALLOWED[room])


def test_lower_rooms_never_import_upper_ones() -> None:
    broken = []
    checked = 0
    for package in ("fscached", "erofs_image", "fetcher", "cachefiles", "fanotify", "native"):
        for path in sorted((REPO / package).rglob("*.py")):
            if "_proto" in path.parts:
                continue
            module = module_name(path)
            room = room_of(module)
            if room is None or module in TOPS:  # the command lines: the top, they may import anything
                continue
            checked += 1
            for target in sorted(project_imports(path)):
                # "from x import y": fine when x.y is a module it may import, or x is
                if not allowed(room, target) and not allowed(room, target.rpartition(".")[0]):
                    broken.append(f"{module} ({room}) imports {target}")
    assert checked > 50, checked
    assert broken == [], "\n".join(broken)


def test_the_daemon_package_never_imports_the_cold_start_harness() -> None:
    for path in (REPO / "fscached").rglob("*.py"):
        assert not any(t.startswith("coldstart") for t in project_imports(path)), path


def test_no_switch_on_the_frontend_type_outside_the_frontends() -> None:
    """The daemon, cache GC, metrics, API and hand-over talk to a frontend only through the
    Frontend protocol (fscached.frontends.base)."""
    offenders = []
    for path in (REPO / "fscached").rglob("*.py"):
        if "frontends" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("isinstance", "hasattr", "getattr") and node.args:
                text = ast.unparse(node)
                if "Frontend" in text or "frontend" in text or "server" in text:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {text}")
    assert offenders == [], offenders
