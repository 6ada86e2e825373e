"""Fuzz the bootstrap reader: mutated real bootstraps (the nydus fixture, one built by
convert(), one by the writer with every inode kind) and random bytes.

Every example must either open and walk completely (every inode, every chunk ref checked
against its blob) or raise BootstrapError, never another exception, and never by way of the
reader's catch-all for a check it is missing (so the fuzzer still sees missing checks). Each
example is bounded in CPU time (a SIGVTALRM timer: a loop that does not terminate fails) and in
memory (tracemalloc peak). A seeded batch also runs in a child process under RLIMIT_AS, so an
allocation the tracer cannot see (C code, a huge bytes object) fails it as well.

The mutations are field-aware: besides bit flips, truncations and splices they write boundary
values and other inodes' nids into the exact fields a valid image has (superblock, extended
superblock, device / blob / chunk / prefetch tables, inode fields, xattr headers, chunk indexes,
dirents), which is what reaches the tree walk's checks rather than stopping at the checksum.
"""
from __future__ import annotations

import os
import random
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from functools import cache
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_image import layout as L
from erofs_image.builder import convert
from erofs_image.reader import Bootstrap, BootstrapError
from erofs_image.tree import BlobInfo, ChunkRef, Image, Inode, lookup
from erofs_image.writer import build_bootstrap

from test_format_helpers import FIXTURE_DIR

HERE = Path(__file__).resolve().parent

