"""The hand-over state (fscached.lifecycle.state, proto/fscached/handover/v1/handover.proto): what a
running daemon captures reads back field for field; an older state is read with defaults; a
newer one is refused, or its unknown fields are named; other bytes are refused in one line; no
credential ever shows in a repr, a str, an error or a log line."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import uvloop

from erofs_image.builder import convert
from erofs_image.reader import Bootstrap
from fscached.lifecycle import state as handover
from fscached.util import mounts
from fscached._proto.handover.v1 import handover_pb2 as pb
from fscached.config import Config, ImageSpec, PrefetchSpec, ProxySpec, RegistrySpec
from fscached.daemon import Daemon
from fscached.lifecycle.state import (FORMAT_VERSION, Bind, CachefilesInfo, FanotifyPointers, HandoverError,
                               HandoverState, encode, encode_specs, read_state)
from simdaemon import WORK_ROOT, Running, make_tree
from standins.kernel_simulator import KernelSimulator

PASSWORD = "s3cr3t-Pa55"
AUTH = base64.b64encode(f"robot:{PASSWORD}".encode()).decode()
PROXY_PASSWORD = "pr0xy-Pa55"
PROXY_URL = f"http://puser:{PROXY_PASSWORD}@127.0.0.1:9/"
CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
SECRETS = (PASSWORD, AUTH, PROXY_PASSWORD)


def no_secret_in(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a credential leaked into: {text[:300]}"


@pytest.fixture
def built(work: Path) -> Path:
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="zstd", chunk_size=64 << 10)
    return out


def every_kind(built: Path, work: Path) -> list[ImageSpec]:
    """Configured images of every kind: local with prefetch, a registry image with credentials,
    a Dragonfly peer and a proxy in one domain (sharing the blob), a mountpoint."""
    boot, blobs = built / "image.boot", built / "blobs"
    registry = RegistrySpec("registry.example:5000", "team/app", "https", AUTH, CA_FILE, True, 12.5)
    plain = RegistrySpec("registry.example:5000", "team/app", "http")
    return [
        ImageSpec("plain", boot, blobs, prefetch=PrefetchSpec("table", 4 << 20)),
        ImageSpec("fetched", boot, None, ref="registry.example:5000/team/app:v1", registry=registry),
        ImageSpec("peer", boot, None, domain="shared", registry=plain,
                  dragonfly_socket=Path("/run/dragonfly/dfdaemon.sock")),
        ImageSpec("proxied", boot, blobs, domain="shared", registry=plain,
                  proxy=ProxySpec(PROXY_URL, "http://127.0.0.1:9/healthy", 30.0, False, True),
                  prefetch=PrefetchSpec("all", 1 << 20), mountpoint=work / "mnt"),
    ]


@pytest.fixture
def fake_mounts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path, str]]:
    """mount(2) is not for the simulator's images: record the daemon's mounts instead."""
    done: list[tuple[str, Path, str]] = []
    monkeypatch.setattr(mounts, "mount_erofs",
                        lambda source, target, options: done.append((str(source), target, options)))
    monkeypatch.setattr(mounts, "unmount", lambda target: True)
    return done


def wait_serving(running: Running) -> None:
    deadline = time.monotonic() + 30
    while not running.daemon.serving:
        assert running.exit_code is None and time.monotonic() < deadline, "the daemon did not start serving"
        time.sleep(0.02)


def on_loop(running: Running, fn: Any) -> Any:
    """Call fn on the daemon's loop (capture reads what the loop changes)."""
    async def call() -> Any:
        return fn()
    return running.daemon.submit(call()).result(30)


def assert_every_field_set(specs: list[ImageSpec]) -> None:
    """Every field of ImageSpec and of the specs in it differs from its default in some image:
    a field added to ImageSpec fails here until the hand-over state carries it."""
    def check(cls: Any, values: list[Any]) -> None:
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else object()
            assert any(getattr(v, f.name) != default for v in values), f"{cls.__name__}.{f.name} never set"
    check(ImageSpec, specs)
    check(RegistrySpec, [s.registry for s in specs if s.registry])
    check(ProxySpec, [s.proxy for s in specs if s.proxy])
    check(PrefetchSpec, [s.prefetch for s in specs])


