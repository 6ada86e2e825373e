"""cachefiles.naming: the kernel's names for cache objects (fscache_hash, cachefiles_cook_key).

Two kinds of known values: encodings worked out by hand from the rules of fs/cachefiles/key.c
(the comments show the arithmetic), and paths the real 6.12 and 6.1 kernels linked in the VM
test (vm-tests/test_vm_cull.py, which also compares every path it sees with this module).
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from cachefiles import naming

# Linked by the real kernels (6.12.95 and 6.1.192 under QEMU, vm-tests/test_vm_cull.py) after
# `mount -t erofs -o [domain_id=..,]fsid=..`, a read and an umount: (volume key, cookie key) -> path.
SNAPSHOT_ID = hashlib.sha256(b"nydus-snapshot-42").hexdigest()  # 98a7b6d1...
SEEN_IN_THE_KERNEL = {
    ("erofs," + SNAPSHOT_ID, SNAPSHOT_ID): f"cache/Ierofs,{SNAPSHOT_ID}/@5e/D{SNAPSHOT_ID}",
    ("erofs,dom", "img2"): "cache/Ierofs,dom/@3b/Dimg2",
}


def test_fscache_hash_of_nothing_is_zero() -> None:
    # no word mixed in: x = 0, y = salt = 0, and hash_32(0 ^ hash_32(0)) = 0
    assert naming.fscache_hash(0, b"") == 0


def test_fscache_hash_one_word_by_hand() -> None:
    # a = 1: x = 1, y = 1, x = rol32(1, 7) + 1 = 129, y = rol32(1, 20) * 9 = 0x900000
    # fold: hash_32(y ^ hash_32(x)) with hash_32(v) = v * 0x61C88647 mod 2**32
    x, y = 129, 0x900000
    folded = ((y ^ (x * 0x61C88647 % 2**32)) * 0x61C88647) % 2**32
    assert naming.fscache_hash(0, b"\x01\x00\x00\x00") == folded
    # the words are little-endian: the same bytes read as 0x01000000 give another hash
    assert naming.fscache_hash(0, b"\x00\x00\x00\x01") != folded


def test_fscache_hash_takes_whole_words_only() -> None:
    with pytest.raises(ValueError, match="whole 32-bit words"):
        naming.fscache_hash(0, b"abc")


def test_volume_hash_pads_length_key_and_nul() -> None:
    # "erofs,x" is 7 bytes: [7] + key + NUL = 9 bytes, padded with zeros to 12
    assert naming.volume_hash("erofs,x") == naming.fscache_hash(0, b"\x07erofs,x\x00\x00\x00\x00")
    # a key filling a word exactly still gets its NUL (and a fresh zero-padded word)
    assert naming.volume_hash("ab") == naming.fscache_hash(0, b"\x02ab\x00")
    assert naming.volume_hash("abc") == naming.fscache_hash(0, b"\x03abc\x00\x00\x00\x00")


def test_cookie_hash_is_salted_with_the_volume() -> None:
    salt = naming.volume_hash("erofs,v")
    assert naming.cookie_hash("erofs,v", b"abcde") == naming.fscache_hash(salt, b"abcde\x00\x00\x00")
    assert naming.cookie_hash("erofs,v", b"key") != naming.cookie_hash("erofs,w", b"key")


@pytest.mark.parametrize("key, name", [
    (b"img", "Dimg"),  # printable: as it is
    (b"!.~\x7f", "D!.~\x7f"),  # 0x21-0x2e and 0x30-0x7f count as printable (DEL too)
    (b"\x00\x00\x00\x01", "S1"),  # big-endian word 1: 'S' + "1" (2) beats base64 (2 + 4 = 6)
    (b"\x01\x00\x00\x00", "T1"),  # little-endian reads 1 (2 chars), big-endian 1000000 (8)
    (b"\x01", "T1"),  # padded to a word with zeros: the same as above
    (b"\x00" * 8, "S,"),  # zero words print nothing, only their separators
    (b"\x00\x00\x00\x0a\x00\x00\x01\x00", "Sa,100"),
    (b"\xff" * 6, "E0--------"),  # hex 18 (S) / 14 (T) vs base64 10: base64, every 6 bits 63 = '-'
    (b"a b", "E0x1yo"),  # 0x622061 -> 33 'x', 1 '1', 34 'y', 24 'o' (low six bits first)
    (b"a/b", "E0xZyo"),  # '/' is not printable: 0x622F61 -> 33 'x', 61 'Z', 34 'y', 24 'o'
])
def test_cook_key_by_hand(key: bytes, name: str) -> None:
    assert naming.cook_key(key) == name
    got = naming.uncook_key(name)
    assert got == key + b"\0" * (-len(key) % 4) if name[0] in "ST" else got == key


def test_base64_pad_digit_counts_missing_bytes() -> None:
    name = naming.cook_key(bytes(range(1, 20)))  # 19 bytes: 7 groups of 3, 2 bytes short
    assert name.startswith("E2") and len(name) == 2 + 7 * 4
    assert naming.uncook_key(name) == bytes(range(1, 20))


def test_uncook_round_trips_random_keys() -> None:
    rng = random.Random(6121)
    for _ in range(2000):
        key = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        name = naming.cook_key(key)
        assert "/" not in name and "\0" not in name and len(name) <= naming.NAME_MAX
        back = naming.uncook_key(name)
        assert back == key if name[0] in "DE" else back.rstrip(b"\0") == key.rstrip(b"\0"), (key, name)


@pytest.mark.parametrize("name", ["", "D", "Da b", "D\u00e9", "Sxyz", "S123456789", "E3abcd", "Eabc", "E0ab*d",
                                  "X12", "E0----" + "-" * 3])
def test_uncook_refuses_names_the_kernel_never_makes(name: str) -> None:
    with pytest.raises(ValueError):
        naming.uncook_key(name)


def test_keys_too_long_or_empty_are_refused() -> None:
    naming.cook_key(b"k" * naming.COOKIE_KEY_MAX)
    for bad in (b"", b"k" * (naming.COOKIE_KEY_MAX + 1)):
        with pytest.raises(ValueError):
            naming.cook_key(bad)
    with pytest.raises(ValueError):
        naming.volume_hash("v" * 256)


@pytest.mark.parametrize("volume", ["erofs,a/b", "erofs,\0", "", "x" * 255])
def test_volume_keys_that_cannot_name_a_directory(volume: str) -> None:
    with pytest.raises(ValueError):
        naming.volume_dir_name(volume)


def test_object_path_layout() -> None:
    path = naming.object_path("/c", "erofs,img", b"img")
    assert path.parent.parent == Path("/c/cache/Ierofs,img")
    assert path.parent.name == naming.fanout_name("erofs,img", b"img")
    assert path.name == "Dimg"
    assert path.parent.name.startswith("@") and len(path.parent.name) == 3


@pytest.mark.parametrize("volume, key", sorted(SEEN_IN_THE_KERNEL))
def test_paths_the_real_kernels_linked(volume: str, key: str) -> None:
    path = naming.object_path(Path("/c"), volume, key.encode())
    assert str(path.relative_to("/c")) == SEEN_IN_THE_KERNEL[(volume, key)]
