"""nydusd bind entries -> ImageSpec (fscached.api.bind_entry): both config forms, every mapped
field, every refusal (400 / 501), and no credential in any message."""
from __future__ import annotations

import base64
import copy
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from fscached.config import PrefetchSpec, ProxySpec, RegistrySpec
from fscached.api.bind_entry import BadBind, UnsupportedBind, parse_bind_entry

AUTH = base64.b64encode(b"robot:s3cret-Pa55").decode()


def legacy(**config: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": "bootstrap", "id": "f" * 64, "domain_id": "f" * 64,
        "config": {
            "id": "f" * 64, "backend_type": "registry",
            "backend_config": {
                "host": "registry.example:5000", "repo": "team/app", "auth": AUTH, "registry_token": "tok",
                "scheme": "https", "skip_verify": False, "ca_cert_files": [], "blob_url_scheme": "",
                "blob_redirected_host": "", "timeout": 5, "connect_timeout": 5, "retry_limit": 2,
                "readahead": False, "blob_file": "", "dir": "",
                "proxy": {"url": "http://127.0.0.1:4001", "fallback": True, "ping_url": "http://127.0.0.1:4003/healthy",
                          "check_interval": 5, "use_http": False}},
            "cache_type": "fscache", "cache_config": {"work_dir": "/var/lib/snap/fs"},
            "prefetch_config": {"enable": True, "threads_count": 8, "merging_size": 1048576, "bandwidth_rate": 0,
                                "prefetch_all": True},
            "metadata_path": "/var/lib/snap/fs/image/image.boot",
        },
    }
    entry["config"].update(config)
    return entry


def v2(**config: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "type": "bootstrap", "id": "img", "domain_id": "shared",
        "config_v2": {
            "version": 2, "id": "img",
            "backend": {"type": "registry", "registry": {
                "host": "reg.example", "repo": "library/python", "auth": AUTH, "scheme": "http",
                "skip_verify": True, "timeout": 30,
                "proxy": {"url": "http://127.0.0.1:65001", "ping_url": "", "check_interval": 10, "fallback": False,
                          "use_http": True}}},
            "cache": {"type": "fscache", "fscache": {"work_dir": "/w"},
                      "prefetch": {"enable": True, "threads": 2, "batch_size": 1 << 20, "bandwidth_limit": 20 << 20}},
            "metadata_path": "/m/image.boot",
        },
    }
    entry["config_v2"].update(config)
    return entry


def parse(entry: dict[str, Any]):  # type: ignore[no-untyped-def]
    return parse_bind_entry(entry, check_files=False)


def refused(entry: Any, match: str, kind: type = BadBind, **kwargs: Any) -> str:
    with pytest.raises(kind) as info:
        parse_bind_entry(entry, check_files=kwargs.get("check_files", False))
    message = str(info.value)
    assert match in message, message
    assert AUTH not in message and "s3cret" not in message
    return message


# -- the legacy form, every field -----------------------------------------------------------------
def test_legacy_registry_entry_maps_every_field() -> None:
    bind = parse(legacy())
    spec = bind.spec
    assert bind.form == "config"
    assert spec.fsid == "f" * 64
    assert spec.domain is None, "domain_id equal to the id: no shared domain"
    assert spec.volume == "f" * 64
    assert spec.bootstrap == Path("/var/lib/snap/fs/image/image.boot")
    assert spec.blobs is None and spec.ref is None and spec.mountpoint is None
    assert spec.registry == RegistrySpec("registry.example:5000", "team/app", "https", AUTH, None, False, 5.0)
    assert spec.proxy == ProxySpec("http://127.0.0.1:4001", "http://127.0.0.1:4003/healthy", 5.0, True, False)
    assert spec.prefetch == PrefetchSpec("all", 0)
    # fields given but not used are named (never their values)
    assert bind.registry_token == "tok" and "tok" not in repr(bind), "a bearer token is kept, never shown"
    assert "registry.retry_limit" in bind.ignored and "registry.connect_timeout" in bind.ignored
    assert "prefetch_config.merging_size" in bind.ignored
    assert not any("tok" == part for name in bind.ignored for part in name.split(".")), "names, never values"
    assert "auth" not in repr(spec.registry), "RegistrySpec never shows its auth"