# -- a running daemon's state, field for field --------------------------------------------------
def test_capture_round_trips_every_field(built: Path, work: Path, fake_mounts: list[Any],
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    configured = every_kind(built, work)
    late = ImageSpec("late", built / "image.boot", built / "blobs", domain="shared",
                     prefetch=PrefetchSpec("table", 0), mountpoint=work / "mnt-late")
    boot = Bootstrap.open(built / "image.boot")
    with KernelSimulator(work / "kernel") as sim:
        running = Running(sim, configured, work / "cache")
        try:
            wait_serving(running)
            daemon = running.daemon
            daemon.submit(daemon.bind_image(late)).result(30)  # a bind at run time
            assert [m[1] for m in fake_mounts] == [work / "mnt", work / "mnt-late"]
            data = on_loop(running, lambda: daemon.capture_state())
            expected = on_loop(running, lambda: daemon.handover_state())
            state = read_state(data)
        finally:
            assert running.stop() == 0

    assert state == expected
    assert state.format_version == FORMAT_VERSION and state.unknown_fields == ()
    assert state.daemon_version and state.daemon_version == expected.daemon_version
    assert state.backend == "cachefiles"
    assert state.cache_dir == work / "cache" and state.work_dir == daemon.config.work_dir
    assert state.fd_names == (handover.FD_CACHEFILES,)
    assert state.cachefiles == CachefilesInfo(Path("/dev/cachefiles"), None) and state.fanotify is None
    # every image, configured and bound at run time, in bind order, with its whole spec
    assert state.images == (*configured, late)
    assert_every_field_set(list(state.images))
    assert state.run_time_images == (late,)
    assert [b.run_time for b in state.binds] == [False] * len(configured) + [True]
    assert {b.served_bootstrap for b in state.binds} == {built / "image.boot"}
    assert all(b.blob_ids == tuple(info.blob_id for info in boot.blobs) for b in state.binds)
    assert state.images[1].registry is not None and state.images[1].registry.auth == AUTH  # carried...
    # ...and never shown
    assert "hand-over state read: HandoverState(" in caplog.text  # the view is logged...
    no_secret_in(repr(state), str(state), *(repr(b) for b in state.binds), caplog.text,
                 *(r.getMessage() for r in caplog.records))  # ...without a credential
    assert "registry_auth=<given>" in repr(state) and "***@127.0.0.1:9" in repr(state)


def test_capture_takes_the_credentials_in_use(built: Path, work: Path) -> None:
    """Credentials renewed through the API (PUT /api/v1/config) live in the registry source, not
    in the spec: the state carries the renewed ones."""

    spec = every_kind(built, work)[1]
    renewed = base64.b64encode(b"robot:renewed-Pa55").decode()
    with KernelSimulator(work / "kernel") as sim:
        running = Running(sim, [spec], work / "cache")
        try:
            wait_serving(running)
            daemon = running.daemon
            assert read_state(on_loop(running, lambda: daemon.capture_state())).images[0].registry.auth == AUTH
            assert on_loop(running, lambda: daemon.renew_credentials(spec, renewed)) >= 1
            state = read_state(on_loop(running, lambda: daemon.capture_state()))
        finally:
            assert running.stop() == 0
    registry = state.images[0].registry
    assert registry is not None and registry.auth == renewed
    assert dataclasses.replace(state.images[0], registry=dataclasses.replace(registry, auth=AUTH)) == spec
    assert "renewed-Pa55" not in repr(state) and renewed not in repr(state)


def test_capture_of_an_image_pulled_at_run_time(built: Path, work: Path, auth_registry: Any) -> None:
    """A `ref` bound at run time from a registry with users: the state holds the ref, the
    credentials and the pulled bootstrap it served (a successor need not pull again)."""
    from registry_server import TEST_PASSWORD, TEST_USER

    if shutil.which("skopeo") is None:
        pytest.fail("skopeo not installed (make deps installs it)")
    index = json.loads((built / "oci" / "index.json").read_text())
    tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    push = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"--dest-creds={TEST_USER}:{TEST_PASSWORD}",
                           f"oci:{built / 'oci'}:{tag}", f"docker://{auth_registry.host}/handover/app:v1"],
                          capture_output=True, text=True, timeout=120)
    assert push.returncode == 0, push.stderr
    auth = base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode()
    host, _, repo = f"{auth_registry.host}/handover/app".partition("/")
    pulled = ImageSpec("pulled", None, None, ref=f"{auth_registry.host}/handover/app:v1",
                       registry=RegistrySpec(host, repo, "http", auth))
    with KernelSimulator(work / "kernel") as sim:
        running = Running(sim, [], work / "cache")
        try:
            running.daemon.config.work_dir = work / "state"
            wait_serving(running)
            running.daemon.submit(running.daemon.bind_image(pulled)).result(60)
            data = on_loop(running, lambda: running.daemon.capture_state())
        finally:
            assert running.stop() == 0
    state = read_state(data)
    (bind,) = state.binds
    assert bind.spec == pulled and bind.run_time
    assert bind.served_bootstrap is not None and bind.served_bootstrap.is_relative_to(work / "state")
    assert bind.served_bootstrap.read_bytes() == (built / "image.boot").read_bytes()
    assert TEST_PASSWORD not in repr(state) and auth not in repr(state)


