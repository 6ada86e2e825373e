"""fscached's `nydusd` under nydus-snapshotter's exact call sequence, in a real kernel (6.12, 6.1).

One boot per kernel: the snapshotter's command line, its socket wait and liveness connection,
the RUNNING wait, `--version` against the API's git_commit, binds (legacy form, localfs), the
`-o fsid=` and `-o domain_id=,fsid=` mounts read back byte-exact, sendfd, the error paths, the
unmount sequence (unbind, umount, cull) and exit (scenarios/nydus_snapshotter.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from trees import convert
from vmharness import run_scenario

pytestmark = pytest.mark.vm
NYDUSD = Path(sys.executable).parent / "nydusd"
CULL_AVAILABLE = importlib.util.find_spec("fscached.cache_gc") is not None
SHARED_DOMAIN = "shared-domain"


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def make_tree(root: Path, name: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "etc" / "os-release").write_text(f'NAME="{name}"\n')
    (root / "usr" / "lib" / "big.so").write_bytes(os.urandom(3 << 20) + name.encode())
    (root / "usr" / "lib" / "text.py").write_text(f"# {name}\n" + "print('hello')\n" * 20000)
    (root / "empty").write_bytes(b"")
    os.symlink("usr/lib/text.py", root / "link")
    return root


def test_nydus_snapshotter_call_sequence(vm_kernel: Any, tmp_path: Path) -> None:
    from fscached.util.buildinfo import build_info

    assert NYDUSD.exists(), f"{NYDUSD}: the nydusd console script is not installed in this venv"
    images = []
    for n, (snapshot_id, domain) in enumerate((("101", None), ("102", SHARED_DOMAIN))):
        tree = make_tree(tmp_path / f"tree{n}", f"image-{snapshot_id}")
        built = convert(tree, tmp_path / f"built{n}", "zstd", chunk_size="256K")
        images.append({"snapshot_id": snapshot_id, "bootstrap": str(built / "image.boot"),
                       "blobs": str(built / "blobs"), "domain": domain, "digests": digests(tree)})
    res = run_scenario(vm_kernel, "nydus_snapshotter", {"nydusd": str(NYDUSD), "images": images},
                       timeout=600, share=[tmp_path], scratch_size="1G")
    out = res.result
    where = f"guest {res.duration:.0f}s; log: {out.get('log_file')}\nstderr: {out.get('stderr')}"

    # start-up as the snapshotter sees it
    assert out["socket_mode"] == "0o600" and out["socket_dir_mode"] == "0o700", out
    info = out["daemon_info"]
    assert info["status"] == 200 and info["body"]["state"] == "RUNNING", info
    assert info["body"]["id"] == "d0fscached0nydus0compat"
    assert info["body"]["supervisor"].endswith("/supervisor/d0fscached0nydus0compat.sock")
    assert info["body"]["fscached"]["backend"] == "cachefiles"
    assert info["body"]["fscached"]["kernel"].startswith(vm_kernel.series), info["body"]["fscached"]["kernel"]
    # nydusd --version: the Git Commit line is the API's version.git_commit (no upgrade loop)
    assert out["version_rc"] == 0
    commit_lines = [line for line in out["version_stdout"].splitlines() if line.startswith("Git Commit:")]
    assert len(commit_lines) == 1, out["version_stdout"]
    assert commit_lines[0].split()[-1] == info["body"]["version"]["git_commit"]
    assert len(info["body"]["version"]["git_commit"]) == 40
    assert info["body"]["version"]["package_ver"] == build_info()["package_ver"]

    # binds, mounts (fsid= and domain_id=,fsid=), every file's sha256
    for image, got in zip(images, out["images"]):
        assert got["bind"]["status"] == 204 and got["bind"]["body"] is None, (got["bind"], where)
        assert got["mount"]["ok"], (got["mount"], where)
        want_opts = (f"domain_id={image['domain']},fsid={got['fsid']}" if image["domain"] else f"fsid={got['fsid']}")
        assert got["mount"]["options"] == want_opts
        assert got["files_checked"] == len(image["digests"]) and not got["mismatches"], (got, where)
        # nobody listens on the supervisor socket here (test_vm_failover.py has the supervisor stand-in)
        assert got["sendfd"]["status"] == 500 and "supervisor" in got["sendfd"]["body"]["message"], got["sendfd"]
        metrics = got["metrics"]
        assert metrics["status"] == 200 and metrics["body"]["id"] == got["fsid"]
        assert metrics["body"]["entries_count"] == 1 and metrics["body"]["bytes_filled"] > 0, metrics
    listed = {i["id"]: i for i in out["info_with_images"]["body"]["fscached"]["images"]}
    assert listed[out["images"][0]["fsid"]]["mount"] == {"source": "none", "fstype": "erofs",
                                                         "options": f"fsid={out['images'][0]['fsid']}"}
    assert listed[out["images"][1]["fsid"]]["domain_id"] == SHARED_DOMAIN
    assert out["monitor_alive_while_serving"], "the liveness connection was hung up on"

    # error paths
    errors = out["errors"]
    assert errors["second_bind"]["status"] == 400, errors["second_bind"]
    assert errors["second_bind"]["body"]["code"] == "ALREADY_EXISTS"
    assert "already exists" in errors["second_bind"]["body"]["message"]
    assert errors["unbind_missing"]["status"] == 404, errors["unbind_missing"]
    assert "blob_cache: cache entry not found" in errors["unbind_missing"]["body"]["message"]
    assert errors["missing_metadata"]["status"] == 400, errors["missing_metadata"]
    assert "metadata_path" in errors["missing_metadata"]["body"]["message"]
    assert not errors["missing_metadata_mount"]["ok"], "a refused bind must serve nothing"

    # the snapshotter's unmount: unbind, umount, cull
    for step in out["teardown"]:
        assert step["unbind"]["status"] == 204, step
        assert step["umount"]["ok"], step
        if CULL_AVAILABLE:
            assert step["cull"]["status"] == 204, step["cull"]
        else:
            assert step["cull"]["status"] == 501 and "fscached.cache_gc" in step["cull"]["body"]["message"], step
        assert not step["remount_after_unbind"]["ok"], "an unbound image must not be served"
    assert out["cull_layer"]["status"] == (204 if CULL_AVAILABLE else 501), out["cull_layer"]
    assert out["info_after"]["body"]["fscached"]["images"] == []
    counters = out["info_after"]["body"]["fscached"]["counters"]
    assert counters.get("read_failed", 0) == 0 and counters.get("verify_failures", 0) == 0, counters

    # exit: 204, a clean exit, the monitor sees the hang-up, the socket is gone
    assert out["monitor_alive_before_exit"]
    assert out["exit"]["status"] == 204 and out["exit"]["body"] is None
    assert out["exit_code"] == 0, where
    assert out["monitor_saw_hangup"] and not out["socket_left"]
    assert out["log_file"] and "API listening on" in out["log_file"], out["log_file"]
    print(f"\n[{vm_kernel.series}] socket after {out['socket_seconds']} s, RUNNING after {out['running_seconds']} s "
          f"(guest, TCG); whole scenario {res.duration:.0f} s")
