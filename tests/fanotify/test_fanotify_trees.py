"""Real trees through the real `fscached` CLI on the host kernel's fanotify path.

The scenarios the VM tests run for cachefiles (vm-tests/test_vm_daemon.py with
vm-tests/scenarios/serve_images.py), here natively: file-backed EROFS mounts whose blob devices
are sparse cache files filled on FAN_PRE_ACCESS events. Trees, manifests and the mount-vs-manifest
comparison are the VM tests' own (vm-tests/trees.py, serve_images.describe/verify/concurrent).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import zstandard

from daemon_proc import REPO, WORK_ROOT, FscachedProcess, drop_caches

VM_TESTS = REPO / "vm-tests"
if str(VM_TESTS) not in sys.path:
    sys.path.insert(0, str(VM_TESTS))

from ocilayout import layer_tar, write_layout  # noqa: E402
import scenarios.serve_images  # noqa: E402
from trees import SITE_PACKAGES, convert, make_real_tree, manifest, whole_second_mtimes  # noqa: E402

from erofs_image.reader import Bootstrap  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

NYDUS_FIXTURE = REPO.parent / "shared" / "fixtures" / "nydus-rafs-v6"
if not NYDUS_FIXTURE.is_dir():
    NYDUS_FIXTURE = Path("/work/shared/fixtures/nydus-rafs-v6")
NYDUS_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


READ_SECONDS = 120  # reading a whole tree takes a few seconds: longer is a hung daemon

_CHILD = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from scenarios import serve_images
name, args = sys.argv[2], json.loads(sys.argv[3])
print(json.dumps(getattr(serve_images, name)(Path(args[0]), *args[1:])))
"""


# ------------------------------------------------------------------------------------ helpers
def in_child(daemon: FscachedProcess, name: str, *args: Any) -> Any:
    """serve_images.<name>(*args) in a child process: a reader blocked on a hung daemon is
    killed after READ_SECONDS (SIGKILL ends even a killable wait) and the test fails, telling
    what the daemon said, instead of hanging with the mount and the daemon left behind."""
    assert hasattr(scenarios.serve_images, name)
    cmd = [sys.executable, "-c", _CHILD, str(VM_TESTS), name, json.dumps([str(a) if isinstance(a, Path) else a
                                                                        for a in args])]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=READ_SECONDS, cwd=REPO)
    except subprocess.TimeoutExpired:
        try:
            stats: Any = daemon.counters()
        except AssertionError as exc:
            stats = f"(no counters: {exc})"
        pytest.fail(f"{name}{args}: readers still blocked after {READ_SECONDS} s; daemon alive: "
                    f"{daemon.proc is not None and daemon.proc.poll() is None}; counters {stats}\n"
                    f"--- daemon log ---\n{daemon.log_text()[-4000:]}")
    assert r.returncode == 0, f"{name}{args}: {r.stderr[-4000:]}\n--- daemon log ---\n{daemon.log_text()[-4000:]}"
    return json.loads(r.stdout)


def counter(stats: dict[str, int], key: str) -> int:
    return int(stats.get(key, 0))


def assert_served(stats: dict[str, int]) -> None:
    """No reader saw EIO, no chunk failed its digest, no event was lost."""
    assert counter(stats, "read_failed") == 0, stats
    assert counter(stats, "verify_failures") == 0, stats
    assert counter(stats, "event_overflow") == 0, stats
    assert counter(stats, "read_unknown_object") == 0, stats