# -- the fanotify path: its fds and filled-state pointers ---------------------------------------
@pytest.fixture
def fanotify_work() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("needs root (fanotify pre-content marks)")
    from fanotify.group import probe

    reason = probe(WORK_ROOT)
    if reason is not None:
        pytest.fail(f"no fanotify pre-content events here: {reason}")
    path = Path(tempfile.mkdtemp(prefix="fsh-", dir=WORK_ROOT))  # short: the keeper socket lives below
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_capture_on_the_fanotify_path(fanotify_work: Path) -> None:
    work = fanotify_work
    out = work / "built"
    convert(make_tree(work / "tree"), out, compressor="zstd", chunk_size=64 << 10)
    specs = [ImageSpec("one", out / "image.boot", out / "blobs"),
             ImageSpec("two", out / "image.boot", out / "blobs", domain="dom")]
    daemon = Daemon(Config(cache_dir=work / "cache", images=specs, kernel_path="fanotify"))
    loop_ready = threading.Event()
    result: list[int] = []

    async def main() -> int:
        await daemon.load()
        daemon.take_kernel_path()
        asyncio.get_running_loop().call_soon(loop_ready.set)
        return await daemon.run()

    thread = threading.Thread(target=lambda: result.append(uvloop.run(main())), daemon=True)
    thread.start()
    try:
        assert loop_ready.wait(30), "the daemon did not start"
        deadline = time.monotonic() + 30
        while not daemon.serving:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)

        async def take() -> bytes:
            return daemon.capture_state()
        state = read_state(daemon.submit(take()).result(30))
    finally:
        daemon.stop()
        thread.join(60)
    assert not thread.is_alive() and result == [0]
    blob_id = Bootstrap.open(out / "image.boot").blobs[0].blob_id
    assert state.backend == "fanotify" and state.cachefiles is None
    assert state.images == tuple(specs)
    assert state.fd_names == (handover.FD_FANOTIFY_GROUP, f"blob=one/{blob_id}", f"blob=dom/{blob_id}")
    state_dir = work / "cache" / ".fscached"
    assert state.fanotify == FanotifyPointers(state_dir, state_dir / "events.journal",
                                              state_dir / "verified-at-clean-stop.json", state_dir / "keeper.sock")
    assert state.fanotify.event_journal.exists()
    assert state.fanotify.clean_stop_record.exists(), "the clean stop wrote its record where the state points"


# -- without a daemon ---------------------------------------------------------------------------
def test_encode_specs_round_trip_and_paths_that_are_not_utf8(tmp_path: Path) -> None:
    odd = Path(os.fsdecode(b"/var/tmp/mnt-\xff\xfe"))
    specs = [ImageSpec("a", Path("/images/a/image.boot"), Path("/images/a/blobs"), mountpoint=odd),
             ImageSpec("b", None, None, ref="reg.example/r:t", registry=RegistrySpec("reg.example", "r"))]
    pointers = FanotifyPointers(tmp_path / ".fscached", tmp_path / "j", tmp_path / "r", tmp_path / "k")
    data = encode_specs("fanotify", specs, cache_dir=tmp_path, work_dir=tmp_path / "w", run_time=specs[1:],
                        fd_names=["fanotify-group", "blob:a/x"], fanotify=pointers,
                        served_bootstraps={"b": tmp_path / "w" / "b.boot"}, blob_ids={"a": ["x", "y"]},
                        daemon_version="9.9.9")
    state = read_state(data)
    assert state.images == tuple(specs) and state.images[0].mountpoint == odd
    assert state.run_time_images == (specs[1],)
    assert state.binds[1].served_bootstrap == tmp_path / "w" / "b.boot" and state.binds[0].blob_ids == ("x", "y")
    assert state.fanotify == pointers and state.fd_names == ("fanotify-group", "blob:a/x")
    assert state.daemon_version == "9.9.9"
    assert encode(state) == data


