"""Property: random trees survive writer -> reader unchanged."""
from __future__ import annotations

import stat

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_image.reader import Bootstrap
from erofs_image.tree import BlobInfo, ChunkRef, Image, Inode
from erofs_image.writer import build_bootstrap
from test_format_helpers import assert_same_tree

CS = 4096
BLOBS = [BlobInfo(f"{i:064x}", "none", CS, 64, 64 * CS, 64 * CS) for i in range(3)]
names = st.binary(min_size=1, max_size=40).filter(lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
xattr_names = st.builds(lambda p, s: p + s, st.sampled_from([b"user.", b"trusted.", b"security."]),
                        st.binary(min_size=1, max_size=20))
xattrs = st.dictionaries(xattr_names, st.binary(max_size=60), max_size=3)
meta = {"uid": st.integers(0, 100_000), "gid": st.integers(0, 100_000),
        "mtime": st.sampled_from([0, 1, 1_700_000_000]), "mtime_nsec": st.sampled_from([0, 7]),
        "xattrs": xattrs}


def _ref(b: int, i: int) -> ChunkRef:
    return ChunkRef(b, i * CS, CS, i * CS, CS, False, bytes([b, i]) * 16, i)


chunk = st.one_of(st.none(), st.builds(_ref, st.integers(0, 2), st.integers(0, 63)))
regs = st.builds(lambda cs, tail, m: Inode(mode=stat.S_IFREG | m, size=max(0, len(cs) * CS - tail) if cs else 0,
                                           chunks=cs),
                 st.lists(chunk, max_size=4), st.integers(0, CS - 1), st.integers(0, 0o7777))
leaves = st.one_of(
    regs,
    st.builds(lambda t: Inode(mode=stat.S_IFLNK | 0o777, target=t, size=len(t)), st.binary(min_size=1, max_size=5000)),
    st.builds(lambda m, r: Inode(mode=m | 0o600, rdev=r), st.sampled_from([stat.S_IFCHR, stat.S_IFBLK]),
              st.builds(lambda a, b: (a << 8) | (b & 0xFF) | ((b >> 8) << 20), st.integers(0, 4095), st.integers(0, 0xFFFFF))),
    st.builds(lambda m: Inode(mode=m | 0o644), st.sampled_from([stat.S_IFIFO, stat.S_IFSOCK])),
)


def _with_meta(node_st):
    return st.builds(lambda n, **m: (n.__dict__.update(m), n)[1], node_st, **meta)


trees = st.recursive(
    _with_meta(leaves),
    lambda kids: _with_meta(st.builds(lambda c: Inode(mode=stat.S_IFDIR | 0o755, children=c),
                                      st.dictionaries(names, kids, max_size=8))),
    max_leaves=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(names, trees, max_size=10), st.data())
def test_random_trees_round_trip(children, data) -> None:
    root = Inode(mode=stat.S_IFDIR | 0o755, children=children)
    # hard links: reuse some leaf objects under extra names
    leaves_found = [n for n in children.values() if not n.is_dir]
    for i, n in enumerate(leaves_found[:3]):
        if data.draw(st.booleans()):
            root.children[b"hardlink-%d" % i] = n
    img = Image(root=root, blobs=BLOBS, chunk_size=CS, build_time=1)
    b = Bootstrap.parse(build_bootstrap(img))
    assert_same_tree(img, b.image)