def assert_tree(mount: Path, source: Path, manifest_path: str, daemon: FscachedProcess) -> int:
    """Every entry of the source under the mount: sha256 and metadata (mode, uid, gid, size,
    mtime, xattrs, symlink target, rdev) equal, nothing missing or extra; hard links one inode
    with the source's link count. Returns how many entries were checked."""
    entries = json.loads(Path(manifest_path).read_text())
    result = in_child(daemon, "verify", mount, manifest_path)
    context = f"{result}\n--- daemon log ---\n{daemon.log_text()[-4000:]}"
    assert not result["missing"] and not result["extra"] and not result["mismatches"], context
    assert result["hardlinks_ok"], context
    assert result["checked"] == len(entries["entries"]), context
    for group in entries["hardlinks"]:
        for rel in group:
            want = os.lstat(source / rel.lstrip("/")).st_nlink
            got = os.lstat(mount / rel.lstrip("/")).st_nlink
            assert got == want, f"{rel}: nlink {got} through the mount, {want} in the source"
    return result["checked"]


def image_spec(fsid: str, built: Path, mountpoint: Path, domain: str | None = None) -> str:
    spec = f"fsid={fsid},bootstrap={built / 'image.boot'},blobs={built / 'blobs'},mountpoint={mountpoint}"
    return spec + (f",domain={domain}" if domain else "")


def blob_ids(built: Path) -> list[str]:
    return [b.blob_id for b in Bootstrap.open(built / "image.boot").blobs]


def filtered_manifest(tree: Path, out: Path, drop_top: set[str]) -> str:
    """manifest() of `tree` without the top-level entries named in `drop_top`."""
    data = json.loads(Path(manifest(tree, out)).read_text())

    def kept(rel: str) -> bool:
        return rel.split("/")[1] not in drop_top

    data["entries"] = {k: v for k, v in data["entries"].items() if kept(k)}
    data["hardlinks"] = [[p for p in g if kept(p)] for g in data["hardlinks"]]
    data["hardlinks"] = [g for g in data["hardlinks"] if len(g) > 1]
    out.write_text(json.dumps(data))
    return str(out)


def add_edge_files(root: Path) -> None:
    """What make_real_tree lacks: empty files, holes, long zero runs, more hard links."""
    extra = root / "extra"
    extra.mkdir(exist_ok=True)
    (extra / "empty").write_bytes(b"")
    os.link(extra / "empty", extra / "empty-link")
    with open(extra / "holes.bin", "wb") as f:  # sparse: holes between and after data
        f.write(b"head")
        f.seek(1 << 20)
        f.write(os.urandom(5000))
        f.seek((5 << 20) + 123)
        f.write(b"tail")
        f.truncate((7 << 20) + 1)
    (extra / "zeros.bin").write_bytes(bytes((2 << 20) + 5))
    (extra / "three.txt").write_text("three names, one inode\n" * 100)
    os.link(extra / "three.txt", extra / "three-b.txt")
    os.link(extra / "three.txt", root / "pip" / "three-c.txt")
    os.symlink("big.bin", extra / "relative-link")
    os.symlink("/nonexistent/absolute/target", extra / "dangling-link")
    whole_second_mtimes(root)