def test_refuses_what_has_no_hand_over_form(tmp_path: Path) -> None:
    with pytest.raises(HandoverError, match="backend 'auto'"):
        encode(HandoverState("auto", tmp_path))
    with pytest.raises(HandoverError, match="prefetch mode 'some'"):
        encode_specs("cachefiles", [ImageSpec("a", Path("/b"), Path("/c"), prefetch=PrefetchSpec("some"))],
                     cache_dir=tmp_path)


# -- an older writer ----------------------------------------------------------------------------
def older_state() -> bytes:
    """A state as a writer that knew fewer fields wrote it: no fd names, no pointers, no blob
    ids, no served bootstrap, none of the `optional` fields (timeout, check_interval, fallback)."""
    msg = pb.HandoverState(format_version=1, magic=handover.MAGIC, backend=pb.BACKEND_CACHEFILES,
                           cache_dir=b"/var/cache/fscached")
    image = msg.images.add(fsid="old", bootstrap=b"/images/old/image.boot", ref="")
    image.registry.host, image.registry.repo = "reg.example", "team/old"
    image.proxy.url = "http://127.0.0.1:65001"
    msg.images.add(fsid="local", bootstrap=b"/images/l/image.boot", blobs=b"/images/l/blobs")
    return bytes(msg.SerializeToString())


