"""Where cachefiles keeps an object on disk: the kernel's own names, recomputed in Python.

A cookie (volume key, cookie key) lives in `<cache dir>/cache/I<volume key>/@<xx>/<cooked key>`:

- the volume directory is "I" followed by the volume key as it is (erofs: `erofs,<domain or
  fsid>`), from fs/cachefiles/volume.c;
- `@<xx>` is one of 256 fan-out directories: the low byte of the cookie's hash, in two hex
  digits. The hash is fscache_hash (fs/netfs/fscache_main.c in 6.12, fs/fscache/main.c in 6.1)
  of the cookie key zero-padded to whole 32-bit words, salted with the volume's hash, which is
  fscache_hash (salt 0) of [length byte, volume key, NUL] zero-padded to whole words
  (fscache_volume.c / fscache_cookie.c);
- the file name is the cookie key "cooked" by fs/cachefiles/key.c: `D<key>` when every byte is
  printable (0x21-0x2e, 0x30-0x7f: no space, no '/'), else the shorter of big-endian (`S`) or
  little-endian (`T`) hex words (`S1,ff,` ...) when that is shorter than base64, else `E<pad>`
  followed by the kernel's own base64 (3 bytes little-endian -> 4 characters of
  "0-9a-zA-Z_-", low six bits first).

The `inuse` and `cull` commands of /dev/cachefiles take such a file name and resolve it in the
daemon's working directory (see cachefiles.device). Nothing here touches the filesystem.
"""
from __future__ import annotations

from pathlib import Path

GOLDEN_RATIO_32 = 0x61C88647
_MASK = 0xFFFFFFFF
NAME_MAX = 255
COOKIE_KEY_MAX = NAME_MAX - 3  # cachefiles refuses longer keys (BUG_ON in cachefiles_cook_key)
FANOUT_DIRS = 256
_CHARMAP = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-"
_PRINTABLE = frozenset(range(0x21, 0x2F)) | frozenset(range(0x30, 0x80))  # '!'..'.', '0'..DEL


def _rol32(word: int, shift: int) -> int:
    return ((word << shift) | (word >> (32 - shift))) & _MASK


def _hash_32(value: int) -> int:
    """The kernel's generic __hash_32 (x86 has no arch version): a multiply, modulo 2**32."""
    return (value * GOLDEN_RATIO_32) & _MASK


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def fscache_hash(salt: int, data: bytes) -> int:
    """fscache_hash(): `data` is read as little-endian 32-bit words (its length must be a
    multiple of 4), mixed into (x, y) with y starting at `salt`, then folded."""
    if len(data) % 4:
        raise ValueError(f"fscache_hash takes whole 32-bit words, not {len(data)} bytes")
    x, y = 0, salt & _MASK
    for i in range(0, len(data), 4):
        x ^= int.from_bytes(data[i:i + 4], "little")
        y ^= x
        x = _rol32(x, 7)
        x = (x + y) & _MASK
        y = _rol32(y, 20)
        y = (y * 9) & _MASK
    return _hash_32(y ^ _hash_32(x))


def _bytes(key: str | bytes, what: str) -> bytes:
    raw = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else bytes(key)
    if not raw:
        raise ValueError(f"empty {what}")
    return raw


def volume_hash(volume_key: str | bytes) -> int:
    """The volume cookie's key_hash: the key with its length in front and a NUL behind, padded."""
    raw = _bytes(volume_key, "volume key")
    if len(raw) > NAME_MAX:
        raise ValueError(f"volume key of {len(raw)} bytes: fscache takes at most {NAME_MAX}")
    return fscache_hash(0, _pad4(bytes([len(raw)]) + raw + b"\0"))


def cookie_hash(volume_key: str | bytes, cookie_key: bytes) -> int:
    """A cookie's key_hash: its key zero-padded to whole words, salted with the volume's hash."""
    raw = _bytes(cookie_key, "cookie key")
    if len(raw) > NAME_MAX:
        raise ValueError(f"cookie key of {len(raw)} bytes: fscache takes at most {NAME_MAX}")
    return fscache_hash(volume_hash(volume_key), _pad4(raw))


def fanout_name(volume_key: str | bytes, cookie_key: bytes) -> str:
    """`@xx`: the fan-out directory of the cookie inside its volume directory."""
    return f"@{cookie_hash(volume_key, cookie_key) & 0xFF:02x}"