def push_layout(registry: Any, oci: Path, repo: str, tag: str = "v1") -> str:
    index = json.loads((oci / "index.json").read_text())
    layout_tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    ref = f"{registry.host}/{repo}:{tag}"
    r = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{oci}:{layout_tag}", f"docker://{ref}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return ref


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def real(fanotify_host: None) -> Iterator[dict[str, Any]]:
    """The VM tests' real tree (a few thousand site-packages files plus odd metadata) plus edge
    files, its manifest, and the tree converted uncompressed and with zstd."""
    base = Path(tempfile.mkdtemp(prefix="fsc-trees-", dir=WORK_ROOT))
    try:
        tree = make_real_tree(base / "tree")
        add_edge_files(tree)
        built = {"none": convert(tree, base / "none", "none"),
                 "zstd": convert(tree, base / "zstd", "zstd", chunk_size="256K")}
        m = manifest(tree, base / "real.json")
        data = json.loads(Path(m).read_text())
        assert len(data["entries"]) >= 2000 and len(data["hardlinks"]) >= 3  # test premise
        for rel in ("/extra/empty", "/extra/holes.bin", "/extra/zeros.bin", "/extra/big.bin"):
            assert "sha256" in data["entries"][rel], rel
        assert data["entries"]["/extra/link-to-pip"]["target"] == "../pip/__init__.py"
        yield {"tree": tree, "manifest": m, "built": built}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_real_tree_byte_exact_with_metadata(real: dict[str, Any], fanotify_work: Path,
                                            fscached_daemons: Callable[..., FscachedProcess],
                                            compressor: str) -> None:
    mnt = fanotify_work / "mnt"
    daemon = fscached_daemons(fanotify_work / "cache", [image_spec("real", real["built"][compressor], mnt)])
    drop_caches()
    checked = assert_tree(mnt, real["tree"], real["manifest"], daemon)
    assert checked >= 2000
    stats = daemon.counters()
    assert_served(stats)
    assert counter(stats, "read") > 0 and counter(stats, "fetched_bytes") > 0, stats
    assert any(k.startswith("source:local ") and k.endswith(":ok") for k in stats), stats
    assert daemon.stop() == 0, daemon.log_text()
    assert str(mnt) not in _erofs_mounts(), "a clean stop unmounts what the daemon mounted"


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_real_tree_from_registry(real: dict[str, Any], fanotify_work: Path, registry: Any,
                                 fscached_daemons: Callable[..., FscachedProcess],
                                 request: pytest.FixtureRequest, compressor: str) -> None:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo not installed (make deps installs it)")
    repo = "fanotify-trees/t" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    ref = push_layout(registry, real["built"][compressor] / "oci", repo)
    mnt = fanotify_work / "mnt"
    daemon = fscached_daemons(fanotify_work / "cache", [f"fsid=reg,ref={ref},scheme=http,mountpoint={mnt}"])
    drop_caches()
    assert_tree(mnt, real["tree"], real["manifest"], daemon)
    stats = daemon.counters()
    assert_served(stats)
    assert counter(stats, "fetched_bytes") > 0, stats
    ok = {k: v for k, v in stats.items() if k.startswith("source:") and k.endswith(":ok")}
    assert ok and all(k.startswith(f"source:registry {registry.host}/{repo}") for k in ok), stats
    assert sum(ok.values()) > 0
    assert daemon.stop() == 0, daemon.log_text()


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_remount_from_filled_cache_fetches_nothing(real: dict[str, Any], fanotify_work: Path,
                                                   fscached_daemons: Callable[..., FscachedProcess],
                                                   compressor: str) -> None:
    mnt = fanotify_work / "mnt"
    cache = fanotify_work / "cache"
    images = [image_spec("real", real["built"][compressor], mnt)]
    first = fscached_daemons(cache, images)
    drop_caches()
    assert_tree(mnt, real["tree"], real["manifest"], first)
    assert first.stop() == 0, first.log_text()
    before = first.final_counters()
    assert_served(before)
    assert counter(before, "fetches") > 0, before
    assert str(mnt) not in _erofs_mounts()

    second = fscached_daemons(cache, images)
    drop_caches()
    assert_tree(mnt, real["tree"], real["manifest"], second)
    after = second.counters()
    assert_served(after)
    assert counter(after, "fetches") == 0 and counter(after, "fetched_bytes") == 0, after
    # after a clean stop the filled state is the stop's record (the files were fsynced first)
    assert counter(after, "trusted_chunks") > 0 and counter(after, "reverified_chunks") == 0, after
    assert second.stop() == 0, second.log_text()

    # after a kill -9 there is no record: every chunk is checked against its digest instead
    # (the killed daemon's keeper and mount are taken down, so the next start is a fresh one)
    third = fscached_daemons(cache, images)
    third.kill()
    from fscached.frontends.fanotify import keeper

    keeper.dismiss(cache / ".fscached" / "keeper.sock")
    subprocess.run(["umount", "-l", str(mnt)], check=True)
    fourth = fscached_daemons(cache, images)
    drop_caches()
    assert_tree(mnt, real["tree"], real["manifest"], fourth)
    after_crash = fourth.counters()
    assert counter(after_crash, "fetches") == 0, after_crash
    assert counter(after_crash, "trusted_chunks") == 0 and counter(after_crash, "reverified_chunks") > 0, after_crash
    assert fourth.stop() == 0, fourth.log_text()


