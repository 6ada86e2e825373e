"""A real workload image for the cold-start harness, built once per machine and cached.

    w = build_workload("small")            # or "full"; cached, see below
    w.oci, w.nydus                          # the plain OCI layout, `fscached-image convert`'s output
    w.command, w.expected_line              # ["python3", "/app/start.py"], its first output line
    w.check_output(lines)                   # ColdstartError unless the first line is the expected one
    push(w, "10.213.0.2:5000", "coldstart/small")   # <repo>:plain and <repo>:nydus, with skopeo

Three gzip layers, an ordinary OCI image:
- base: Debian bookworm, `debootstrap --variant=minbase --include=python3,ca-certificates`
  (apt's caches and lists removed, device nodes skipped: the runtime makes /dev);
- packages: PyPI wheels installed by the host's pip with `--target` into
  /usr/local/lib/python3.11/dist-packages (checked to be on bookworm's python3 sys.path),
  for CPython 3.11 on glibc 2.36 (manylinux_2_17 .. 2_36 wheels only);
- app: /app/start.py, which imports the packages and prints one line
  (`numpy 2.x.y sum=499500 ...`); the line is recorded at build time by running the image
  itself (an overlay of the three layers, chroot), and every run is checked against it.

Sizes: `small` and `demo` = numpy (make test), `full` = numpy, scipy, pandas, matplotlib,
pillow, sympy (the benchmark, several hundred MiB).

Cache: `$FSCACHED_WORKLOAD_CACHE` or /var/cache/fscached/workload, one directory per key
(size, packages, BUILD_VERSION): `oci/`, `nydus/` (bootstrap, blobs, oci/) and `workload.json`.
A build runs in `.tmp-<key>-<pid>` under a lock and is renamed into place once complete, with
`workload.json` written last, so an interrupted build is never reused; leftovers of dead
builders are removed (after unmounting whatever they left mounted inside).
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from erofs_image.oci import sha256_file
from coldstart import ColdstartError, one_line, pid_alive, run, unmount_under

BUILD_VERSION = "3"  # bump when the recipe changes (or the converter's output does): a new cache key, a new build
SUITE = "bookworm"
PYTHON = "3.11"  # bookworm's python3
DIST_PACKAGES = f"usr/local/lib/python{PYTHON}/dist-packages"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_CACHE = Path("/var/cache/fscached/workload")
TAG = "latest"  # the tag inside the OCI layouts
# glibc 2.36 (bookworm) runs every manylinux wheel up to 2_36; pip does not expand these itself
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)] + ["manylinux2014_x86_64"]

SIZES: dict[str, tuple[str, ...]] = {
    "small": ("numpy",),
    "demo": ("numpy",),
    "full": ("numpy", "scipy", "pandas", "matplotlib", "pillow", "sympy"),
}
COMMAND = ["python3", "/app/start.py"]
MARKER = "workload.json"

Progress = Callable[[str], None]


@dataclass
class Workload:
    size: str
    packages: list[str]
    key: str
    path: Path                 # the cache entry
    oci: Path                  # plain OCI layout (3 gzip layers), tag TAG
    nydus: Path                # fscached-image convert output: image.boot, blobs/, oci/
    layer_bytes: int           # sum of the gzip layers (what a classic pull downloads)
    uncompressed_bytes: int    # sum of the layer tars
    nydus_blob_bytes: int      # sum of the nydus data blobs
    bootstrap_bytes: int
    command: list[str]
    expected_line: str
    versions: dict[str, str] = field(default_factory=dict)
    reused: bool = False       # True when taken from the cache without building

    @property
    def bootstrap(self) -> Path:
        return self.nydus / "image.boot"

    def check_output(self, lines: Sequence[str], where: str = "workload") -> None:
        """ColdstartError unless the first line of `lines` is the expected one."""
        first = lines[0].strip() if lines else ""
        if first != self.expected_line:
            got = repr(first) if lines else "no output"
            raise ColdstartError(f"{where}: wrong output: expected {self.expected_line!r}, got {got}"
                                 + (f" (then: {one_line(' | '.join(lines[1:4]), 200)})" if len(lines) > 1 else ""))

    def to_json(self) -> str:
        doc = asdict(self)
        doc.pop("reused")
        for k in ("path", "oci", "nydus"):
            doc[k] = str(doc[k])
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path) -> Workload:
        doc = json.loads(text)
        doc["path"], doc["oci"], doc["nydus"] = path, path / "oci", path / "nydus"
        return cls(**doc, reused=True)


def cache_root() -> Path:
    return Path(os.environ.get("FSCACHED_WORKLOAD_CACHE") or DEFAULT_CACHE)


def cache_key(size: str, packages: Sequence[str]) -> str:
    text = json.dumps({"v": BUILD_VERSION, "suite": SUITE, "python": PYTHON, "size": size,
                       "packages": list(packages), "platforms": PLATFORMS}, sort_keys=True)
    return f"{size}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def packages_for(size: str) -> tuple[str, ...]:
    try:
        return SIZES[size]
    except KeyError:
        raise ColdstartError(f"workload size {size!r} is unknown (choose {', '.join(SIZES)})") from None


def build_workload(size: str = "small", *, progress: Progress | None = None,
                   cache: Path | None = None, mirror: str | None = None) -> Workload:
    """The workload of `size` from the cache, built first when missing (minutes: debootstrap,
    pip, gzip, convert). Safe against concurrent builders (a lock) and interrupted builds."""
    say = progress or (lambda _msg: None)
    packages = packages_for(size)
    root = cache or cache_root()
    key = cache_key(size, packages)
    entry = root / key
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        _remove_dead_builds(root, key)
        if (entry / MARKER).is_file():
            say(f"workload {key}: reusing {entry}")
            return Workload.from_json((entry / MARKER).read_text(), entry)
        if entry.exists():  # no marker: an incomplete entry (should not happen: renamed last)
            _remove_tree(entry)
        staging = root / f".tmp-{key}-{os.getpid()}"
        _remove_tree(staging)
        staging.mkdir()
        try:
            workload = _build(size, packages, key, staging, mirror or apt_mirror(), say)
            (staging / MARKER).write_text(_with_path(workload, entry).to_json())
            os.sync()
            staging.rename(entry)
        finally:
            _remove_tree(staging)
    say(f"workload {key}: built in {entry}")
    return _with_path(workload, entry)


def _with_path(w: Workload, entry: Path) -> Workload:
    w.path, w.oci, w.nydus = entry, entry / "oci", entry / "nydus"
    return w


class _locked:
    """An exclusive flock on `path` for the `with` block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    unmount_under(path)  # a killed debootstrap can leave /proc mounted inside its target
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise ColdstartError(f"cannot remove {path} (still mounted or busy?)")