def cook_key(cookie_key: bytes) -> str:
    """The object's file name, as cachefiles_cook_key() makes it."""
    key = _bytes(cookie_key, "cookie key")
    if len(key) > COOKIE_KEY_MAX:
        raise ValueError(f"cookie key of {len(key)} bytes: cachefiles takes at most {COOKIE_KEY_MAX}")
    if all(b in _PRINTABLE for b in key):
        return "D" + key.decode("ascii")
    words = _pad4(key)
    big = [int.from_bytes(words[i:i + 4], "big") for i in range(0, len(words), 4)]
    little = [int.from_bytes(words[i:i + 4], "little") for i in range(0, len(words), 4)]
    # each word costs a separator plus its hex digits (none for a zero word)
    n_big = sum(1 + _hex_digits(w) for w in big)
    n_little = sum(1 + _hex_digits(w) for w in little)
    groups = -(-len(key) // 3)
    b64_len = 2 + 4 * groups
    if n_big < b64_len or n_little < b64_len:
        chosen, first = (big, "S") if n_big <= n_little else (little, "T")
        return first + ",".join(f"{w:x}" if w else "" for w in chosen)
    pad = groups * 3 - len(key)
    out = ["E", chr(ord("0") + pad)]
    for i in range(0, len(key), 3):
        acc = int.from_bytes(key[i:i + 3], "little")
        for _ in range(4):
            out.append(_CHARMAP[acc & 63])
            acc >>= 6
    return "".join(out)


def _hex_digits(word: int) -> int:
    return len(f"{word:x}") if word else 0


def uncook_key(name: str) -> bytes:
    """The cookie key back from a file name (ValueError for a name cachefiles never makes).
    `S`/`T` names hold whole words: the key comes back zero-padded to a multiple of 4 bytes."""
    if len(name) < 2:
        raise ValueError(f"{name!r} is not a cachefiles object name")
    kind, body = name[0], name[1:]
    if kind == "D":
        raw = body.encode("ascii", "strict") if body.isascii() else b""
        if not raw or any(b not in _PRINTABLE for b in raw):
            raise ValueError(f"{name!r}: a D name holds printable ASCII only")
        return raw
    if kind in ("S", "T"):
        out = b""
        for part in body.split(","):
            if len(part) > 8 or (part and not all(c in "0123456789abcdef" for c in part)):
                raise ValueError(f"{name!r}: bad hex word {part!r}")
            word = int(part or "0", 16)
            out += word.to_bytes(4, "big") if kind == "S" else word.to_bytes(4, "little")
        return out
    if kind == "E":
        pad, chars = body[0], body[1:]
        if pad not in "012" or not chars or len(chars) % 4:
            raise ValueError(f"{name!r}: not the kernel's base64")
        out = b""
        for i in range(0, len(chars), 4):
            acc = 0
            for shift, c in enumerate(chars[i:i + 4]):
                index = _CHARMAP.find(c)
                if index < 0:
                    raise ValueError(f"{name!r}: {c!r} is not in the kernel's base64 alphabet")
                acc |= index << (6 * shift)
            if acc >> 24:
                raise ValueError(f"{name!r}: a group holds more than 3 bytes")
            out += acc.to_bytes(3, "little")
        return out[:len(out) - int(pad)] if pad != "0" else out
    raise ValueError(f"{name!r} is not a cachefiles object name (D, S, T or E)")


def check_volume_key(volume_key: str) -> str:
    """A volume key fit to name a directory: the kernel makes `I<key>` of it as it is."""
    raw = _bytes(volume_key, "volume key")
    if len(raw) + 1 > NAME_MAX or b"/" in raw or b"\0" in raw:
        raise ValueError(f"volume key {volume_key!r} cannot name a cache directory (no '/', no NUL, "
                         f"at most {NAME_MAX - 1} bytes)")
    return volume_key


def volume_dir_name(volume_key: str) -> str:
    return "I" + check_volume_key(volume_key)


def object_path(cache_dir: str | Path, volume_key: str, cookie_key: bytes) -> Path:
    """`<cache dir>/cache/I<volume key>/@<xx>/<cooked key>`: where the kernel links the object
    once its cookie is withdrawn (until then it is an unnamed tmpfile)."""
    return (Path(cache_dir) / "cache" / volume_dir_name(volume_key) / fanout_name(volume_key, cookie_key)
            / cook_key(cookie_key))
