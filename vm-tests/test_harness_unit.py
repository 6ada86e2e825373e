"""Host-only checks of the harness (no QEMU): kernel lookup order and shared-path handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmharness import kernels, qemu


def test_kernel_dir_env_wins(tmp_path, monkeypatch):
    (tmp_path / "bzImage-6.1").write_bytes(b"x")
    monkeypatch.setenv("FSCACHED_KERNEL_DIR", str(tmp_path))
    k = kernels.find_kernel("6.1")
    assert k is not None and k.origin == "env" and k.path == tmp_path / "bzImage-6.1"


def test_cache_used_when_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("FSCACHED_KERNEL_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(kernels, "shared_dir", lambda: tmp_path / "no-shared")
    monkeypatch.setenv("FSCACHED_KERNEL_CACHE", str(tmp_path / "cache"))
    assert kernels.find_kernel("6.12") is None
    p = tmp_path / "cache" / f"6.12-{kernels.fragment_sha256()}" / "bzImage"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"x")
    k = kernels.find_kernel("6.12")
    assert k is not None and k.origin == "cache" and k.path == p


def test_shared_dir_is_next_to_checkout():
    assert kernels.shared_dir() == qemu.REPO_ROOT.resolve().parent / "shared" / "vm"


def test_selected_series(monkeypatch):
    monkeypatch.setenv("FSCACHED_KERNELS", "6.1")
    assert kernels.selected_series() == ["6.1"]
    monkeypatch.setenv("FSCACHED_KERNELS", "5.4")
    with pytest.raises(ValueError):
        kernels.selected_series()


def test_fragment_matches_shared_copy():
    shared = kernels.shared_dir() / "kernel-fragment.config"
    if not shared.exists():
        pytest.skip(f"{shared} not present on this machine")
    assert kernels.FRAGMENT.read_bytes() == shared.read_bytes()


def test_tmp_shares(tmp_path):
    a = tmp_path / "a"
    (a / "b").mkdir(parents=True)
    got = qemu._tmp_shares([a / "b", a, Path("/usr/bin"), Path("/tmp")])
    if str(tmp_path).startswith("/tmp/"):
        assert got == [str(a)]  # nested path folded into its parent; non-/tmp paths need nothing
    else:
        assert got == []


def test_init_script_is_executable():
    import os

    assert os.access(qemu.INIT_SCRIPT, os.X_OK)
