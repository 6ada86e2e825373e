"""fscached's `nydusd singleton` under the REAL nydus-snapshotter's fscache driver (cachefiles
on-demand), in the 6.12 and 6.1 guests: containerd 1.6 + containerd-nydus-grpc v0.15.15
(`fs_driver = "fscache"`, `recover_policy = "failover"`) + nerdctl, nydus images converted by
fscached-image in a docker-registry in the guest (scenarios/snapshotter_fscache.py).

One boot per kernel (module fixture `guest_run`) runs every phase; each test asserts one:
  - the start: the one `nydusd singleton` the snapshotter runs, its command line, RUNNING;
  - nerdctl pull and run: the containers' output (exact bytes, sha256), lazily fetched, what
    the snapshotter shows (nerdctl images, ctr snapshots, its own fsid= EROFS mount);
  - kill -9 of nydusd under a container streaming a cold file: the snapshotter's failover (a
    new process, the state and the device back through its supervisor), no error, the right
    sha256; then killed again, and its successor killed in the middle of its takeover;
  - the snapshotter restarted under a running container (it reconnects to the live daemon);
  - the snapshotter restarted with a "new build" of nydusd (another Git Commit): its hot
    upgrade under a running container;
  - a shared domain (`domain_id` in the nydusd config): `domain_id=,fsid=` mounts and unbinds;
  - nerdctl rmi: the snapshotter's unbind, umount and cull, no mount left, the daemon empty.
What the snapshotter sent is read from fscached's own API log (its debug lines).

The images are built on the host (Debian's busybox-static, random data, fscached-image, skopeo
into a docker-registry whose storage the guest copies and serves). Guest times are emulated
(TCG): they are printed, not asserted.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from coldstart.readme import (FSCACHE_JSON, FSCACHE_TOML, MACHINE_DAEMON_KEYS, MACHINE_KEYS, block_starting, flatten,
                              snapshotter_setup)
from coldstart.snapshotter import container_stderr
from vmharness import run_scenario

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.vm

MIB = 1 << 20
REPO_REF = "fsn/app:nydus"
DOMAIN_REF = "fsn/other:nydus"  # the second image, bound in a shared domain
DOMAIN = "fsn-domain"
HELLO = b"hello from fscached under nydus-snapshotter's fscache driver\n"
OTHER_HELLO = b"hello from the shared domain\n"
SIZES_MIB = {"small": 1, "big": 64, "again": 32, "slow": 16, "upgrade": 16}
# blob order is name order: each cold file comes right after one read before it, so the
# read-ahead at a file's end never fetches the next test's file
FILES = {"hello": "/etc/hello", "upgrade": "/data/a-upgrade", "slow": "/data/b-slow", "again": "/data/c-again",
         "big": "/data/d-big", "small": "/data/e-small"}
OTHER_FILES = {"hello": "/etc/hello", "data": "/data/other"}
APPLETS = ("sh", "cat", "sleep", "sha256sum", "dd", "touch", "echo", "true")


@dataclass
class BuiltImage:
    storage: Path  # a docker-registry storage directory holding REPO_REF and DOMAIN_REF
    blob: str  # REPO_REF's one data blob's digest
    blob_size: int
    digests: dict[str, str]  # file key -> sha256
    other_digests: dict[str, str]  # DOMAIN_REF's


def build_images(work: Path) -> BuiltImage:
    """The test images, pushed into a registry (stopped again) whose storage is under `work`."""
    from coldstart.busybox import busybox_rootfs
    from coldstart.registry import RegistryRunner
    from coldstart.snapshotter import push_nydus_image

    rng = random.Random(20261208)
    data = {"hello": HELLO, **{key: rng.randbytes(mib * MIB) for key, mib in SIZES_MIB.items()}}
    other = {"hello": OTHER_HELLO, "data": rng.randbytes(3 * MIB)}
    rootfs = busybox_rootfs(work / "rootfs", {FILES[k].lstrip("/"): v for k, v in data.items()}, applets=APPLETS)
    rootfs2 = busybox_rootfs(work / "rootfs2", {OTHER_FILES[k].lstrip("/"): v for k, v in other.items()},
                             applets=APPLETS)
    with RegistryRunner(work / "reg") as reg:
        image = push_nydus_image(rootfs, work / "out", f"{reg.host}/{REPO_REF}")
        push_nydus_image(rootfs2, work / "out2", f"{reg.host}/{DOMAIN_REF}")
    shutil.rmtree(rootfs)
    shutil.rmtree(rootfs2)
    if len(image.blobs) != 1:
        raise RuntimeError(f"fscached-image made {len(image.blobs)} data blobs of the test image, not one")
    (blob, size), = image.blobs.items()
    return BuiltImage(work / "reg" / "storage", blob, size,
                      {k: hashlib.sha256(v).hexdigest() for k, v in data.items()},
                      {k: hashlib.sha256(v).hexdigest() for k, v in other.items()})


def run_guest(kernel: Any, built: BuiltImage, phases: list[str] | None = None, keep: Path | None = None) -> Any:
    """One boot of `kernel` running the scenario's phases (all by default): its VmResult."""
    args: dict[str, Any] = {
        "registry_storage": str(built.storage), "repo": REPO_REF, "blob": built.blob, "files": FILES,
        "sizes_mib": {k: v for k, v in SIZES_MIB.items() if k != "small"},
        "domain": {"repo": DOMAIN_REF, "domain_id": DOMAIN, "files": OTHER_FILES},
        "snapshotter": snapshotter_setup(FSCACHE_TOML, FSCACHE_JSON)}
    if phases:
        args["phases"] = phases
    return run_scenario(kernel, "snapshotter_fscache", args, timeout=2400, share=[built.storage],
                        scratch_size="3G", memory_mb=3072, extra_qemu_args=["-cpu", "max"], keep_dir=keep)