def test_an_older_state_reads_with_defaults(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    state = read_state(older_state())
    old, local = state.images
    assert old == ImageSpec("old", Path("/images/old/image.boot"), None,
                            registry=RegistrySpec("reg.example", "team/old"),  # https, 60 s
                            proxy=ProxySpec("http://127.0.0.1:65001"))  # 5 s, fallback on
    assert local == ImageSpec("local", Path("/images/l/image.boot"), Path("/images/l/blobs"))
    assert state.binds[0] == Bind(old)  # configured, no served bootstrap, no blob ids
    assert state.fd_names == () and state.fanotify is None and state.cachefiles is None
    assert state.work_dir is None and state.daemon_version == "" and state.unknown_fields == ()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_older_format_version_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once FORMAT_VERSION moves on, a state of an earlier format still reads."""
    monkeypatch.setattr(handover, "FORMAT_VERSION", FORMAT_VERSION + 1)
    state = read_state(older_state())
    assert state.format_version == 1 and [s.fsid for s in state.images] == ["old", "local"]


# -- a newer writer -----------------------------------------------------------------------------
def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def wire_field(number: int, payload: bytes | int) -> bytes:
    """One field in protobuf's wire format: a varint, or length-delimited bytes."""
    if isinstance(payload, int):
        return varint(number << 3 | 0) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_a_newer_format_is_refused_clearly() -> None:
    msg = pb.HandoverState.FromString(older_state())
    msg.format_version = FORMAT_VERSION + 1
    msg.daemon_version = "7.0.0"
    with pytest.raises(HandoverError) as err:
        read_state(msg.SerializeToString())
    text = str(err.value)
    assert f"format {FORMAT_VERSION + 1}" in text and f"format {FORMAT_VERSION}" in text
    assert "fscached 7.0.0" in text and "this daemon is older" in text and "\n" not in text


def test_unknown_fields_of_a_newer_writer_are_ignored_and_named(caplog: pytest.LogCaptureFixture) -> None:
    """Fields this daemon does not know (added by hand through the wire format: at the top, in
    an image, in its registry) are named by number in a warning, never their values."""
    state = pb.HandoverState.FromString(older_state())
    image = state.images[0]
    registry = bytes(image.registry.SerializeToString()) + wire_field(12, f"token {PASSWORD}".encode())
    image.ClearField("registry")
    image_bytes = bytes(image.SerializeToString()) + wire_field(20, registry) + wire_field(40, 3)
    del state.images[0]
    data = (bytes(state.SerializeToString()) + wire_field(10, image_bytes)
            + wire_field(99, 1) + wire_field(100, f"auth {AUTH}".encode()))
    caplog.set_level(logging.DEBUG)
    read = read_state(data)
    assert sorted(read.unknown_fields) == sorted(["HandoverState field 99", "HandoverState field 100",
                                                  "images[1] field 40", "images[1].registry field 12"])
    assert read.images[1].registry == RegistrySpec("reg.example", "team/old")  # the rest is read
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "4 field(s) this daemon does not know" in warnings[0]
    for name in read.unknown_fields:
        assert name in warnings[0]
    no_secret_in(caplog.text, repr(read))


@pytest.mark.parametrize("where, value, words", [
    ("backend", 7, "backend) value 7"),
    ("origin", 5, "origin value 5"),
    ("prefetch", 9, "prefetch mode value 9"),
])
def test_an_unknown_enum_value_is_refused(where: str, value: int, words: str) -> None:
    msg = pb.HandoverState.FromString(older_state())
    msg.daemon_version = "7.0.0"
    if where == "backend":
        msg.backend = value
    elif where == "origin":
        msg.images[0].origin = value
    else:
        msg.images[0].prefetch.mode = value
    with pytest.raises(HandoverError) as err:
        read_state(msg.SerializeToString())
    assert words in str(err.value) and "fscached 7.0.0, a newer daemon" in str(err.value)


# -- not a state --------------------------------------------------------------------------------
GARBAGE = {
    "empty": b"",
    "not protobuf": b"\xff\xff\xff\xff",
    "text": b"hello, not a state\n",
    "json": json.dumps({"format_version": 1}).encode(),
    "another message": bytes(pb.Prefetch(mode=1, bandwidth=5).SerializeToString()),
    "no marker": bytes(pb.HandoverState(format_version=1, backend=pb.BACKEND_FANOTIFY).SerializeToString()),
    "no version": bytes(pb.HandoverState(magic=handover.MAGIC, backend=pb.BACKEND_FANOTIFY).SerializeToString()),
    **{f"random {n}": random.Random(n).randbytes(n) for n in (16, 64, 4096)},
}


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_not_a_state(data: bytes) -> None:
    with pytest.raises(HandoverError) as err:
        read_state(data)
    assert str(err.value).startswith("not an fscached hand-over state") and "\n" not in str(err.value)


@pytest.mark.parametrize("change, words", [
    (lambda m: setattr(m.images[0], "fsid", "a/b"), "invalid fsid"),
    (lambda m: setattr(m.images[0].registry, "auth", f"not base64 {PASSWORD}"), "registry auth: not base64"),
    (lambda m: setattr(m.images[0].registry, "scheme", "ftp"), "neither http nor https"),
    (lambda m: m.images[1].ClearField("blobs"), "no blob source"),
    (lambda m: m.images[1].ClearField("bootstrap"), "neither a bootstrap nor a ref"),
    (lambda m: setattr(m.images[1], "fsid", "old"), "image old in volume old is bound twice"),
    (lambda m: m.ClearField("cache_dir"), "no cache dir"),
])
def test_a_state_that_does_not_hold_together(change: Any, words: str) -> None:
    msg = pb.HandoverState.FromString(older_state())
    change(msg)
    with pytest.raises(HandoverError) as err:
        read_state(msg.SerializeToString())
    assert words in str(err.value) and "\n" not in str(err.value)
    no_secret_in(str(err.value))


def test_one_fsid_in_two_volumes_is_two_images() -> None:
    msg = pb.HandoverState.FromString(older_state())
    msg.images[1].fsid, msg.images[1].domain = "old", "dom"
    assert [(s.volume, s.fsid) for s in read_state(msg.SerializeToString()).images] == [("old", "old"), ("dom", "old")]


def test_every_secret_in_the_schema_is_one_the_view_hides() -> None:
    """The fields marked [debug_redact = true] are the ones the no-leak tests above fill: a new
    secret in the .proto fails here until its tests (and _safe_spec_repr) cover it."""
    secret = []

    def walk(descriptor: Any) -> None:
        for f in descriptor.fields:
            if f.GetOptions().debug_redact:
                secret.append(f.full_name)
        for nested in descriptor.nested_types:
            walk(nested)
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        walk(message)
    assert secret == ["fscached.handover.v1.Registry.auth"]