def test_two_images_share_a_blob_in_one_domain(fanotify_work: Path,
                                               fscached_daemons: Callable[..., FscachedProcess]) -> None:
    src = fanotify_work / "src"
    src.mkdir()
    shutil.copytree(SITE_PACKAGES / "_pytest", src / "common", symlinks=True)
    for name in ("a-only", "b-only"):
        (src / name / "sub").mkdir(parents=True)
        (src / name / "sub" / "data.bin").write_bytes(os.urandom((1 << 20) + 777))
        (src / name / "note.txt").write_text(f"only in {name}\n" * 500)
    whole_second_mtimes(src)
    common = layer_tar(src, include={"common"})  # the same bytes: the first layer of both images
    built_a = convert(write_layout(fanotify_work / "oci-a", [common, layer_tar(src, include={"a-only"})]),
                      fanotify_work / "a", "zstd")
    built_b = convert(write_layout(fanotify_work / "oci-b", [common, layer_tar(src, include={"b-only"})]),
                      fanotify_work / "b", "zstd")
    ids_a, ids_b = blob_ids(built_a), blob_ids(built_b)
    shared = set(ids_a) & set(ids_b)
    assert len(shared) == 1 and ids_a[0] == ids_b[0], (ids_a, ids_b)  # test premise
    assert len(set(ids_a) | set(ids_b)) == 3, (ids_a, ids_b)

    mnt_a, mnt_b = fanotify_work / "mnt-a", fanotify_work / "mnt-b"
    cache = fanotify_work / "cache"
    daemon = fscached_daemons(cache, [image_spec("img-a", built_a, mnt_a, "shared"),
                                      image_spec("img-b", built_b, mnt_b, "shared")])
    drop_caches()
    assert_tree(mnt_a, src, filtered_manifest(src, fanotify_work / "a.json", {"b-only"}), daemon)
    assert_tree(mnt_b, src, filtered_manifest(src, fanotify_work / "b.json", {"a-only"}), daemon)
    stats = daemon.counters()
    assert_served(stats)
    # one cache file per blob of the domain: the shared blob once, nothing per fsid
    assert sorted(p.name for p in (cache / "blobs").iterdir()) == ["shared"]
    files = sorted(p.name for p in (cache / "blobs" / "shared").iterdir())
    assert files == sorted(set(ids_a) | set(ids_b)), files
    # and it was fetched once: no more bytes than the three blobs hold
    sizes = {i: (d / "blobs" / i).stat().st_size for d, ids in ((built_a, ids_a), (built_b, ids_b)) for i in ids}
    on_disk = sum(sizes.values())
    assert 0 < counter(stats, "fetched_bytes") <= on_disk, (stats, on_disk)
    assert daemon.stop() == 0, daemon.log_text()


