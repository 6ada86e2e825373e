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
        assert not cache.exists(), "a start that failed left the cache dir it made"


def test_backend_must_be_known(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cache-dir", str(tmp_path), "--backend", "fuse"]) == 2
    err = capsys.readouterr().err.strip()
    assert "backend" in err and "fuse" in err and "\n" not in err


# -- every bad value of every key: exit code 2, one line naming the key, no traceback -----------
# The daemon is never started (start_and_serve is replaced) and the network is out of reach:
# checking a configuration must need neither.

LOCAL = "fsid=a,bootstrap=/nonexistent.boot"
REG = LOCAL + ",registry=h/repo"
PROXY = REG + ",proxy=http://127.0.0.1:1"

BAD_IMAGE_VALUES = [
    # (the --image text, the key the message must name)
    (LOCAL + ",registry=h/Bad_Repo", "registry"),
    (LOCAL + ",registry=h/bad repo", "registry"),
    (LOCAL + ",registry=h", "registry"),
    (LOCAL + ",registry=https://h/repo", "registry"),
    (LOCAL + ",registry=h:99999/repo", "registry"),
    (LOCAL + ",registry=bad host/repo", "registry"),
    ("fsid=a,ref=h.example/Bad_Repo:t", "ref"),
    ("fsid=a,ref=h.example/r:-bad", "ref"),
    ("fsid=a,ref=h.example/r@sha256:abc", "ref"),
    ("fsid=a,ref=https://h.example/r:t", "ref"),
    (REG + ",scheme=ftp", "scheme"),
    (LOCAL + ",scheme=http", "scheme"),  # no registry to use it with
    (REG + ",timeout=abc", "timeout"),
    (REG + ",timeout=-1", "timeout"),
    (REG + ",timeout=0", "timeout"),
    (REG + ",timeout=nan", "timeout"),
    (REG + ",timeout=inf", "timeout"),
    (LOCAL + ",timeout=5", "timeout"),
    (PROXY + ",check_interval=abc", "check_interval"),
    (PROXY + ",check_interval=-1", "check_interval"),
    (PROXY + ",check_interval=nan", "check_interval"),
    (PROXY + ",ping_url=http://127.0.0.1:1/ping,check_interval=0", "check_interval"),
    (REG + ",check_interval=5", "check_interval"),  # no proxy
    (REG + ",proxy=127.0.0.1:1", "proxy"),
    (REG + ",proxy=ftp://127.0.0.1:1", "proxy"),
    (REG + ",proxy=http://", "proxy"),
    (REG + ",proxy=http://127.0.0.1:99999", "proxy"),
    (PROXY + ",ping_url=ping", "ping_url"),
    (REG + ",ping_url=http://127.0.0.1:1/ping", "ping_url"),
    (LOCAL + ",proxy=http://127.0.0.1:1", "registry"),  # a proxy in front of nothing
    (REG + ",skip_verify=maybe", "skip_verify"),
    (PROXY + ",use_http=maybe", "use_http"),
    (PROXY + ",fallback=maybe", "fallback"),
    (LOCAL + ",skip_verify=true", "skip_verify"),
    (PROXY.replace(",proxy=http://127.0.0.1:1", ",fallback=false"), "fallback"),
    (LOCAL + ",prefetch=some", "prefetch"),
    (LOCAL + ",prefetch_bandwidth=-5", "prefetch_bandwidth"),
    (LOCAL + ",prefetch_bandwidth=-1M", "prefetch_bandwidth"),
    (LOCAL + ",prefetch_bandwidth=abc", "prefetch_bandwidth"),
    (LOCAL + ",prefetch_bandwidth=1.5.5M", "prefetch_bandwidth"),
    (LOCAL + ",prefetch_bandwidth=infK", "prefetch_bandwidth"),
    (LOCAL + ",prefetch_bandwidth=1e3", "prefetch_bandwidth"),
    (LOCAL + ",mountpoint=/", "mountpoint"),
    (LOCAL + ",mountpoint={tmp}/a-file", "mountpoint"),
    ("fsid=a/b,bootstrap=/x.boot", "fsid"),
    ("fsid=.a,bootstrap=/x.boot", "fsid"),
    ("fsid=" + "a" * 129 + ",bootstrap=/x.boot", "fsid"),
    (LOCAL + ",domain=d/e", "domain"),
    (LOCAL + ",domain=d e", "domain"),
    (REG + ",auth_file={tmp}/missing", "auth_file"),
    (REG + ",auth_file={tmp}", "auth_file"),  # a directory
    (REG + ",auth_file={tmp}/binary", "auth_file"),
    (REG + ",auth_file={tmp}/empty", "auth_file"),
    (REG + ",auth_file={tmp}/not-base64", "auth_file"),
    (REG + ",ca_file={tmp}/missing", "ca_file"),
    (REG + ",ca_file={tmp}/not-pem", "ca_file"),
    (LOCAL + ",fsid=b", "fsid"),  # given twice
]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No daemon start (it would return 99), no network; files the cases refer to."""
    import socket

    import fscached.cli

    async def not_started(config: object, *more: object, **kw: object) -> int:
        return 99

    def no_network(*args: object, **kw: object) -> None:
        raise AssertionError("config parsing reached the network")

    monkeypatch.setattr(fscached.cli, "start_and_serve", not_started)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00\x80")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "not-base64").write_text("user:password\n")
    (tmp_path / "not-pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    return tmp_path


def one_line_error(capsys: pytest.CaptureFixture[str], where: str) -> str:
    """The reason after `fscached: error: <where>: `; fails on a traceback or a second line."""
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    prefix = f"fscached: error: {where}: "
    assert err.startswith(prefix), err
    return err[len(prefix):]


def toml_table(spec: str) -> str:
    lines = []
    for part in spec.split(","):
        key, _, value = part.partition("=")
        lines.append(f"{key} = {json_string(value)}")
    return "[[image]]\n" + "\n".join(lines) + "\n"


def json_string(value: str) -> str:
    import json

    return json.dumps(value)  # a valid TOML basic string for these values


def test_good_base_specs_are_accepted(offline: Path) -> None:
    """The bad cases below differ from these in the one key named."""
    for spec in (LOCAL, REG, PROXY, PROXY + ",ping_url=http://127.0.0.1:1/ping,check_interval=0.5,"
                 "fallback=no,use_http=yes,timeout=2.5,skip_verify=1,scheme=http,prefetch=all,"
                 "prefetch_bandwidth=1.5M,mountpoint=/mnt/x,domain=d",
                 PROXY + ",check_interval=0", "fsid=a,ref=h.example/r:t,registry=h.example:5000/other"):
        assert main(["--cache-dir", str(offline), "--image", spec]) == 99, spec


@pytest.mark.parametrize("spec, key", BAD_IMAGE_VALUES, ids=[f"{k}:{s.split(',')[-1]}" for s, k in BAD_IMAGE_VALUES])
def test_bad_image_value_flag(spec: str, key: str, offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = spec.replace("{tmp}", str(offline))
    assert main(["--cache-dir", str(offline), "--image", spec]) == 2
    reason = one_line_error(capsys, f"--image {spec!r}")
    assert key in reason, reason


@pytest.mark.parametrize("spec, key", [(s, k) for s, k in BAD_IMAGE_VALUES if not s.endswith(",fsid=b")],
                         ids=[f"{k}:{s.split(',')[-1]}" for s, k in BAD_IMAGE_VALUES if not s.endswith(",fsid=b")])
def test_bad_image_value_toml(spec: str, key: str, offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = offline / "c.toml"
    config.write_text(toml_table(spec.replace("{tmp}", str(offline))))
    assert main(["--cache-dir", str(offline), "--config", str(config)]) == 2
    reason = one_line_error(capsys, "config file [[image]] #1")
    assert key in reason, reason


@pytest.mark.parametrize("table, key", [
    ('fsid = 5\nbootstrap = "/x.boot"', "fsid"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nmountpoint = ""', "mountpoint"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nmountpoint = "/mnt/a,b"', "mountpoint"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nmountpoint = "/mnt/a\\nb"', "mountpoint"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nblobs = ["/b"]', "blobs"),
    ('fsid = "a"\nbootstrap = "/x.boot"\ndomain = true', "domain"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nregistry = "h/repo"\nskip_verify = "maybe"', "skip_verify"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nregistry = "h/repo"\ntimeout = true', "timeout"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nregistry = "h/repo"\ntimeout = -3', "timeout"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nregistry = "h/repo"\ntimeout = nan', "timeout"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nprefetch_bandwidth = -5', "prefetch_bandwidth"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nprefetch_bandwidth = inf', "prefetch_bandwidth"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nprefetch_bandwidth = true', "prefetch_bandwidth"),
    ('fsid = "a"\nbootstrap = "/x.boot"\nprefetch_bandwidth = 1979-05-27', "prefetch_bandwidth"),
    ('fsid = "a"\nref = "h.example/r:t"\nauth = "dXNlcjpz"\nauth_file = "/etc/hostname"', "auth"),
    ('fsid = "a"\nbootstrap = "/x.boot"\n[image.registry]\nhost = "h"', "registry"),
])
def test_bad_toml_image_types(table: str, key: str, offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = offline / "c.toml"
    config.write_text("[[image]]\n" + table + "\n")
    assert main(["--cache-dir", str(offline), "--config", str(config)]) == 2
    reason = one_line_error(capsys, "config file [[image]] #1")
    assert key in reason, reason


@pytest.mark.parametrize("text, key", [
    ('read_window = "3000"', "read_window"),
    ("read_window = -4096", "read_window"),
    ('read_window = "abc"', "read_window"),
    ("read_window = 0", "read_window"),
    ("log_level = 5", "log_level"),
    ("cache_dir = 5", "cache_dir"),
    ('tag = ""', "tag"),
    ('image = "fsid=a"', "image"),
    ('[image]\nfsid = "a"\nbootstrap = "/x.boot"', "image"),
])
def test_bad_toml_top_level(text: str, key: str, offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = offline / "c.toml"
    config.write_text(text + "\n")
    assert main(["--cache-dir", str(offline), "--config", str(config)]) == 2
    reason = one_line_error(capsys, "config file")
    assert key in reason, reason


@pytest.mark.parametrize("argv, key", [
    (["--read-window", "3000"], "--read-window"),
    (["--read-window", "-4096"], "--read-window"),
    (["--read-window", "abc"], "--read-window"),
    (["--image"], "--image"),
    (["--cache-dir"], "--cache-dir"),
    (["--bogus"], "--bogus"),
])
def test_bad_flags(argv: list[str], key: str, offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cache-dir", str(offline), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fscached: error: ") and "Traceback" not in err, err
    assert key in err, err


def test_unreadable_config_file_and_shared_mountpoint(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(offline)]) == 2  # a directory
    one_line_error(capsys, f"config file {offline}")
    (offline / "bin.toml").write_bytes(b"\xff\xfe")
    assert main(["--config", str(offline / "bin.toml")]) == 2
    one_line_error(capsys, f"config file {offline / 'bin.toml'}")
    assert main(["--cache-dir", str(offline), "--image", "fsid=a,bootstrap=/x.boot,mountpoint=/mnt/m",
                 "--image", "fsid=b,bootstrap=/y.boot,mountpoint=/mnt/m/"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mountpoint" in err and "'a'" in err and "'b'" in err, err


def test_accepted_specs_build_their_sources(tmp_path: Path) -> None:
    """What the config accepts, the registry and proxy sources accept too (no late ValueError)."""
    import asyncio

    from fscached.core.sources import SourcePool

    secret = tmp_path / "auth"
    secret.write_text("dXNlcjpzM2NyZXQ=\n")
    pool = SourcePool()
    for text in (REG + ",registry=h:5000/a/b-c/d__e/", PROXY + ",check_interval=0,use_http=on",
                 PROXY + f",ping_url=https://[::1]:8/p,check_interval=0.1,auth_file={secret}",
                 "fsid=a,ref=localhost/r@sha256:" + "0" * 64 + ",scheme=http,timeout=1e-3"):
        spec = parse_image_spec(text.replace(REG, LOCAL) if text.startswith(REG + ",registry") else text)
        assert pool.chain(spec).sources
    asyncio.run(pool.close())