def test_legacy_domain_scheme_tls_timeout_prefetch_variants(tmp_path: Path) -> None:
    import shutil

    from registry_server import make_self_signed_cert

    if not shutil.which("openssl"):
        pytest.fail("openssl not installed")
    ca, _ = make_self_signed_cert(tmp_path / "tls")
    entry = legacy()
    entry["domain_id"] = "shared-dom"
    backend = entry["config"]["backend_config"]
    backend.update(scheme="http", skip_verify=True, timeout=0, ca_cert_files=[str(ca), "/second/ignored.pem"],
                   auth="", proxy={"url": ""})
    entry["config"]["prefetch_config"] = {"enable": True, "threads_count": 1024, "bandwidth_rate": 1 << 20}
    spec = parse(entry).spec
    assert spec.domain == "shared-dom" and spec.volume == "shared-dom"
    assert spec.registry == RegistrySpec("registry.example:5000", "team/app", "http", None, str(ca), True, 60.0)
    assert spec.proxy is None, "an empty proxy url: no proxy"
    assert spec.prefetch == PrefetchSpec("table", 1 << 20), "enable without prefetch_all: the prefetch table"
    entry["config"]["prefetch_config"] = {"enable": False, "threads_count": 0, "prefetch_all": True}
    assert parse(entry).spec.prefetch == PrefetchSpec("none", 0), "threads are only checked when enabled"
    del entry["config"]["prefetch_config"]
    assert parse(entry).spec.prefetch == PrefetchSpec()
    entry["domain_id"] = ""
    assert parse(entry).spec.domain is None


def test_legacy_localfs_dir_and_blob_file(tmp_path: Path) -> None:
    entry = legacy(backend_type="localfs", backend_config={"dir": "/blobs", "blob_file": ""})
    spec = parse(entry).spec
    assert spec.blobs == Path("/blobs") and spec.registry is None and spec.proxy is None
    entry = legacy(backend_type="localfs", backend_config={"blob_file": "/blobs/abc", "alt_dirs": ["/x"]})
    bind = parse(entry)
    assert bind.spec.blobs == Path("/blobs") and "localfs.alt_dirs" in bind.ignored


def test_mountpoint_extension(tmp_path: Path) -> None:
    entry = legacy(backend_type="localfs", backend_config={"dir": "/blobs"})
    entry["mountpoint"] = str(tmp_path / "mnt")
    assert parse(entry).spec.mountpoint == tmp_path / "mnt"
    entry["mountpoint"] = "relative/mnt"
    refused(entry, "absolute")
    entry["mountpoint"] = str(tmp_path / "a,b")
    refused(entry, "','")
    entry["mountpoint"] = "/"
    refused(entry, "root directory")


def test_dragonfly_extension() -> None:
    entry = legacy()
    entry["dragonfly"] = "/run/df/dfdaemon.sock"
    spec = parse(entry).spec
    assert spec.dragonfly_socket == Path("/run/df/dfdaemon.sock") and spec.registry is not None
    assert parse(v2() | {"dragonfly": "/s.sock"}).spec.dragonfly_socket == Path("/s.sock")
    assert parse(legacy()).spec.dragonfly_socket is None
    for bad in ("relative.sock", "", 5, "/a\0b"):
        refused({**legacy(), "dragonfly": bad}, "absolute path of the dfdaemon's unix socket")
    refused({**legacy(backend_type="localfs", backend_config={"dir": "/blobs"}), "dragonfly": "/s.sock"},
            "fetches from a registry")


# -- config_v2 ----------------------------------------------------------------------------------
def test_v2_registry_entry_maps_every_field() -> None:
    bind = parse(v2())
    spec = bind.spec
    assert bind.form == "config_v2"
    assert (spec.fsid, spec.domain, spec.bootstrap) == ("img", "shared", Path("/m/image.boot"))
    assert spec.registry == RegistrySpec("reg.example", "library/python", "http", AUTH, None, True, 30.0)
    assert spec.proxy == ProxySpec("http://127.0.0.1:65001", None, 10.0, False, True)
    assert spec.prefetch == PrefetchSpec("table", 20 << 20)
    assert "cache.prefetch.batch_size" in bind.ignored


def test_v2_localfs_and_prefetch_all() -> None:
    entry = v2(backend={"type": "localfs", "localfs": {"dir": "/d"}})
    entry["config_v2"]["cache"]["prefetch"] = {"enable": True, "prefetch_all": True}
    spec = parse(entry).spec
    assert spec.blobs == Path("/d") and spec.registry is None
    assert spec.prefetch == PrefetchSpec("all", 0)


def test_v2_preferred_when_both_forms_are_given() -> None:
    entry = v2()
    entry["config"] = legacy()["config"]
    assert parse(entry).form == "config_v2"