def test_sixteen_concurrent_readers_on_a_cold_mount(fanotify_work: Path,
                                                    fscached_daemons: Callable[..., FscachedProcess]) -> None:
    tree = fanotify_work / "tree"
    shutil.copytree(SITE_PACKAGES / "pip", tree / "pip", symlinks=True)
    (tree / "big").mkdir()
    for i in range(4):
        (tree / "big" / f"f{i}.bin").write_bytes(os.urandom((3 << 20) + 1000 * i))
    whole_second_mtimes(tree)
    built = convert(tree, fanotify_work / "built", "zstd", chunk_size="256K")
    m = manifest(tree, fanotify_work / "m.json")
    n_files = sum(1 for e in json.loads(Path(m).read_text())["entries"].values() if "sha256" in e)
    mnt = fanotify_work / "mnt"
    daemon = fscached_daemons(fanotify_work / "cache", [image_spec("conc", built, mnt)])
    drop_caches()
    # every thread reads every file, each starting at a different place: different files at
    # first, then the same ones, all on a cold mount
    result = in_child(daemon, "concurrent", mnt, m, 16)
    stats = daemon.counters()
    assert result["error_count"] == 0, (result, stats, daemon.log_text()[-4000:])
    assert result["reads"] == 16 * n_files, result
    assert_served(stats)
    assert counter(stats, "read") > 0 and counter(stats, "fetched_bytes") > 0, stats
    assert_tree(mnt, tree, m, daemon)
    assert daemon.stop() == 0, daemon.log_text()


def _nydus_fixture_files() -> dict[str, bytes]:
    """The fixture's two files, decoded straight from its blob at the offsets erofs-format.md
    documents (zstd chunks), without the project's reader."""
    raw = (NYDUS_FIXTURE / NYDUS_BLOB).read_bytes()
    dec = zstandard.ZstdDecompressor()
    files = {"lib.rs": dec.decompress(raw[0:4828], max_output_size=16931),
             "sync_io.rs": dec.decompress(raw[4828:7802], max_output_size=13400)}
    assert {k: len(v) for k, v in files.items()} == {"lib.rs": 16931, "sync_io.rs": 13400}
    return files


def test_nydus_built_fixture_through_fanotify(fanotify_work: Path,
                                              fscached_daemons: Callable[..., FscachedProcess]) -> None:
    assert (NYDUS_FIXTURE / "rafs-v6-2.2.boot").exists(), f"the nydus-built fixture is missing from {NYDUS_FIXTURE}"
    want = _nydus_fixture_files()
    mnt = fanotify_work / "mnt"
    daemon = fscached_daemons(fanotify_work / "cache", [
        f"fsid=nydus,bootstrap={NYDUS_FIXTURE / 'rafs-v6-2.2.boot'},blobs={NYDUS_FIXTURE},mountpoint={mnt}"])
    drop_caches()
    assert sorted(os.listdir(mnt)) == ["lib.rs", "sync_io.rs"]
    for name, data in want.items():
        got = in_child(daemon, "sha256_file", mnt / name)
        assert data.startswith(b"// Copyright (C) 2020 Alibaba Cloud. All rights re"), name
        assert got == hashlib.sha256(data).hexdigest(), f"{name}: wrong bytes through the mount"
    stats = daemon.counters()
    assert_served(stats)
    assert counter(stats, "fetched_bytes") > 0, stats
    assert (fanotify_work / "cache" / "blobs" / "nydus" / NYDUS_BLOB).stat().st_size == 36864
    assert daemon.stop() == 0, daemon.log_text()


def test_backend_auto_picks_fanotify(fanotify_work: Path,
                                     fscached_daemons: Callable[..., FscachedProcess]) -> None:
    tree = fanotify_work / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_bytes(b"hello through auto\n" * 1000)
    built = convert(tree, fanotify_work / "built", "zstd")
    mnt = fanotify_work / "mnt"
    daemon = fscached_daemons(fanotify_work / "cache", [image_spec("auto", built, mnt)], backend="auto")
    log = daemon.log_text()
    assert re.search(r"kernel path: fanotify \(", log), log
    assert "through fanotify" in log, log
    drop_caches()
    assert in_child(daemon, "sha256_file", mnt / "hello.txt") == hashlib.sha256(b"hello through auto\n" * 1000).hexdigest()
    stats = daemon.counters()
    assert_served(stats)
    assert counter(stats, "read") > 0, stats
    assert daemon.stop() == 0, daemon.log_text()


def _erofs_mounts() -> dict[str, str]:
    from fscached.util import mounts

    return mounts.erofs_mounts()
