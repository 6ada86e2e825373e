"""The shapes of the ids the daemon builds paths and keys from: check before use."""
from __future__ import annotations

import re

# a data blob: the sha256 hex of the blob file, the device tag the kernel asks for, a cache
# file's name
BLOB_ID = re.compile(r"[0-9a-f]{64}")
# an image's fsid / domain (nydusd's ids: never "/"; not starting with '.', ':' or '-'), 1-128 characters
FSID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")
# an OCI content digest
SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def is_blob_id(text: str) -> bool:
    return BLOB_ID.fullmatch(text) is not None
