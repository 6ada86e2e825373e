"""cffi build script (out-of-line API mode) for native._fscached_native.

Built by `pip install -e .` through setup.py's cffi_modules; run directly
(`python native/build_native.py`) to compile in place while developing.
"""
import glob
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

# BLAKE3's C implementation, not copied here: Debian's librust-blake3-dev (the Makefile's deps)
# ships the blake3 crate's sources, its c/ directory among them (1.3.1 on Debian 12).
BLAKE3_SOURCES = "/usr/share/cargo/registry/blake3-*/c"


def blake3_dir() -> str:
    found = sorted(d for d in glob.glob(BLAKE3_SOURCES) if os.path.exists(os.path.join(d, "blake3.h")))
    if not found:
        raise SystemExit(f"BLAKE3's C sources not found at {BLAKE3_SOURCES}: "
                         "install Debian's librust-blake3-dev (make deps does)")
    return found[-1]


ffibuilder = FFI()

# The declarations come from the header itself (one source of truth for C and cffi); cdef
# takes no preprocessor lines. API-mode calls release the GIL (cffi's default).
with open(os.path.join(_HERE, "fscached_native.h")) as header:
    ffibuilder.cdef("".join(line for line in header if not line.lstrip().startswith("#")))

# setuptools wants source paths relative to the project root (its working directory).
ffibuilder.set_source(
    "native._fscached_native",
    '#include "fscached_native.h"',
    sources=[os.path.join("native", name) for name in (
        "fscached_native.c", "fanotify_fast.c", "fill.c", "chunk_index.c",
        # BLAKE3 (Debian's copy, blake3_dir()): the portable code, the runtime dispatch and one
        # file per instruction set, each compiled with its own target (a pragma: one extension
        # has one set of flags); each a one-line unit here that includes the Debian file
        "blake3_unit.c", "blake3_dispatch_unit.c", "blake3_portable_unit.c",
        "blake3_sse2_target.c", "blake3_sse41_target.c", "blake3_avx2_target.c", "blake3_avx512_target.c")],
    include_dirs=["native", blake3_dir()],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    # Debian's libzstd-dev and liblz4-dev: the chunk decompressors of the fill core
    libraries=["pthread", "zstd", "lz4"],
)

if __name__ == "__main__":
    os.chdir(_ROOT)
    ffibuilder.compile(verbose=True)
