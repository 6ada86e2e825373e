"""`python -m fscached.demo` (make demo): serve a container image lazily, for real.

1. Build a sample image offline, as a 3-layer OCI layout: a small root filesystem made of this
   machine's /bin/sh, ls, cat and python3 with the shared libraries `ldd` names, python's
   standard library, and a slice of site-packages (tens of MiB nobody reads at start-up).
2. `fscached-image convert` it (bootstrap + zstd data blobs + an OCI layout).
3. Start docker-registry on a free loopback port (storage in the demo's temp dir) and push the
   converted image with skopeo.
4. Start `fscached --backend auto` on it: it pulls the bootstrap, mounts the image (file-backed
   EROFS over sparse cache files) and fills byte ranges from the registry as the kernel asks.
5. `chroot MNT /bin/sh -c ...`: a command from inside the lazily served image.
6. Print bytes fetched vs image size, requests, time to first output; stop and clean up
   everything (also on Ctrl-C or failure).

Where the kernel has no fanotify pre-content events (or docker-registry / skopeo / root are
missing), it says why, does the offline part (build, convert, inspect, read a file back from
the blobs) and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskID, TextColumn,
                           TimeElapsedColumn)
from rich.table import Column, Table

from erofs_image.demo import entry, tar_bytes, write_oci_layout
from fscached.registry_runner import RegistryRunner

GREETING = "hello from inside the lazily served image"
REPO = "fscached-demo/sample"
TAG = "latest"
FSID = "demo"
WORK_PARENT = Path(os.environ.get("FSCACHED_DEMO_DIR", "/var/tmp"))  # ext4/xfs/btrfs, not tmpfs
# What runs inside the image: its first line comes from a file only the image has.
COMMAND = ('cat /etc/fscached-demo-greeting; echo "/ holds:" $(ls /); '
           'python3 /app/hello.py')
HELLO_PY = '''\
import json, sys
sys.path.insert(0, "/app/site-packages")
import pygments  # the app's own dependency, from the top layer
print(f"python {sys.version.split()[0]} at {sys.executable}, pygments {pygments.__version__}:",
      json.dumps({"modules imported": len(sys.modules), "prefix": sys.prefix}))
'''
STDLIB_SKIP = {"test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "site-packages", "dist-packages", "__phello__"}
SITE_PACKAGES_SLICE = 40 << 20  # bytes of site-packages in /app: real files start-up never reads


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --------------------------------------------------------------------------- the sample image


class Layer:
    """The entries of one image layer, paths mirrored from this machine (symlinked path
    components such as a merged-/usr /bin -> usr/bin are kept as symlinks)."""

    def __init__(self, name: str, compression: str) -> None:
        self.name, self.compression = name, compression
        self.entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
        self.file_bytes = 0

    def _put(self, rel: str, item: tuple[tarfile.TarInfo, bytes | None]) -> None:
        if rel not in self.entries:
            self.entries[rel] = item
            if item[1] is not None:
                self.file_bytes += len(item[1])

    def add_dir(self, path: str, mode: int = 0o755, mtime: int = 1_700_000_000) -> None:
        rel = path.strip("/")
        parent = os.path.dirname(rel)
        if parent and parent not in self.entries:
            self.add_dir(parent)
        self._put(rel, entry(rel, None, tarfile.DIRTYPE, mode, mtime))

    def add_file(self, path: str, data: bytes, mode: int = 0o644, mtime: int = 1_700_000_000) -> None:
        rel = path.strip("/")
        if os.path.dirname(rel):
            self.add_dir(os.path.dirname(rel))
        self._put(rel, entry(rel, data, mode=mode, mtime=mtime))

    def add_symlink(self, path: str, target: str) -> None:
        rel = path.strip("/")
        if os.path.dirname(rel):
            self.add_dir(os.path.dirname(rel))
        self._put(rel, entry(rel, None, tarfile.SYMTYPE, 0o777, linkname=target))

    def add_host(self, path: str, _depth: int = 0) -> str:
        """Copy a host path (and each symlink on the way to it); returns its real path."""
        if _depth > 40:
            raise RuntimeError(f"{path}: too many levels of symbolic links")
        parts = [p for p in os.path.abspath(path).split("/") if p]
        cur = ""
        for i, part in enumerate(parts):
            cur = f"{cur}/{part}"
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(cur)
                self.add_symlink(cur, target)
                resolved = os.path.normpath(os.path.join(os.path.dirname(cur), target))
                return self.add_host(os.path.join(resolved, *parts[i + 1:]), _depth + 1)
            if stat.S_ISDIR(st.st_mode):
                self.add_dir(cur, stat.S_IMODE(st.st_mode), int(st.st_mtime))
            elif stat.S_ISREG(st.st_mode) and i == len(parts) - 1:
                self.add_file(cur, Path(cur).read_bytes(), stat.S_IMODE(st.st_mode), int(st.st_mtime))
        return cur

    def add_host_tree(self, root: str, keep: Callable[[str, str], bool] = lambda d, n: True,
                      dest: str | None = None) -> None:
        """A host directory tree (regular files, dirs, symlinks), at `dest` (default: its own
        path). keep(relative dir, name) filters entries."""
        real = self.add_host(root) if dest is None else os.path.realpath(root)
        base = dest if dest is not None else real
        for dirpath, dirnames, filenames in os.walk(real):
            rel = os.path.relpath(dirpath, real)
            rel = "" if rel == "." else rel
            dirnames[:] = sorted(d for d in dirnames if keep(rel, d))
            st = os.lstat(dirpath)
            self.add_dir(os.path.join(base, rel), stat.S_IMODE(st.st_mode), int(st.st_mtime))
            for name in dirnames + sorted(filenames):
                if not keep(rel, name):
                    continue
                p = os.path.join(dirpath, name)
                target = os.path.join(base, rel, name)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(target, os.readlink(p))
                elif stat.S_ISREG(st.st_mode) and keep(rel, name):
                    self.add_file(target, Path(p).read_bytes(), stat.S_IMODE(st.st_mode), int(st.st_mtime))

    def tar(self) -> bytes:
        return tar_bytes(self.entries.values())


def shared_libraries(binaries: list[str]) -> list[str]:
    """The absolute paths `ldd` names for `binaries` (the loader included)."""
    found: list[str] = []
    if shutil.which("ldd") is None:
        return found  # the image will not run, but it can still be built and converted
    for binary in binaries:
        r = subprocess.run(["ldd", binary], capture_output=True, text=True)
        if r.returncode:
            continue  # statically linked
        for line in r.stdout.splitlines():
            words = line.split()
            path = words[2] if "=>" in words and len(words) > 2 else (words[0] if words else "")
            if path.startswith("/") and path not in found:
                found.append(path)
    return found


def interpreter() -> tuple[str, str, list[str]]:
    """The python3 to put in the image (the system's when there is one, else the base
    interpreter running this), its bytecode cache tag and its standard library directories."""
    candidates = [shutil.which("python3", path="/usr/bin:/bin"),
                  getattr(sys, "_base_executable", None), sys.executable]
    for exe in candidates:
        if not exe or not os.path.exists(exe):
            continue
        r = subprocess.run([exe, "-I", "-S", "-c", "import sys; print(sys.implementation.cache_tag); "
                            "print('\\n'.join(sys.path))"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            tag, *paths = r.stdout.splitlines()
            dirs = [p for p in paths if p and os.path.isdir(p)]
            dirs = [d for d in dirs  # lib-dynload often lives inside the stdlib dir
                    if not any(d.startswith(o.rstrip("/") + "/") for o in dirs if o != d)]
            if dirs:
                return exe, tag, dirs
    raise RuntimeError("no python3 interpreter found to put in the sample image")


@dataclass
class SampleImage:
    oci: Path
    layers: list[Layer]
    python: str
    blob_bytes: int = 0  # what the OCI layout's layer blobs weigh

    @property
    def file_bytes(self) -> int:
        return sum(layer.file_bytes for layer in self.layers)


def build_sample_image(dest: Path, site_packages: Path | None = None) -> SampleImage:
    """A small but real root filesystem as a 3-layer OCI layout at `dest`:
    base (gzip): /bin/sh, ls, cat + libraries; python (zstd): python3 + libraries + stdlib;
    app (plain tar): /app (hello.py and a slice of site-packages), /etc/fscached-demo-greeting."""
    base = Layer("base: sh, ls, cat", "gzip")
    # /bin/... as the command names them (on a merged-/usr host /bin -> usr/bin comes along)
    tools = [f"/bin/{t}" if os.path.exists(f"/bin/{t}") else shutil.which(t) or f"/bin/{t}"
             for t in ("sh", "ls", "cat")]
    for path in tools + shared_libraries([os.path.realpath(t) for t in tools]):
        base.add_host(path)
    for d, mode in (("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("root", 0o700)):
        base.add_dir(d, mode)
    base.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    base.add_file("etc/group", b"root:x:0:\n")

    exe, tag, stdlib_dirs = interpreter()
    python = Layer("python: python3 + stdlib", "zstd")
    real = python.add_host(exe)
    for path in shared_libraries([real]):
        python.add_host(path)

    def keep_stdlib(rel: str, name: str) -> bool:
        if rel == "" and (name in STDLIB_SKIP or name.startswith("config-")):
            return False
        if os.path.basename(rel) == "__pycache__":
            return name.endswith(f".{tag}.pyc")  # what start-up reads; not .opt-1/.opt-2
        return True

    for d in stdlib_dirs:
        python.add_host_tree(d, keep_stdlib)
    if not exe.startswith(("/usr/bin/", "/bin/")):
        python.add_symlink("usr/local/bin/python3", real)

    app = Layer("app: /app + site-packages slice", "")
    sp = site_packages or _site_packages()
    # pygments first (hello.py imports it), then other packages until the slice is full
    names = ["pygments"] + sorted(p.name for p in sp.iterdir()
                                  if p.is_dir() and p.name != "pygments" and "." not in p.name
                                  and not p.name.startswith("_"))
    for name in names:
        if app.file_bytes >= SITE_PACKAGES_SLICE:
            break
        if (sp / name).is_dir():
            app.add_host_tree(str(sp / name), lambda d, n: n != "__pycache__",
                              dest=f"/app/site-packages/{name}")
    app.add_file("app/hello.py", HELLO_PY.encode())
    app.add_file("etc/fscached-demo-greeting",
                 f"{GREETING} (built by fscached demo)\n".encode())

    layers = [base, python, app]
    write_oci_layout(dest, [(layer.tar(), layer.compression) for layer in layers], tag=TAG)
    image = SampleImage(dest, layers, real)
    index = json.loads((dest / "index.json").read_text())
    manifest = json.loads((dest / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    image.blob_bytes = sum(d["size"] for d in manifest["layers"])
    return image


def _site_packages() -> Path:
    import rich

    return Path(rich.__file__).parent.parent


# --------------------------------------------------------------------------- the daemon


class DaemonProcess:
    """The real `fscached` command as a subprocess (a session of its own)."""

    def __init__(self, work: Path, image: str) -> None:
        self.work = work
        self.cache_dir = work / "cache"
        self.ready = work / "fscached.ready"
        self.stats_file = work / "fscached.stats.json"
        self.log = work / "fscached.log"
        self.args = ["--backend", "auto", "--cache-dir", str(self.cache_dir),
                     "--work-dir", str(work / "state"), "--image", image,
                     "--ready-file", str(self.ready), "--stats-file", str(self.stats_file)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fscached.cli", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"fscached exited with {self.proc.returncode} before it was "
                                   f"ready:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fscached not ready within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def counters(self, timeout: float = 10) -> dict[str, int]:
        """SIGUSR1, then the stats file it writes."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"fscached exited with {self.proc.returncode}:\n{self.log_tail()}")
        before = self.stats_file.stat().st_mtime_ns if self.stats_file.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats_file.exists() and self.stats_file.stat().st_mtime_ns != before:
                try:
                    return json.loads(self.stats_file.read_text())
                except ValueError:
                    pass
            time.sleep(0.02)
        raise RuntimeError("fscached wrote no counters after SIGUSR1")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (the daemon unmounts and lets go of the fanotify group); kill on timeout."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory` (any filesystem type)."""
    found = []
    prefix = str(directory).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(directory) or point.startswith(prefix):
                found.append(point)
    return found