@pytest.fixture(scope="session")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The test images pushed into a registry on the host; the guest serves a copy of its storage."""
    from coldstart import ColdstartError

    try:
        return build_images(tmp_path_factory.mktemp("snapimg"))
    except (ColdstartError, RuntimeError) as exc:
        pytest.fail(f"building the test images: {exc}")


@pytest.fixture(scope="module")
def guest_run(vm_kernel: Any, built_image: BuiltImage) -> Iterator[dict[str, Any]]:
    from coldstart.peers import PeerError, binary

    for peer in ("containerd-nydus-grpc", "nerdctl"):
        try:
            binary(peer)
        except PeerError as exc:
            pytest.fail(str(exc))
    nydusd = Path(sys.executable).parent / "nydusd"
    assert nydusd.exists(), f"{nydusd}: the nydusd console script is not installed in this venv"
    phases = os.environ.get("FSCACHED_SNAPSHOTTER_PHASES")  # a subset, for debugging: the other tests fail
    keep = os.environ.get("FSCACHED_SNAPSHOTTER_KEEP")  # a directory: the console and the scratch disk
    res = run_guest(vm_kernel, built_image, phases.split(",") if phases else None,
                    Path(keep) / vm_kernel.series if keep else None)
    out = res.result
    out["_duration"] = res.duration
    if os.environ.get("FSCACHED_SNAPSHOTTER_RESULT"):  # the whole guest result, for a closer look
        Path(os.environ["FSCACHED_SNAPSHOTTER_RESULT"]).write_text(json.dumps(out, indent=1))
    print(f"\n[{vm_kernel.series}] guest boot {res.duration:.0f} s (TCG); phases (s): {out.get('seconds')}")
    yield out


def phase(out: dict[str, Any], name: str) -> dict[str, Any]:
    """The result of one phase; the test fails with the guest's error and logs when it did not run."""
    if name in out.get("phases", {}):
        return dict(out["phases"][name])
    err = out.get("error") or {}
    pytest.fail(f"phase {name} did not complete: phase {err.get('phase')} failed: {err.get('message')}\n"
                f"{err.get('traceback', '')}{where(out)}")


def where(out: dict[str, Any]) -> str:
    logs = out.get("logs", {})
    return (f"\n--- snapshotter ---\n{logs.get('snapshotter', '')[-4000:]}\n--- nydusd ---\n"
            f"{logs.get('nydusd', '')[-4000:]}\n--- dmesg ---\n{logs.get('dmesg', '')[-1500:]}")


def fscache_id(snapshot_id: str) -> str:
    """The snapshotter's fscache id of a snapshot (pkg/utils/erofs)."""
    return hashlib.sha256(f"nydus-snapshot-{snapshot_id}".encode()).hexdigest()


