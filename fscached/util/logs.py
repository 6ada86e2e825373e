"""One logging set-up for the daemon's commands (`fscached`, `nydusd`), and the shape of the
lines about one kernel request.

`setup_logging(level, log_file=None)`:
- stderr is the journal (systemd sets `JOURNAL_STREAM=<dev>:<ino>` of the stream it gave us;
  it must match stderr, not merely be inherited): no timestamps (journald keeps its own), and
  every line starts with its syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>`
  debug), which journald turns into the entry's PRIORITY: `journalctl -p warning` works. A
  multi-line record (a traceback) carries the prefix on every line, each line being an entry.
- otherwise (a terminal, a pipe, a file): `2025-01-02 03:04:05,678 LEVEL logger: message`.
- `log_file`: the lines go to that file (appended, with timestamps) instead of stderr; with
  `rotation_mib` it is rotated at that size, keeping `backups` old files (nydusd's
  `--log-rotation-size`).

Lines about one request name it the same way on both kernel paths, first the kind of request,
then `req=` (cachefiles: `msg:<msg_id>`, fanotify: `fd:<event fd>`) and `blob=` (`<volume>/<blob
id>`, or `<volume>/<fsid>` for a bootstrap), then the rest:

    READ req=msg:17 blob=img1/5f0c...e2 off=0 len=4096 failed: every source failed: ...
    event req=fd:12 blob=img1/5f0c...e2 off=1048576 len=131072 failed: ...

`request_log(logger, kind, req, blob)` gives a logger that writes that prefix (and puts
`request_id` / `blob_id` on the record for structured handlers).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Any, Mapping, MutableMapping

OUR_HANDLER = "fscached"  # the handler setup_logging installs (replaced by the next call)
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(environ: Mapping[str, str] | None = None, stream: Any = None) -> bool:
    """True when stderr is the stream systemd connected to the journal (JOURNAL_STREAM names its
    device and inode; a child whose stderr was redirected inherits the variable, not the match)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """No timestamp; `<priority>` on every line of the record."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"log level {level!r}: use debug, info, warning or error") from None


def setup_logging(level: str | int = "info", log_file: str | os.PathLike[str] | None = None, *,
                  rotation_mib: int = 0, backups: int = 5) -> logging.Handler:
    """Configure the root logger for a command (idempotent: a second call replaces the handler
    the first one installed). Returns the handler. ValueError for an unknown level; OSError
    when the log file cannot be opened."""
    handler: logging.Handler
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        if rotation_mib > 0:
            handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=rotation_mib << 20,
                                                           backupCount=backups, encoding="utf-8")
        else:
            handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter() if stderr_is_journal() else logging.Formatter(PLAIN_FORMAT))
    handler.set_name(OUR_HANDLER)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == OUR_HANDLER:
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    return handler


class RequestLog(logging.LoggerAdapter[logging.Logger]):
    """Lines about one request: `<kind> req=<req> blob=<blob> <message>`."""

    def __init__(self, logger: logging.Logger, kind: str, req: str, blob: str) -> None:
        super().__init__(logger, {"request_id": req, "blob_id": blob})
        self.prefix = f"{kind} req={req} blob={blob}"

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return f"{self.prefix} {msg}", kwargs


def request_log(logger: logging.Logger, kind: str, req: str, blob: str) -> RequestLog:
    """A logger for the lines about one request; `req` is "msg:<id>" (cachefiles) or
    "fd:<event fd>" (fanotify), `blob` "<volume>/<blob id or fsid>"."""
    return RequestLog(logger, kind, req, blob)
