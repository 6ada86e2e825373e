"""One name for each fd that outlives a daemon, whoever carries it (the keeper, systemd's fd
store, nydus-snapshotter's supervisor) and in the hand-over state's `fd_names`.

    fanotify-group            the fanotify group (readers wait, never read holes, while it lives)
    cachefiles                the bound /dev/cachefiles fd
    state                     a memfd holding the hand-over state (keeper, systemd)
    blob=<volume>/<blob id>   a fanotify cache file's non-notifying write fd

Names follow systemd's FDNAME rules (at most 255 printable ASCII characters, no ':'), so one
name works for every carrier: ':' and '%' in a volume are written %3A and %25. Names written by
older daemons and keepers ("group", "blob:<volume>/<blob id>") are read as these.
"""
from __future__ import annotations

FANOTIFY_GROUP = "fanotify-group"
CACHEFILES = "cachefiles"
STATE = "state"
BLOB_PREFIX = "blob="
MAX_LENGTH = 255

_LEGACY_GROUP = "group"
_LEGACY_BLOB_PREFIX = "blob:"


def blob(volume: str, blob_id: str) -> str:
    """The name of a cache file's write fd."""
    return BLOB_PREFIX + volume.replace("%", "%25").replace(":", "%3A") + "/" + blob_id


def blob_key(name: str) -> str | None:
    """"<volume>/<blob id>" of a write fd's name (this scheme's or a legacy one); None when
    `name` names no cache file."""
    if name.startswith(BLOB_PREFIX):
        return name[len(BLOB_PREFIX):].replace("%3A", ":").replace("%25", "%")
    if name.startswith(_LEGACY_BLOB_PREFIX):
        return name[len(_LEGACY_BLOB_PREFIX):]
    return None


def normalize(name: str) -> str:
    """A name as this scheme writes it (legacy names translated)."""
    if name == _LEGACY_GROUP:
        return FANOTIFY_GROUP
    key = blob_key(name)
    if key is not None:
        volume, _, blob_id = key.rpartition("/")
        return blob(volume, blob_id)
    return name


def valid(name: str) -> bool:
    """Whether every carrier (systemd's store is the strictest) can carry an fd of this name."""
    return 0 < len(name) <= MAX_LENGTH and all(" " <= c < "\x7f" and c != ":" for c in name)