def test_ref_extension_pulls_the_bootstrap() -> None:
    entry = legacy(metadata_path="")
    entry["ref"] = "registry.example:5000/team/app:v1"
    spec = parse(entry).spec
    assert spec.ref == "registry.example:5000/team/app:v1" and spec.bootstrap is None
    assert spec.registry == RegistrySpec("registry.example:5000", "team/app", "https", AUTH, None, False, 5.0)
    # without a backend: the reference's registry, https
    bare = {"type": "bootstrap", "id": "app", "ref": "reg.example/lib/app@sha256:" + "a" * 64,
            "config": {"cache_type": "fscache", "cache_config": {"work_dir": "/w"}}}
    spec = parse(bare).spec
    assert spec.registry == RegistrySpec("reg.example", "lib/app") and spec.blobs is None
    # the backend's host / repo filled from the reference
    entry = legacy(metadata_path="", backend_config={"scheme": "http"})
    entry["ref"] = "127.0.0.1:5000/x/y:1"
    assert parse(entry).spec.registry == RegistrySpec("127.0.0.1:5000", "x/y", "http")
    refused({**legacy(), "ref": "registry.example:5000/team/app:v1"}, "not both")
    refused({**legacy(metadata_path=""), "ref": "other.example/team/app:v1"}, "names host")
    refused({**legacy(metadata_path=""), "ref": "https://registry.example/a:1"}, "ref:")
    refused({**legacy(metadata_path=""), "ref": 5}, "image reference")
    entry = legacy(metadata_path="", backend_type="localfs", backend_config={"blob_file": "/b/x"})
    refused({**entry, "ref": "registry.example:5000/team/app:v1"}, "blob_file")


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id, match", [("a/b", "'/'"), ("a..b", "'..'"), ("a\0b", "NUL"), ("", "missing"),
                                           ("a b", "invalid id"), (7, "string")])
def test_ids_nydusd_rules_and_kernel_grammar(bad_id: Any, match: str) -> None:
    entry = legacy()
    entry["id"] = bad_id
    refused(entry, match)


@pytest.mark.parametrize("bad_domain, match", [("d/x", "'/'"), ("..", "'..'"), ("d,x", "invalid domain_id")])
def test_domain_id_rules(bad_domain: str, match: str) -> None:
    entry = legacy()
    entry["domain_id"] = bad_domain
    refused(entry, match)


def test_entry_shape_refusals() -> None:
    refused([], "JSON object")
    refused({**legacy(), "type": "something"}, "type")
    refused({**legacy(), "type": "datablob"}, "data blob", UnsupportedBind)
    entry = legacy()
    del entry["config"]
    refused(entry, "missing blob cache configuration")
    refused(legacy(cache_type="blobcache"), "cache type")
    refused(legacy(cache_config={"work_dir": ""}), "work_dir")
    refused(legacy(cache_config={}), "work_dir")
    refused(legacy(metadata_path=""), "metadata_path")
    refused(legacy(prefetch_config={"enable": True, "threads_count": 0}), "threads_count")
    refused(legacy(prefetch_config={"enable": True, "threads_count": 1025}), "1..1024")
    refused(legacy(prefetch_config={"enable": "yes"}), "enable")
    refused(legacy(prefetch_config={"enable": True, "threads_count": 4, "bandwidth_rate": -1}), "bandwidth_rate")
    refused(v2(version=1), "version")
    entry = v2()
    entry["config_v2"]["cache"]["prefetch"] = {"enable": True, "threads": 2000}
    refused(entry, "threads")


def test_backend_refusals() -> None:
    for backend, match in ((None, "backend type is missing"), ("ftp", "unsupported backend type")):
        refused(legacy(backend_type=backend), match)
    for kind in ("oss", "s3"):
        message = refused(legacy(backend_type=kind, backend_config={"endpoint": "e", "bucket_name": "b"}),
                          kind, UnsupportedBind)
        assert "not supported" in message
        assert UnsupportedBind.status == 501
    refused(v2(backend={"type": "oss", "oss": {"endpoint": "e"}}), "oss", UnsupportedBind)
    base = legacy()["config"]["backend_config"]
    refused(legacy(backend_config={**base, "host": ""}), "host")
    refused(legacy(backend_config={**base, "repo": ""}), "repo")
    refused(v2(backend={"type": "registry", "registry": {"host": "h"}}), "repo")
    refused(legacy(backend_type="localfs", backend_config={"dir": "", "blob_file": ""}), "blob_file")
    refused(legacy(backend_config={**base, "scheme": "ftp"}), "scheme")
    refused(legacy(backend_config={**base, "host": "https://reg"}), "without a scheme")
    refused(legacy(backend_config={**base, "repo": "Upper/Case"}), "repository")
    refused(legacy(backend_config={**base, "timeout": -1}), "timeout")
    refused(legacy(backend_config={**base, "skip_verify": "maybe"}), "skip_verify")
    refused(legacy(backend_config={**base, "ca_cert_files": ["/no/such/ca.pem"]}), "ca_file")
    refused(legacy(backend_config={**base, "proxy": {"url": "127.0.0.1:4001"}}), "proxy url")
    refused(legacy(backend_config={**base, "proxy": {**base["proxy"], "ping_url": "nope"}}), "ping_url")
    refused(legacy(backend_config={**base, "proxy": {**base["proxy"], "check_interval": 0}}), "check_interval")