def blob_calls(out: dict[str, Any], since: int = 0, until: int | None = None) -> list[str]:
    """PUT/DELETE /api/v2/blobs calls fscached answered, "<method> <path?query> -> <status>"
    (those of one phase: from its `blob_calls_before` to its `blob_calls_after`)."""
    return out["api_blob_calls"][since:until]


def test_start_runs_nydusd_singleton(guest_run: dict[str, Any], vm_kernel: Any) -> None:
    start = phase(guest_run, "start")
    root = start["root"]
    assert len(start["nydusd_pids"]) == 1, start
    argv = start["argv"]
    assert argv[argv.index("singleton") + 1:argv.index("singleton") + 3] == ["--fscache", f"{root}/cache"], argv
    daemon_id = argv[argv.index("--id") + 1]
    assert argv[argv.index("--supervisor") + 1] == f"{root}/supervisor/{daemon_id}.sock", argv
    assert argv[argv.index("--apisock") + 1] == f"{root}/socket/{daemon_id}/api.sock", argv
    assert start["socket_mode"] == "0o600", start
    info = start["daemon"]
    assert info["state"] == "RUNNING" and info["id"] == daemon_id, info
    assert info["fscached"]["backend"] == "cachefiles", info["fscached"]
    assert info["fscached"]["kernel"].startswith(vm_kernel.series), info["fscached"]["kernel"]
    assert info["fscached"]["cache_dir"] == f"{root}/cache", info["fscached"]
    # the snapshotter ran with the README's fscache setup: every setting it gives, its nydusd config
    written = flatten(tomllib.loads(start["snapshotter_toml"]))
    for key, value in flatten(tomllib.loads(block_starting(FSCACHE_TOML))).items():
        if key.split(".")[-1] not in (*MACHINE_KEYS, *MACHINE_DAEMON_KEYS):
            assert written.get(key) == value, (key, written.get(key), value)
    assert written["daemon.fs_driver"] == "fscache" and written["daemon.recover_policy"] == "failover", written
    assert json.loads(start["nydusd_json"]) == snapshotter_setup(FSCACHE_TOML, FSCACHE_JSON)["nydusd_config"]


def test_nerdctl_runs_the_image(guest_run: dict[str, Any], built_image: BuiltImage) -> None:
    run = phase(guest_run, "run")
    root = guest_run["phases"]["start"]["root"]
    assert run["images"] == [guest_run["ref"]], run["images"]
    assert len(run["snapshots"]) == 2, run["snapshots"]  # the data layer's and the bootstrap layer's
    assert run["fetched_by_pull"] == 0, f"the pull fetched {run['fetched_by_pull']} bytes of the data blob"
    assert run["hello"].encode() == HELLO, run["hello"]
    assert 0 < run["fetched_after_hello"] < built_image.blob_size // 4, \
        f"cat /etc/hello fetched {run['fetched_after_hello']} of {built_image.blob_size} bytes of the blob"
    assert run["small_sha256"] == built_image.digests["small"], run["small_sha256"]
    # the snapshotter's own mount: erofs -o fsid=<its fscache id> at <root>/snapshots/<sid>/mnt
    (mount,) = run["erofs"]
    assert mount["mountpoint"].startswith(f"{root}/snapshots/") and mount["mountpoint"].endswith("/mnt"), mount
    sid = mount["mountpoint"].split("/")[-2]
    assert sid in run["snapshot_dirs"]
    assert mount["options"].count(f"fsid={fscache_id(sid)}") == 1, mount
    (image,) = run["daemon"]["fscached"]["images"]
    assert image["id"] == fscache_id(sid) and image["domain_id"] == "", image
    assert image["bootstrap"] == f"{root}/snapshots/{sid}/fs/image/image.boot", image
    assert image["blobs"] == [built_image.blob.removeprefix("sha256:")], image
    # one bind, the snapshotter's PUT of the legacy entry
    assert blob_calls(guest_run)[:1] == ["PUT /api/v2/blobs -> 204"], blob_calls(guest_run)