BS = L.BLOCK_SIZE
CPU_SECONDS_PER_EXAMPLE = 3.0
PEAK_BYTES_PER_EXAMPLE = 16 << 20
FUZZ = settings(max_examples=1000, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


# --------------------------------------------------------------------------- seeds
def _writer_image() -> bytes:
    """Every inode kind the writer makes, two blobs, deep nesting, a FLAT_PLAIN symlink."""
    cs = 4096
    blobs = [BlobInfo(f"{i:064x}", "none", cs, 8, 8 * cs, 8 * cs) for i in range(2)]

    def ref(b: int, i: int) -> ChunkRef:
        return ChunkRef(b, i * cs, cs, i * cs, cs, False, bytes([b, i]) * 16, i)

    leaf = Inode(mode=stat.S_IFREG | 0o644, size=3 * cs - 5, chunks=[ref(0, 1), None, ref(1, 2)],
                 xattrs={b"user.a": b"1", b"trusted.b": b"2" * 40})
    deep = node = Inode(mode=stat.S_IFDIR | 0o755)
    for i in range(12):
        node.children[b"l%d" % i] = node = Inode(mode=stat.S_IFDIR | 0o755)
    node.children[b"leaf"] = leaf
    root = Inode(mode=stat.S_IFDIR | 0o755, xattrs={b"security.selinux": b"ctx"}, children={
        b"deep": deep, b"link": leaf,
        b"longsym": Inode(mode=stat.S_IFLNK | 0o777, target=b"t/" * 2100, size=4200),
        b"sym": Inode(mode=stat.S_IFLNK | 0o777, target=b"deep/l0", size=7),
        b"chr": Inode(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(1, 3)),
        b"sock": Inode(mode=stat.S_IFSOCK | 0o600), b"empty": Inode(mode=stat.S_IFREG),
        b"f2": Inode(mode=stat.S_IFREG | 0o600, size=cs * 2, chunks=[ref(1, 7), ref(0, 1)], uid=70000),
    })
    img = Image(root=root, blobs=blobs, chunk_size=cs, build_time=5, prefetch=[b"/link", b"/deep/l0"])
    return build_bootstrap(img)


def _converted_image(tmp: Path) -> bytes:
    src = tmp / "src"
    (src / "d/e").mkdir(parents=True)
    (src / "d/e/f").write_bytes(os.urandom(5 * 4096 + 7))
    (src / "small").write_bytes(b"x" * 100)
    os.link(src / "small", src / "d/hard")
    os.symlink("d/e/f", src / "sym")
    os.mkfifo(src / "fifo")
    (src / "many").mkdir()  # a directory of more than one block
    for i in range(150):
        (src / "many" / f"n{i:03d}-{'y' * 20}").write_bytes(b"")
    try:
        os.setxattr(src / "small", "user.k", b"v" * 30)
    except OSError:
        pass
    convert(src, tmp / "out", compressor="zstd", chunk_size=4096, progress=False,
            prefetch=["/small", "/d/e/f"])
    return (tmp / "out/image.boot").read_bytes()


@cache
def seeds() -> dict[str, bytes]:
    out = {}
    fixture = FIXTURE_DIR / "rafs-v6-2.2.boot"
    if fixture.exists():
        out["nydus"] = fixture.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        out["built"] = _converted_image(Path(tmp))
    out["writer"] = _writer_image()
    return out


def _fields(data: bytes) -> tuple[list[tuple[int, int]], list[int]]:
    """(offset, width) of every structure field in a valid bootstrap, and its nids."""
    b = Bootstrap.parse(data)
    sb, ext = L.SUPER_OFFSET, 1152
    out = [(sb + o, w) for o, w in [(0, 4), (8, 4), (12, 1), (14, 2), (16, 8), (36, 4), (40, 4),
                                    (44, 4), (80, 4), (86, 2), (88, 2), (90, 1)]]
    out += [(ext + o, w) for o, w in [(8, 8), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 4)]]
    for i in range(len(b.devices)):
        base = b.superblock.devt_slotoff * 128 + 128 * i
        out += [(base, 1), (base + 63, 1), (base + 64, 4), (base + 68, 4)]
    for i in range(len(b.blobs)):
        base = b.ext.blob_table_offset + 256 * i
        out += [(base + o, w) for o, w in [(0, 1), (64, 4), (68, 4), (72, 4), (76, 4), (80, 4), (88, 8),
                                           (96, 8), (112, 8), (120, 8), (128, 8)]]
    for i in range(len(b.chunk_table)):
        base = b.ext.chunk_table_offset + 80 * i
        out += [(base + o, w) for o, w in [(32, 4), (36, 4), (40, 4), (44, 4), (48, 8), (56, 8), (72, 4)]]
    out += [(b.ext.prefetch_table_offset + 4 * i, 4) for i in range(b.ext.prefetch_table_size // 4)]
    meta = b.superblock.meta_blkaddr * BS
    nids: set[int] = set()
    stack = [b.image.root]
    while stack:
        n = stack.pop()
        if n.nid in nids:
            continue
        nids.add(n.nid)
        off = meta + L.ISLOT_SIZE * n.nid
        di = L.DiskInode.unpack(data, off)
        out += [(off, 2), (off + 2, 2), (off + 4, 2), (off + 8, 8 if di.extended else 4), (off + 16, 4)]
        if di.xattr_icount:
            x = off + di.isize
            out += [(x + 4, 1)] + [(x + 12 + k, 1) for k in range(0, min(di.xattr_size - 12, 48), 2)]
        if n.is_reg and n.chunks:
            at = (off + di.isize + di.xattr_size + 7) // 8 * 8
            for k in range(len(n.chunks)):
                out += [(at + 8 * k, 2), (at + 8 * k + 2, 2), (at + 8 * k + 4, 4)]
        if n.is_dir:
            if di.layout == L.LAYOUT_FLAT_INLINE and di.size < BS:
                start = off + di.isize + di.xattr_size
            else:
                start = di.i_u * BS
            count = struct.unpack_from("<H", data, start + 8)[0] // L.DIRENT_SIZE
            for k in range(count):
                out += [(start + 12 * k, 8), (start + 12 * k + 8, 2), (start + 12 * k + 10, 1)]
            stack.extend(n.children.values())
    return out, sorted(nids)


@cache
def fields(name: str) -> tuple[list[tuple[int, int]], list[int]]:
    return _fields(seeds()[name])


def special_values(width: int, size: int, nids: list[int]) -> list[int]:
    """Boundary values for a field of `width` bytes, plus (for nid-sized fields) real nids."""
    top = (1 << (8 * width)) - 1
    choices = [0, 1, 2, 3, 0x7F, 0xFF, top, top - 1, 1 << (8 * width - 1), size, size // BS,
               size // BS + 1, size // L.ISLOT_SIZE, BS, BS + 1, 12, 24, 80, 256]
    if width >= 2:
        choices += nids
    return sorted({v & top for v in choices})


# --------------------------------------------------------------------------- mutations
def apply_ops(data: bytes, ops: list[tuple], fix_checksum: bool) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if not buf:
            break
        if kind == "field":
            _, off, width, value = op
            if off + width <= len(buf):
                buf[off:off + width] = value.to_bytes(width, "little")
        elif kind == "flip":
            _, off, bit = op
            buf[off % len(buf)] ^= 1 << bit
        elif kind == "truncate":
            del buf[op[1] % (len(buf) + 1):]
        elif kind == "splice":  # bytes of another seed (or this one) over these
            _, dst, src_name, src, length = op
            other = seeds()[src_name]
            src %= len(other)
            dst %= len(buf)
            buf[dst:dst + length] = other[src:src + length]
        elif kind == "insert":
            _, off, raw = op
            buf[off % (len(buf) + 1):off % (len(buf) + 1)] = raw
        elif kind == "delete":
            _, off, length = op
            del buf[off % len(buf):off % len(buf) + length]
        elif kind == "bytes":
            _, off, raw = op
            off %= len(buf)
            buf[off:off + len(raw)] = raw
    if fix_checksum and len(buf) >= BS and struct.unpack_from("<I", buf, L.SUPER_OFFSET + 8)[0] & 1:
        struct.pack_into("<I", buf, L.SUPER_OFFSET + 4, L.superblock_checksum(bytes(buf[:BS])))
    return bytes(buf)


def random_ops(rng: random.Random, name: str) -> list[tuple]:
    """The same mutation mix as the hypothesis strategy, from a seeded PRNG (for the batch)."""
    data = seeds()[name]
    offsets, nids = fields(name)
    ops: list[tuple] = []
    for _ in range(rng.randint(1, 5)):
        r = rng.random()
        if r < 0.6:
            off, width = rng.choice(offsets)
            value = (rng.choice(special_values(width, len(data), nids)) if rng.random() < 0.8
                     else rng.getrandbits(8 * width))
            ops.append(("field", off, width, value))
        elif r < 0.75:
            ops.append(("flip", rng.randrange(len(data)), rng.randrange(8)))
        elif r < 0.82:
            ops.append(("truncate", rng.randrange(len(data) + 1)))
        elif r < 0.9:
            ops.append(("splice", rng.randrange(len(data)), rng.choice(sorted(seeds())),
                        rng.randrange(1 << 16), rng.randint(1, 512)))
        elif r < 0.95:
            ops.append(("insert" if rng.random() < 0.5 else "delete", rng.randrange(len(data)),
                        rng.randbytes(rng.randint(1, 64))))
        else:
            ops.append(("bytes", rng.randrange(len(data)), rng.randbytes(rng.randint(1, 64))))
    return [op if op[0] != "delete" else ("delete", op[1], len(op[2])) for op in ops]


@st.composite
def mutated(draw) -> bytes:
    name = draw(st.sampled_from(sorted(seeds())))
    data = seeds()[name]
    offsets, nids = fields(name)
    n = len(data)

    def field_op(ow: tuple[int, int]):
        off, width = ow
        value = st.one_of(st.sampled_from(special_values(width, n, nids)),
                          st.integers(0, (1 << (8 * width)) - 1))
        return st.tuples(st.just("field"), st.just(off), st.just(width), value)

    field = st.sampled_from(offsets).flatmap(field_op)
    op = st.one_of(
        field, field, field,
        st.tuples(st.just("flip"), st.integers(0, n - 1), st.integers(0, 7)),
        st.tuples(st.just("truncate"), st.integers(0, n)),
        st.tuples(st.just("splice"), st.integers(0, n - 1), st.sampled_from(sorted(seeds())),
                  st.integers(0, 1 << 16), st.integers(1, 512)),
        st.tuples(st.just("insert"), st.integers(0, n), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), st.integers(0, n - 1), st.integers(1, 256)),
        st.tuples(st.just("bytes"), st.integers(0, n - 1), st.binary(min_size=1, max_size=64)),
    )
    ops = draw(st.lists(op, min_size=1, max_size=5))
    return apply_ops(data, ops, draw(st.sampled_from([True, True, True, False])))  # mostly past the checksum


# --------------------------------------------------------------------------- one example
class Hang(Exception):
    pass


def _on_timer(signum, frame):
    raise Hang(f"more than {CPU_SECONDS_PER_EXAMPLE} s of CPU")


def walk_all(b: Bootstrap) -> int:
    """Visit every inode (iteratively: a corrupt image could be deep) and every chunk ref."""
    count = 0
    seen: set[int] = set()
    stack: list[tuple[bytes, Inode]] = [(b"/", b.image.root)]
    while stack:
        path, node = stack.pop()
        if id(node) in seen:
            assert not node.is_dir, f"{path!r}: directory reached twice"
            continue
        seen.add(id(node))
        count += 1
        assert stat.S_IFMT(node.mode) in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR,
                                          stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
        if node.is_reg:
            for ref in node.chunks:
                if ref is None:
                    continue
                blob = b.blobs[ref.blob_index]
                assert 0 < ref.uncompressed_size <= 16 << 20 and 0 < ref.compressed_size <= 16 << 20
                assert ref.uncompressed_offset + ref.uncompressed_size <= blob.uncompressed_size
                assert not blob.compressed_size or ref.compressed_offset + ref.compressed_size <= blob.compressed_size
                assert ref.compressed or blob.compressor == "none" or ref.compressed_size == ref.uncompressed_size
        elif node.is_symlink:
            assert len(node.target) == node.size
        for name, child in node.children.items():
            assert name and len(name) <= 255 and b"/" not in name and b"\0" not in name
            assert name not in (b".", b"..")
            stack.append(((path.rstrip(b"/") + b"/" + name), child))
    for p in b.image.prefetch:
        lookup(b.image.root, p)
    assert len(set(b.prefetch_nids)) == len(b.prefetch_nids)
    return count


def check(data: bytes, path: Path | None = None, peak_limit: int | None = PEAK_BYTES_PER_EXAMPLE) -> str:
    """Open (from `path` when given, else from memory) and walk; 'ok' or the error message."""
    old = signal.signal(signal.SIGVTALRM, _on_timer)
    signal.setitimer(signal.ITIMER_VIRTUAL, CPU_SECONDS_PER_EXAMPLE)
    if peak_limit:
        tracemalloc.start()
    try:
        if path is not None:
            path.write_bytes(data)
            b = Bootstrap.open(path)
        else:
            b = Bootstrap.parse(data)
        walk_all(b)
        result = "ok"
    except BootstrapError as e:
        cause = e.__cause__
        assert cause is None or isinstance(cause, ValueError), \
            f"the reader's catch-all caught {type(cause).__name__}: a check is missing: {e}"
        assert "\n" not in str(e)
        result = str(e)
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)
        if peak_limit:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    if peak_limit:
        assert peak < peak_limit, f"{peak} bytes allocated for a {len(data)}-byte bootstrap"
    return result


# --------------------------------------------------------------------------- tests
def test_seeds_open_and_walk() -> None:
    for name, data in seeds().items():
        assert check(data) == "ok", name
        assert fields(name)[0]


@FUZZ
@given(mutated())
def test_fuzz_mutated_bootstraps(data: bytes) -> None:
    check(data)


@settings(FUZZ, max_examples=400)
@given(st.binary(max_size=3 * BS))
def test_fuzz_random_bytes(data: bytes) -> None:
    check(data)


@settings(FUZZ, max_examples=600)
@given(st.sampled_from(["nydus", "built", "writer"]), st.binary(min_size=1, max_size=6 * BS),
       st.booleans())
def test_fuzz_valid_superblock_random_rest(name: str, rest: bytes, keep_tables: bool) -> None:
    """A valid block 0 (superblock, tables) followed by random bytes: the walk starts at once."""
    data = seeds().get(name) or seeds()["built"]
    head = data[:2 * BS if keep_tables else BS]
    check(head + rest)


def test_fuzz_through_open(tmp_path) -> None:
    """Bootstrap.open (the file path) on a few hundred mutants: the same contract."""
    rng = random.Random(1234)
    p = tmp_path / "fuzz.boot"
    names = sorted(seeds())
    for _ in range(300):
        name = rng.choice(names)
        check(apply_ops(seeds()[name], random_ops(rng, name), rng.random() < 0.9), path=p)


BATCH = textwrap.dedent("""
    import random, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    sys.path.insert(0, {here!r})
    import test_reader_fuzz as F
    rng = random.Random({seed})
    names = sorted(F.seeds())
    for name in names:
        F.fields(name)
    outcomes = {{}}
    t = time.monotonic()
    for i in range({n}):
        name = names[i % len(names)]
        data = F.apply_ops(F.seeds()[name], F.random_ops(rng, name), rng.random() < 0.9)
        r = F.check(data, peak_limit=None)
        key = "ok" if r == "ok" else "error"
        outcomes[key] = outcomes.get(key, 0) + 1
    print(outcomes, round(time.monotonic() - t, 1))
""")


def test_fuzz_batch_under_an_address_space_limit(tmp_path) -> None:
    """Thousands of mutants in a child process limited to 768 MiB of address space (the
    interpreter itself takes ~50 MiB): any runaway allocation is a MemoryError there."""
    seed = int.from_bytes(os.urandom(4), "little")
    code = BATCH.format(limit=768 << 20, here=str(HERE), seed=seed, n=5000)
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=HERE.parents[1])
    assert r.returncode == 0, f"batch seed {seed}:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert "'ok'" in r.stdout and "'error'" in r.stdout, r.stdout
    assert time.monotonic() - t < 120
