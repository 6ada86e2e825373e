"""fscached.util.logs: the journal is detected by JOURNAL_STREAM matching stderr (then no timestamps,
syslog priority prefixes), a log file gets timestamps, request lines carry req= and blob=."""
from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import pytest

from fscached.util.logs import parse_level, request_log, setup_logging, stderr_is_journal

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def fake_stderr(path: Path, monkeypatch: pytest.MonkeyPatch, *, journal: bool) -> None:
    stream = open(path, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", stream)
    st = os.fstat(stream.fileno())
    ino = st.st_ino if journal else st.st_ino + 1  # inherited from a parent, not this stream
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{ino}")


def emit() -> None:
    log = logging.getLogger("fscached.test")
    log.debug("not shown")
    log.info("serving %d image(s)", 2)
    log.warning("careful")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    for handler in logging.getLogger().handlers:
        handler.flush()


def test_journal_lines_carry_a_priority_and_no_timestamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "stderr"
    fake_stderr(out, monkeypatch, journal=True)
    assert stderr_is_journal()
    setup_logging("info")
    emit()
    lines = out.read_text().splitlines()
    assert lines[0] == "<6>INFO fscached.test: serving 2 image(s)"
    assert lines[1] == "<4>WARNING fscached.test: careful"
    assert lines[2] == "<3>ERROR fscached.test: it failed"
    assert lines[3] == "<3>Traceback (most recent call last):"
    assert all(line.startswith("<3>") for line in lines[2:]), lines  # each line an entry: all errors
    assert lines[-1] == "<3>ValueError: boom"


def test_terminal_lines_have_timestamps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "stderr"
    fake_stderr(out, monkeypatch, journal=False)
    assert not stderr_is_journal()
    setup_logging("warning")
    emit()
    lines = out.read_text().splitlines()
    assert STAMP.match(lines[0]) and lines[0].endswith(" WARNING fscached.test: careful"), lines
    assert "serving" not in out.read_text()


@pytest.mark.parametrize("value", ["", "garbage", "1:", ":2", "a:b"])
def test_journal_stream_must_name_stderr(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", value)
    assert not stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stderr_is_journal()


def test_log_file_and_idempotence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_stderr(tmp_path / "stderr", monkeypatch, journal=True)
    log_file = tmp_path / "logs" / "fscached.log"
    setup_logging("debug", log_file)
    setup_logging("debug", log_file)  # replaces its own handler: each line once
    emit()
    lines = log_file.read_text().splitlines()
    assert STAMP.match(lines[0]) and lines[0].endswith(" DEBUG fscached.test: not shown"), lines
    assert sum("careful" in line for line in lines) == 1
    assert (tmp_path / "stderr").read_text() == ""  # a log file instead of stderr, even the journal


def test_log_file_rotation(tmp_path: Path) -> None:
    log_file = tmp_path / "nydusd.log"
    handler = setup_logging("info", log_file, rotation_mib=1, backups=2)
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    log = logging.getLogger("fscached.test")
    for i in range(3000):
        log.info("line %d %s", i, "x" * 1000)
    handler.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nydusd.log", "nydusd.log.1", "nydusd.log.2"]
    assert log_file.stat().st_size <= 1 << 20


def test_levels() -> None:
    assert parse_level("INFO") == logging.INFO and parse_level("warn") == logging.WARNING
    assert parse_level(logging.DEBUG) == logging.DEBUG
    with pytest.raises(ValueError, match="log level 'loud'"):
        parse_level("loud")


def test_request_lines_name_the_request_and_the_blob(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log = logging.getLogger("fscached.frontends.cachefiles")
    request_log(log, "READ", "msg:17", "img1/" + "ab" * 32).error("off=%d len=%d failed: %s", 0, 4096, "no source")
    record = caplog.records[-1]
    assert record.getMessage() == f"READ req=msg:17 blob=img1/{'ab' * 32} off=0 len=4096 failed: no source"
    assert (record.request_id, record.blob_id) == ("msg:17", "img1/" + "ab" * 32)  # type: ignore[attr-defined]
