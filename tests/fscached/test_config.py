from __future__ import annotations

import os
from pathlib import Path

import pytest

from fscached.cli import main
from fscached.config import ConfigError, build_config, load_toml, parse_image_spec


def test_image_spec_flag(tmp_path: Path) -> None:
    spec = parse_image_spec(f"fsid=img1,bootstrap={tmp_path}/a.boot,blobs={tmp_path}/b,domain=d1")
    assert (spec.fsid, spec.domain, spec.volume) == ("img1", "d1", "d1")
    assert spec.bootstrap == tmp_path / "a.boot" and spec.blobs == tmp_path / "b"
    alone = parse_image_spec(f"fsid=img2,bootstrap={tmp_path}/x/image.boot")
    assert alone.volume == "img2" and alone.blobs == tmp_path / "x" / "blobs"


@pytest.mark.parametrize("bad, why", [
    ("fsid=a/b,bootstrap=/x", "invalid fsid"),
    ("fsid=a,bootstrap=/x,domain=d,e", "key=value"),
    ("fsid=a,bootstrap=/x,colour=red", "unknown key"),
    ("bootstrap=/x", "missing fsid"),
    ("fsid=a,b=c,bootstrap=/x", "unknown key"),
])
def test_bad_image_specs_are_named(bad: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_image_spec(bad)


def test_toml_and_flags_merge(tmp_path: Path) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        'cache_dir = "/var/cache/x"\nlog_level = "debug"\n'
        '[[image]]\nfsid = "one"\nbootstrap = "/i/one.boot"\nblobs = "/i/blobs"\ndomain = "d"\n'
    )
    config = build_config(load_toml(cfg), None, "t1", None, ["fsid=two,bootstrap=/i/two.boot"], None, None, None)
    assert config.cache_dir == Path("/var/cache/x") and config.tag == "t1" and config.log_level == "debug"
    assert [(i.fsid, i.volume) for i in config.images] == [("one", "d"), ("two", "two")]
    flags_win = build_config(load_toml(cfg), "/other", None, "error", [], None, None, None)
    assert flags_win.cache_dir == Path("/other") and flags_win.log_level == "error"


def test_duplicate_images_and_missing_cache_dir_are_refused() -> None:
    with pytest.raises(ConfigError, match="configured twice"):
        build_config({}, "/c", None, None, ["fsid=a,bootstrap=/x", "fsid=a,bootstrap=/y"], None, None, None)
    with pytest.raises(ConfigError, match="no cache directory"):
        build_config({}, None, None, None, [], None, None, None)
    with pytest.raises(ConfigError, match="unknown key"):
        build_config({"cahce_dir": "/c"}, "/c", None, None, [], None, None, None)


def test_cli_reports_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("cache_dir = [")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fscached: error: config file") and "\n" not in err
    assert main(["--cache-dir", str(tmp_path), "--image", f"fsid=x,bootstrap={tmp_path}/none.boot"]) == 1
    err = capsys.readouterr().err.strip()
    assert "bootstrap" in err and "not found" in err and "\n" not in err


def test_registry_images_and_their_sources() -> None:
    spec = parse_image_spec("fsid=app,ref=127.0.0.1:5000/team/app:v1,scheme=http,dragonfly=/run/df.sock,prefetch=all,prefetch_bandwidth=20M")
    assert spec.bootstrap is None and spec.blobs is None
    assert spec.registry is not None and (spec.registry.host, spec.registry.repo, spec.registry.scheme) == ("127.0.0.1:5000", "team/app", "http")
    assert spec.dragonfly_socket == Path("/run/df.sock")
    assert (spec.prefetch.mode, spec.prefetch.bandwidth) == ("all", 20 << 20)
    with pytest.raises(ConfigError, match="Dragonfly peer fetches from a registry"):
        parse_image_spec("fsid=a,bootstrap=/x.boot,blobs=/b,dragonfly=/run/df.sock")
    with pytest.raises(ConfigError, match="prefetch must be"):
        parse_image_spec("fsid=a,ref=h:1/r:t,prefetch=some")
    with pytest.raises(ConfigError, match="invalid"):
        parse_image_spec("fsid=a,ref=HOST:1/Bad Repo:t")


def test_auth_is_never_in_the_spec_repr(tmp_path: Path) -> None:
    secret = tmp_path / "auth"
    secret.write_text("dXNlcjpzM2NyZXQ=\n")
    spec = parse_image_spec(f"fsid=a,ref=reg.example:443/r:t,auth_file={secret}")
    assert spec.registry is not None and spec.registry.auth == "dXNlcjpzM2NyZXQ="
    assert "dXNlcjpzM2NyZXQ=" not in repr(spec)


def test_cli_names_a_missing_device_and_a_tmpfs_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from erofs_image.builder import convert

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    convert(src, tmp_path / "img")
    image = f"fsid=x,bootstrap={tmp_path / 'img' / 'image.boot'}"
    assert main(["--cache-dir", str(tmp_path / "cache"), "--image", image, "--device", str(tmp_path / "nodev"),
                 "--backend", "cachefiles"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fscached: error:") and "\n" not in err and "nodev" in err
    shm = Path("/dev/shm")
    if shm.is_dir():
        cache = shm / f"fscached-test-{os.getpid()}"
        # auto: fanotify refuses tmpfs, and this machine has no /dev/cachefiles: one line naming both
        assert main(["--cache-dir", str(cache), "--image", image, "--device", str(tmp_path / "nodev")]) == 1
        err = capsys.readouterr().err.strip()
        assert "tmpfs" in err and "fanotify" in err and "CACHEFILES_ONDEMAND" in err and "\n" not in err
        assert main(["--cache-dir", str(cache), "--image", image, "--backend", "fanotify"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("fscached: error:") and "tmpfs" in err and "\n" not in err
        cache.rmdir()


def test_backend_must_be_known(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cache-dir", str(tmp_path), "--backend", "fuse"]) == 2
    err = capsys.readouterr().err.strip()
    assert "backend" in err and "fuse" in err and "\n" not in err