def _remove_dead_builds(root: Path, key: str) -> None:
    for leftover in root.glob(f".tmp-{key}-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove_tree(leftover)


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (first `deb` URI), else deb.debian.org."""
    candidates: list[Path] = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        candidates += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for uri in _debian_uris(text, deb822=path.suffix == ".sources"):
            if "security" not in uri and "/debian" in uri:
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def _debian_uris(text: str, deb822: bool) -> Iterator[str]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if deb822 and line.lower().startswith("uris:"):
            yield from line.split(":", 1)[1].split()
        elif not deb822 and line.startswith("deb "):
            words = [w for w in line.split()[1:] if not w.startswith("[")]
            if words and "://" in words[0]:
                yield words[0]


# --------------------------------------------------------------------------- the build


def _build(size: str, packages: Sequence[str], key: str, work: Path, mirror: str,
           say: Progress) -> Workload:
    base, pkgs, app = work / "base", work / "packages", work / "app"
    say(f"debootstrap {SUITE} from {mirror} (about a minute)")
    _debootstrap(base, mirror)
    _check_python(base)
    say(f"pip install {' '.join(packages)} for CPython {PYTHON}")
    versions = _pip_install(pkgs / DIST_PACKAGES, packages)
    _write_app(app)
    say("check the image: run /app/start.py in an overlay of the three layers")
    expected = _first_line_in_chroot(work, [base, pkgs, app])
    say("write the OCI layout (3 gzip layers)")
    oci = work / "oci"
    sizes = write_layout(oci, [base, pkgs, app], work / "tars")
    say("fscached-image convert")
    nydus = work / "nydus"
    run([sys.executable, "-m", "erofs_image.cli", "convert", str(oci), str(nydus), "-q"],
        "fscached-image convert", timeout=3600)
    for d in (base, pkgs, app, work / "tars"):
        _remove_tree(d)
    blob_bytes = sum(p.stat().st_size for p in (nydus / "blobs").iterdir())
    return Workload(size=size, packages=list(packages), key=key, path=work, oci=oci, nydus=nydus,
                    layer_bytes=sizes[0], uncompressed_bytes=sizes[1], nydus_blob_bytes=blob_bytes,
                    bootstrap_bytes=(nydus / "image.boot").stat().st_size, command=list(COMMAND),
                    expected_line=expected, versions=versions)


def _debootstrap(target: Path, mirror: str) -> None:
    try:
        run(["debootstrap", "--variant=minbase", "--include=python3,ca-certificates", SUITE,
             str(target), mirror], f"debootstrap {SUITE} from {mirror}", timeout=1800)
    finally:
        unmount_under(target)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (target / junk).glob("*"):
            if p.is_file() and p.name not in ("lock",):
                p.unlink()


def _check_python(rootfs: Path) -> None:
    out = run(["chroot", str(rootfs), "/usr/bin/python3", "-c",
               "import sys; print('%d.%d' % sys.version_info[:2]); print('\\n'.join(sys.path))"],
              "python3 in the debootstrapped rootfs", timeout=60)
    version, *path = out.splitlines()
    if version != PYTHON:
        raise ColdstartError(f"{SUITE}'s python3 is {version}, not {PYTHON}: update PYTHON in workload.py")
    if "/" + DIST_PACKAGES not in path:
        raise ColdstartError(f"/{DIST_PACKAGES} is not on {SUITE}'s python3 sys.path ({path})")


def _pip_install(target: Path, packages: Sequence[str]) -> dict[str, str]:
    target.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--target", str(target), "--python-version", PYTHON, "--implementation", "cp",
           "--only-binary=:all:"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    run(cmd + list(packages), f"pip install {' '.join(packages)}", timeout=1800)
    for p in target.glob("*.dist-info/direct_url.json"):
        p.unlink()  # names the host's pip cache paths; not part of the image
    return _installed_versions(target)


def _installed_versions(target: Path) -> dict[str, str]:
    versions = {}
    for d in target.glob("*.dist-info"):
        name, _, version = d.name[:-len(".dist-info")].partition("-")
        versions[name.lower().replace("_", "-")] = version
    return versions


# What the container runs: issue 10's `import numpy; print(...)`. The other packages of the
# larger sizes are the bulk of a real image that start-up never reads.
START_PY = '''\
"""fscached cold-start workload: import numpy, print one line computed with it."""
import numpy

total = int(numpy.arange(1000).sum())
print(f"numpy {numpy.__version__} sum={total}", flush=True)
'''


def _write_app(app: Path) -> None:
    (app / "app").mkdir(parents=True)
    (app / "app" / "start.py").write_text(START_PY)


def _first_line_in_chroot(work: Path, layers: list[Path]) -> str:
    """Run the command in a writable overlay of the layers (as a container would: the upper dir
    is thrown away), its first line."""
    mnt, upper, scratch = work / "check", work / "check-upper", work / "check-work"
    for d in (mnt, upper, scratch):
        d.mkdir()
    lower = ":".join(str(p) for p in reversed(layers))
    run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={scratch}",
         str(mnt)], "overlay of the workload's layers")
    try:
        out = run([shutil.which("chroot") or "/usr/sbin/chroot", str(mnt), *COMMAND], "the workload's command in a chroot", timeout=300,
                  env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root",
                       "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        unmount_under(mnt)
        for d in (mnt, upper, scratch):
            _remove_tree(d)
    lines = out.splitlines()
    if not lines or not lines[0].startswith("numpy "):
        raise ColdstartError(f"the workload's command printed {one_line(out, 200)!r}, not 'numpy ...'")
    return lines[0].strip()


# --------------------------------------------------------------------------- OCI layout


def _tar_filter(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if ti.ischr() or ti.isblk() or ti.isfifo():
        return None  # device nodes and fifos: the runtime provides /dev
    ti.uname = ti.gname = ""
    return ti


def _write_tar(src: Path, dest: Path) -> None:
    """A tar of the directory `src` (its content at the root), ownership, modes, symlinks and
    hard links kept, entries sorted."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(os.listdir(src)):
            tf.add(src / name, arcname=name, filter=_tar_filter)


def _put_blob(blobs: Path, path: Path) -> tuple[str, int]:
    hexd, size = sha256_file(path)
    os.replace(path, blobs / hexd)
    return "sha256:" + hexd, size


def _put_bytes(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest[7:]).write_bytes(data)
    return digest, len(data)


def write_layout(dest: Path, layer_dirs: list[Path], scratch: Path) -> tuple[int, int]:
    """An OCI image layout at `dest` with one gzip layer per directory (bottom first), tag TAG.
    Returns (compressed, uncompressed) layer bytes."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    scratch.mkdir(exist_ok=True)
    descs, diff_ids = [], []
    compressed = uncompressed = 0
    for n, src in enumerate(layer_dirs):
        raw, gz = scratch / f"layer{n}.tar", scratch / f"layer{n}.tar.gz"
        _write_tar(src, raw)
        diff_ids.append("sha256:" + sha256_file(raw)[0])
        uncompressed += raw.stat().st_size
        with open(raw, "rb") as fin, open(gz, "wb") as fout:
            with gzip.GzipFile(fileobj=fout, mode="wb", compresslevel=6, mtime=0) as z:
                shutil.copyfileobj(fin, z, 1 << 20)
        raw.unlink()
        digest, size = _put_blob(blobs, gz)
        compressed += size
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": digest, "size": size})
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                         "Cmd": list(COMMAND), "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created_by": f"fscached coldstart workload: {d.name}"} for d in layer_dirs]}
    cdigest, csize = _put_bytes(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cdigest, "size": csize},
                "layers": descs}
    mdigest, msize = _put_bytes(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": mdigest, "size": msize,
                            "annotations": {"org.opencontainers.image.ref.name": TAG}}]}
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return compressed, uncompressed


# --------------------------------------------------------------------------- pushing


def push(workload: Workload, registry_host: str, repo: str, *, timeout: float = 1800) -> tuple[str, str]:
    """skopeo copy both forms to a plain-http registry: `<host>/<repo>:plain` (the OCI image)
    and `<host>/<repo>:nydus` (the converted one). Returns the two references."""
    plain, nydus = f"{registry_host}/{repo}:plain", f"{registry_host}/{repo}:nydus"
    for layout, ref in ((workload.oci, plain), (workload.nydus / "oci", nydus)):
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{TAG}",
             f"docker://{ref}"], f"skopeo copy {layout} to {ref}", timeout=timeout)
    return plain, nydus


def main(argv: list[str] | None = None) -> int:
    """`python -m coldstart.workload [SIZE]`: build (or find) the workload, print it."""
    args = sys.argv[1:] if argv is None else argv
    try:
        w = build_workload(args[0] if args else "small", progress=lambda m: print(m, file=sys.stderr))
    except ColdstartError as exc:
        print(f"workload: error: {exc}", file=sys.stderr)
        return 1
    print(w.to_json(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