# --------------------------------------------------------------------------- display


class Steps:
    """The Rich step list: one line per step, a spinner while it runs, a tick when done. Not on
    a terminal (a log, a pipe) each step is printed as one line when it ends instead."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal and not console.is_dumb_terminal
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=34)),
            BarColumn(bar_width=12),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}", table_column=Column(overflow="fold")),
            console=console, disable=not self.live,
        )
        self.current: TaskID | None = None
        self._started = 0.0

    def __enter__(self) -> "Steps":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """End the display (the step list stays on screen); idempotent."""
        if self.current is not None:  # interrupted or failed mid-step
            self.progress.update(self.current, detail="[red]not finished[/]")
            self.progress.stop_task(self.current)
            if not self.live:
                self.console.print(f"[red]✗[/] {self.progress.tasks[self.current].description} "
                                   "[red]not finished[/]", highlight=False)
            self.current = None
        if self.progress.live.is_started:
            self.progress.stop()

    def start(self, description: str, total: float | None = None, detail: str = "") -> TaskID:
        self.current = self.progress.add_task(description, total=total, detail=detail)
        self._started = time.monotonic()
        return self.current

    def update(self, completed: float, detail: str | None = None) -> None:
        assert self.current is not None
        if detail is None:
            self.progress.update(self.current, completed=completed)
        else:
            self.progress.update(self.current, completed=completed, detail=detail)

    def done(self, detail: str = "") -> None:
        assert self.current is not None
        task = self.progress.tasks[self.current]
        total = task.total or 1
        self.progress.update(self.current, total=total, completed=total, detail=detail)
        if not self.live:
            self.console.print(f"[green]✓[/] {task.description} [dim]"
                               f"({time.monotonic() - self._started:.1f}s)[/] {detail}",
                               highlight=False, soft_wrap=True)
        self.current = None

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- the demo


def missing_for_online() -> str | None:
    """Why the lazy-serving part cannot run here (one line), or None."""
    if os.geteuid() != 0:
        return "not root: mounting an image needs CAP_SYS_ADMIN (run `make demo` as root)"
    for tool in ("chroot", "ldd"):
        if shutil.which(tool) is None:
            return f"no {tool} command (it is part of coreutils / libc-bin)"
    from fanotify.group import probe

    WORK_PARENT.mkdir(parents=True, exist_ok=True)
    reason = probe(WORK_PARENT)
    if reason:
        return f"no fanotify pre-content events: {reason}"
    if not RegistryRunner.available():
        return "docker-registry is not installed (Debian package docker-registry)"
    if shutil.which("skopeo") is None:
        return "skopeo is not installed (Debian package skopeo)"
    return None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "erofs_image.cli", *args],
                          capture_output=True, text=True)


@dataclass
class Run:
    """What the demo measured."""
    output: list[str] = field(default_factory=list)
    exit_code: int | None = None
    first_output: float | None = None
    seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)


def build_and_convert(steps: Steps, work: Path) -> tuple[SampleImage, Path, dict]:
    steps.start("build the sample image (3-layer OCI layout)")
    image = build_sample_image(work / "oci-src")
    steps.done(f"{sum(len(l.entries) for l in image.layers)} entries, {human(image.file_bytes)} "
               f"of files, {human(image.blob_bytes)} of layers")
    for layer in image.layers:
        steps.say(f"    layer [bold]{escape(layer.name)}[/] ({layer.compression or 'tar'}): "
                  f"{len(layer.entries)} entries, {human(layer.file_bytes)}")

    out = work / "converted"
    steps.say(f"  [dim]$ fscached-image convert {image.oci} {out}[/]")
    steps.start("convert to EROFS (bootstrap + zstd blobs)")
    r = _cli("convert", str(image.oci), str(out), "--no-progress")
    if r.returncode:
        raise RuntimeError(f"fscached-image convert failed:\n{r.stderr.strip()}")
    r = _cli("inspect", str(out / "image.boot"), "--json")
    if r.returncode:
        raise RuntimeError(f"fscached-image inspect failed:\n{r.stderr.strip()}")
    summary = json.loads(r.stdout)
    steps.done(f"{len(summary['blobs'])} blobs, {human(summary['compressed_bytes'])} stored, "
               f"bootstrap {human((out / 'image.boot').stat().st_size)}")
    return image, out, summary


def image_table(summary: dict, boot: Path) -> Table:
    table = Table(title="the converted image (fscached-image inspect)", title_justify="left")
    table.add_column("blob")
    table.add_column("chunks", justify="right")
    table.add_column("stored", justify="right")
    table.add_column("uncompressed", justify="right")
    for b in summary["blobs"]:
        table.add_row(b["blob_id"][:16] + "…", str(b["chunk_count"]), human(b["compressed_size"]),
                      human(b["uncompressed_size"]))
    table.add_row("bootstrap (metadata)", "", human(boot.stat().st_size), "", end_section=True)
    table.add_row(f"{summary['regular_files']} files", str(summary["chunk_refs"]),
                  human(summary["compressed_bytes"]), human(summary["uncompressed_bytes"]))
    return table


def offline(console: Console, steps: Steps, work: Path, why: str) -> int:
    image, out, summary = build_and_convert(steps, work)
    steps.start("read a file back from the blobs (fscached-image cat)")
    target = "/etc/fscached-demo-greeting"
    r = _cli("cat", str(out / "image.boot"), target, "--blobs", str(out / "blobs"))
    if r.returncode:
        raise RuntimeError(f"fscached-image cat failed:\n{r.stderr.strip()}")
    steps.done(f"{target}: {r.stdout.strip()!r}")
    steps.stop()
    console.print(image_table(summary, out / "image.boot"))
    console.print(f"[yellow]lazy serving skipped[/]: {escape(why)}", soft_wrap=True)
    console.print("[green]demo OK[/] (offline part only: build, convert, inspect)")
    return 0


def run_in_image(steps: Steps, daemon: DaemonProcess, mnt: Path, image_bytes: int) -> Run:
    run = Run()
    steps.say(f"  [dim]$ chroot {mnt} /bin/sh -c '{escape(COMMAND)}'[/]")
    steps.start("run a command from inside the image", total=image_bytes,
                detail="0 B fetched")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
    t0 = time.monotonic()
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    proc = subprocess.Popen([chroot, str(mnt), "/bin/sh", "-c", COMMAND], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put((time.monotonic(), line.rstrip("\n")))
        lines.put((time.monotonic(), None))

    threading.Thread(target=reader, daemon=True).start()
    try:
        finished = False
        last_poll = 0.0
        while not finished:
            try:
                when, line = lines.get(timeout=0.1)
                if line is None:
                    finished = True
                else:
                    if run.first_output is None:
                        run.first_output = when - t0
                    run.output.append(line)
                    steps.say(f"  [cyan]│[/] {escape(line)}")
            except queue.Empty:
                pass
            if time.monotonic() - t0 > 120:
                raise RuntimeError("the command in the image did not finish within 120 s")
            if time.monotonic() - last_poll > 0.25 and not finished:
                last_poll = time.monotonic()
                fetched = daemon.counters().get("fetched_bytes", 0)
                steps.update(completed=fetched, detail=f"{human(fetched)} fetched")
        run.exit_code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run.seconds = time.monotonic() - t0
    run.counters = daemon.counters()
    fetched = run.counters.get("fetched_bytes", 0)
    steps.update(completed=fetched)
    steps.done(f"exit {run.exit_code}, {human(fetched)} fetched")
    return run


def results_table(run: Run, image_bytes: int, boot_bytes: int, blobs: int) -> Table:
    c = run.counters
    fetched = c.get("fetched_bytes", 0)
    table = Table(title="lazily served: what the command needed vs what the image holds",
                  title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("image size (data blobs in the registry)", f"{image_bytes:,} B ({human(image_bytes)}, {blobs} blobs)")
    table.add_row("bytes fetched from the registry", f"{fetched:,} B ({human(fetched)})")
    table.add_row("share fetched", f"{100 * fetched / image_bytes:.1f} %" if image_bytes else "-")
    table.add_row("registry requests (ranged GETs)", str(c.get("fetches", 0)))
    table.add_row("kernel read events", f"{c.get('read', 0)} ({c.get('read_cached', 0)} already cached)")
    table.add_row("bootstrap pulled before mounting", f"{boot_bytes:,} B ({human(boot_bytes)})")
    first = f"{run.first_output:.3f} s" if run.first_output is not None else "-"
    table.add_row("time to first output (from chroot start)", first)
    table.add_row("command run time", f"{run.seconds:.3f} s")
    return table


def online(console: Console, steps: Steps, work: Path) -> int:
    image, out, summary = build_and_convert(steps, work)
    image_bytes = sum(f.stat().st_size for f in (out / "blobs").iterdir())
    boot_bytes = (out / "image.boot").stat().st_size

    steps.start("start docker-registry on loopback")
    registry = RegistryRunner(work / "registry")  # plain http, a session of its own
    daemon: DaemonProcess | None = None
    mnt = work / "mnt"
    try:
        registry.start()
        steps.done(registry.url)

        ref = f"{registry.host}/{REPO}:{TAG}"
        cmd = ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{out / 'oci'}:{TAG}", f"docker://{ref}"]
        steps.say(f"  [dim]$ {' '.join(cmd)}[/]")
        steps.start("push the converted image with skopeo")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise RuntimeError(f"skopeo copy failed:\n{r.stderr.strip()}")
        steps.done(f"{human(image_bytes + boot_bytes)} to {ref}")

        mnt.mkdir()
        daemon = DaemonProcess(work, f"fsid={FSID},ref={ref},scheme=http,mountpoint={mnt}")
        steps.say(f"  [dim]$ fscached {' '.join(daemon.args)}[/]")
        steps.start("start fscached: pull the bootstrap, mount the image")
        t0 = time.monotonic()
        daemon.start()
        steps.done(f"mounted after {time.monotonic() - t0:.2f}s, no blob byte fetched yet")

        run = run_in_image(steps, daemon, mnt, image_bytes)

        steps.start("stop fscached (unmount), stop the registry")
        code = daemon.stop()
        left = mounts_under(work)
        registry.stop()
        steps.done(f"fscached exit {code}; {'still mounted: ' + ', '.join(left) if left else 'nothing mounted'}")
    finally:
        with _shielded():  # a second Ctrl-C does not cut the clean-up short
            if daemon is not None:
                _stop_daemon(daemon, mnt)
            registry.stop()

    steps.stop()
    console.print(results_table(run, image_bytes, boot_bytes, len(summary["blobs"])))
    fetched = run.counters.get("fetched_bytes", 0)
    ok = (run.exit_code == 0 and any(GREETING in line for line in run.output)
          and 0 < fetched < image_bytes and not mounts_under(work))
    if ok:
        console.print(f"[green]demo OK[/]: the command ran from an image of {human(image_bytes)} "
                      f"after fetching {human(fetched)} ({100 * fetched / image_bytes:.1f} %) of it")
    else:
        console.print(f"[red]demo FAILED[/]: exit {run.exit_code}, {fetched} of {image_bytes} "
                      f"bytes fetched; daemon log:\n{escape(daemon.log_tail() if daemon else '')}",
                      soft_wrap=True)
    return 0 if ok else 1


def _stop_daemon(daemon: DaemonProcess, mnt: Path) -> None:
    """Whatever happened: no daemon, no mount, no keeper left behind."""
    from fscached import keeper

    daemon.stop()
    if str(mnt) in mounts_under(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
    keeper.dismiss(daemon.cache_dir / ".fscached" / "keeper.sock")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP ignored for a while (clean-up)."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = [signal.signal(sig, signal.SIG_IGN) for sig in signals]
    try:
        yield
    finally:
        for sig, handler in zip(signals, previous):
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=int(os.environ.get("COLUMNS", 110)))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    parser = argparse.ArgumentParser(prog="python -m fscached.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--offline", action="store_true",
                        help="only build, convert and inspect the sample image (no kernel, no registry)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    why = "asked for with --offline" if args.offline else missing_for_online()
    if why and not args.offline:
        console.print(f"[yellow]lazy serving is not possible here[/]: {escape(why)}", soft_wrap=True)
        console.print("running what can run without it: build, convert, inspect")
    WORK_PARENT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fscached-demo-", dir=WORK_PARENT))
    console.print(f"fscached demo, working in {work}")
    code = 1
    try:
        with Steps(console) as steps:
            code = offline(console, steps, work, why) if why else online(console, steps, work)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: cleaning up")
        code = 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        console.print(f"[red]demo failed[/]: {escape(str(exc))}", soft_wrap=True)
        code = 1
    finally:
        with _shielded():
            left = mounts_under(work)
            if left:
                console.print(f"[red]still mounted, {work} kept[/]: {', '.join(left)}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    console.print(f"cleaned up ({'nothing left' if not Path(work).exists() else 'see above'}); "
                  f"{time.monotonic() - t0:.1f}s in all")
    return code


if __name__ == "__main__":
    sys.exit(main())