def check_streaming_reader(out: dict[str, Any], fo: dict[str, Any], key: str, digest: str) -> None:
    """The container streaming `key` across the kill(s): no error, the right bytes, the rest of
    the file fetched by the restarted daemon, moving again; the daemon serves on."""
    reader = fo["reader"]
    assert reader["returncode"] == 0 and container_stderr(reader["stderr"]) == "", (reader, where(out))
    assert reader["stdout"].split()[0] == digest, ("wrong bytes across the failover", reader)
    size = SIZES_MIB[key] * MIB
    assert fo["fetched_at_kill"] < size - 8 * MIB, f"the file was (nearly) all fetched before the kill: {fo}"
    # the restarted daemon fetched part of the file (the killed one's read-ahead may have
    # brought some MiBs past the reader's 2, and the registry logs a range once it is sent,
    # so what it sent before the kill can be counted late)
    assert fo["fetched_after"] > fo["fetched_at_kill"], f"nothing fetched after the kill: {fo}"
    assert fo["times"]["moving"] is not None, ("the reader had finished before the kill", fo["times"])
    # the reader needed the new daemon: it finished only after the takeover
    assert fo["times"]["new_process"] < fo["times"]["takeover"] < fo["reader_done_after_kill"], \
        (fo["times"], fo["reader_done_after_kill"])
    info = fo["daemon"]
    assert info["state"] == "RUNNING" and len(info["fscached"]["images"]) == 1, info
    counters = info["fscached"]["counters"]
    assert counters.get("read_failed", 0) == 0 and counters.get("verify_failures", 0) == 0, counters
    assert fo["hello_after"].encode() == HELLO


def test_failover_under_a_streaming_container(guest_run: dict[str, Any], built_image: BuiltImage) -> None:
    fo = phase(guest_run, "failover")
    start = guest_run["phases"]["start"]
    assert fo["killed"] == start["nydusd_pids"], fo
    assert fo["new_argv"] == start["argv"], "the snapshotter restarted nydusd with another command line"
    assert fo["failovers_logged"] == 1, fo
    check_streaming_reader(guest_run, fo, "big", built_image.digests["big"])


def test_failover_killed_again_during_its_takeover(guest_run: dict[str, Any], built_image: BuiltImage) -> None:
    """The restarted nydusd is killed right after the supervisor gave it the state, before it
    answers its API: the snapshotter fails over a second time, from the state it still holds."""
    fo = phase(guest_run, "again")
    assert len(fo["killed"]) == 1 and len(fo["killed_in_takeover"]) == 1, fo
    assert not fo["api_answered_before_second_kill"], "the second kill came after the takeover, not during it"
    assert fo["failovers_logged"] == 3, fo  # the first phase's, and this phase's two
    assert fo["new_argv"] == guest_run["phases"]["start"]["argv"]
    check_streaming_reader(guest_run, fo, "again", built_image.digests["again"])


def test_nydusd_logs_show_every_takeover_and_no_failure(guest_run: dict[str, Any]) -> None:
    for name in ("failover", "again", "upgrade"):
        phase(guest_run, name)
    counts = guest_run["nydusd_log_counts"]
    # failover, again (its successor; the process killed in its takeover logs it too when it
    # lived long enough), upgrade
    assert 3 <= counts["took_state_at_start"] <= 4, counts
    assert counts["takeovers"] == 3, counts
    assert counts["read_failed"] == 0 and counts["errors"] == 0, (counts, guest_run["nydusd_errors"])


def check_detached_reader(rs: dict[str, Any], key: str, digest: str) -> None:
    assert rs["running_after_restart"], ("the container was not running across the restart", rs["tasks"])
    assert rs["exit_code"] == "0", rs
    assert rs["sha256"] == digest, rs
    # the reader waited 2 MiB into the file: most of the rest was fetched after the restart
    assert rs["fetched_after_restart"] >= SIZES_MIB[key] * MIB // 4, f"the rest came from nowhere: {rs}"
    assert rs["hello_after"].encode() == HELLO, rs
    assert rs["daemon"]["state"] == "RUNNING", rs["daemon"]


def test_snapshotter_restart_under_a_running_container(guest_run: dict[str, Any], built_image: BuiltImage) -> None:
    rs = phase(guest_run, "restart")
    assert rs["nydusd_after"] == rs["nydusd_before"], "the shared nydusd did not outlive the snapshotter's restart"
    assert rs["upgrade_logged"] == 0, "same nydusd, same Git Commit: no hot upgrade"
    check_detached_reader(rs, "slow", built_image.digests["slow"])