def test_credentials_never_in_messages() -> None:
    base = legacy()["config"]["backend_config"]
    secret = "user:hunter2-not-base64!"
    message = refused(legacy(backend_config={**base, "auth": secret}), "auth")
    assert secret not in message and "hunter2" not in message
    with_creds = {**base, "proxy": {"url": "http://user:pw-in-url@proxy"}, "timeout": "soon"}
    message = refused(legacy(backend_config=with_creds), "timeout")
    assert "pw-in-url" not in message


# -- files: the metadata and a localfs blob_file -------------------------------------------------------
@pytest.fixture
def image(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.bin").write_bytes(os.urandom(100_000))
    convert(tree, tmp_path / "built", compressor="none")
    return tmp_path / "built"


def local_entry(built: Path, work: Path, **backend: Any) -> dict[str, Any]:
    return legacy(backend_type="localfs", backend_config=backend or {"dir": str(built / "blobs")},
                  cache_config={"work_dir": str(work)}, metadata_path=str(built / "image.boot"))


def test_metadata_path_checked_before_anything(image: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    spec = parse_bind_entry(local_entry(image, work)).spec
    assert spec.bootstrap == (image / "image.boot").resolve() and spec.blobs == image / "blobs"
    entry = local_entry(image, work)
    entry["config"]["metadata_path"] = str(tmp_path / "missing.boot")
    refused(entry, "is invalid: no such file", check_files=True)
    entry["config"]["metadata_path"] = str(tmp_path)
    refused(entry, "not a regular file", check_files=True)
    v5 = tmp_path / "v5.boot"
    v5.write_bytes(struct.pack("<II", 0x52414653, 0x500) + bytes(8192))
    entry["config"]["metadata_path"] = str(v5)
    refused(entry, "RAFSv5 image is not supported", check_files=True)
    junk = tmp_path / "junk.boot"
    junk.write_bytes(bytes(8192))
    entry["config"]["metadata_path"] = str(junk)
    refused(entry, "not a usable RAFS v6 bootstrap", check_files=True)
    (tmp_path / "file-not-dir").write_text("x")
    bad = local_entry(image, work)
    bad["config"]["cache_config"]["work_dir"] = str(tmp_path / "file-not-dir")
    refused(bad, "not a directory", check_files=True)


def test_localfs_blob_file_named_by_id_or_linked(image: Path, tmp_path: Path) -> None:
    blob_id = Bootstrap.open(image / "image.boot").blobs[0].blob_id
    work = tmp_path / "work"
    # named by its blob id: its directory serves it
    spec = parse_bind_entry(local_entry(image, work, blob_file=str(image / "blobs" / blob_id))).spec
    assert spec.blobs == (image / "blobs").resolve()
    # any other name: a link named by the blob id in the bind's work_dir
    other = tmp_path / "data.blob"
    os.link(image / "blobs" / blob_id, other)
    spec = parse_bind_entry(local_entry(image, work, blob_file=str(other))).spec
    assert spec.blobs == work / "fscached-blobs"
    link = work / "fscached-blobs" / blob_id
    assert link.is_symlink() and link.resolve() == other.resolve()
    refused(local_entry(image, work, blob_file=str(tmp_path / "nope.blob")), "not a regular file", check_files=True)


def test_localfs_blob_file_with_several_blobs_is_refused(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vm-tests"))
    from ocilayout import layer_tar, write_layout

    src = tmp_path / "src"
    for name in ("one", "two"):
        (src / name).mkdir(parents=True)
        (src / name / "f").write_bytes(os.urandom(50_000))
    layout = write_layout(tmp_path / "oci", [layer_tar(src, include={"one"}), layer_tar(src, include={"two"})])
    convert(layout, tmp_path / "built", compressor="none")
    boot = Bootstrap.open(tmp_path / "built" / "image.boot")
    assert len(boot.blobs) == 2
    entry = local_entry(tmp_path / "built", tmp_path / "w",
                        blob_file=str(tmp_path / "built" / "blobs" / boot.blobs[0].blob_id))
    refused(copy.deepcopy(entry), "names 2", check_files=True)