def test_hot_upgrade_by_the_snapshotter_under_a_running_container(guest_run: dict[str, Any],
                                                                  built_image: BuiltImage) -> None:
    """The snapshotter restarted with a nydusd whose --version names another Git Commit:
    it hot-upgrades the live daemon (a new process with --upgrade on api1.sock takes over, the
    old one exits, the snapshotter binds the image again), while a container reads a cold file."""
    up = phase(guest_run, "upgrade")
    assert up["upgrade_failed"] == [] and up["upgrade_logged"] == 1, up
    ((old_pid, old_argv),) = up["nydusd_before"].items()
    ((new_pid, new_argv),) = up["nydusd_after"].items()
    assert new_pid != old_pid and "--upgrade" in new_argv, up
    old_sock, new_sock = (argv[argv.index("--apisock") + 1] for argv in (old_argv, new_argv))
    assert new_sock == old_sock.replace("api.sock", "api1.sock") != old_sock, (old_sock, new_sock)
    # RecoverRafsInstances: the image the state gave back, bound again by the snapshotter
    calls = blob_calls(guest_run, up["blob_calls_before"], up["blob_calls_after"])
    assert calls == ["PUT /api/v2/blobs -> 204"], calls
    check_detached_reader(up, "upgrade", built_image.digests["upgrade"])


def test_shared_domain(guest_run: dict[str, Any], built_image: BuiltImage) -> None:
    """`domain_id` in the nydusd config: the snapshotter binds in that domain, mounts with
    `domain_id=,fsid=` and unbinds with `?blob_id=&domain_id=`; the first image is untouched."""
    dom = phase(guest_run, "domain")
    assert dom["nydusd_after"] == dom["nydusd_before"], "same nydusd: no upgrade, no restart of it"
    assert dom["hello"].encode() == OTHER_HELLO and dom["data_sha256"] == built_image.other_digests["data"], dom
    mounts = {m["mountpoint"]: m["options"] for m in dom["erofs"]}
    assert len(mounts) == 2, mounts
    (other_mp,) = [mp for mp, opts in mounts.items() if f"domain_id={DOMAIN}" in opts]
    fsid = fscache_id(other_mp.split("/")[-2])
    assert f"fsid={fsid}" in mounts[other_mp], mounts
    images = {i["id"]: i for i in dom["daemon"]["fscached"]["images"]}
    assert images[fsid]["domain_id"] == DOMAIN and len(images) == 2, images
    assert dom["images_after_rmi"] == [guest_run["ref"]], dom
    assert [m["mountpoint"] for m in dom["erofs_after_rmi"]] == [mp for mp in mounts if mp != other_mp], dom
    assert [i["id"] for i in dom["daemon_after_rmi"]["fscached"]["images"]] == [i for i in images if i != fsid]
    calls = blob_calls(guest_run, dom["blob_calls_before"], dom["blob_calls_after"])
    assert calls == ["PUT /api/v2/blobs -> 204", f"DELETE /api/v2/blobs?blob_id={fsid}&domain_id={DOMAIN} -> 204",
                     f"DELETE /api/v2/blobs?blob_id={fsid} -> 204"], calls


def test_rmi_unmounts_and_unbinds(guest_run: dict[str, Any]) -> None:
    rmi = phase(guest_run, "rmi")
    (mount,) = rmi["erofs_before"]
    fsid = fscache_id(mount["mountpoint"].split("/")[-2])
    assert rmi["images"] == [], rmi
    assert rmi["snapshots"] == [], rmi
    assert rmi["erofs_after"] == [] and rmi["mounts_after"] == [], rmi
    assert len(rmi["nydusd_pids"]) == 1, "the shared nydusd serves on with no image"
    assert rmi["daemon"]["fscached"]["images"] == [], rmi["daemon"]
    # the snapshotter's unmount: unbind the domain (no blob_id: domain == fsid), umount, cull
    calls = blob_calls(guest_run, rmi["blob_calls_before"])
    assert calls == [f"DELETE /api/v2/blobs?domain_id={fsid} -> 204", f"DELETE /api/v2/blobs?blob_id={fsid} -> 204"], \
        calls
    left = guest_run["left_after_stop"]
    assert left == {"namespace_pids": [], "root_pids": [], "mounts": [], "api_sockets": []}, left
