"""cffi build script (out-of-line API mode) for native._fscached_native.

Built by `pip install -e .` through setup.py's cffi_modules; run directly
(`python native/build_native.py`) to compile in place while developing.
"""
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

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
        # BLAKE3's C implementation (vendored from its 1.8.7 release, CC0 / Apache-2.0): the
        # portable code, the runtime dispatch and one file per instruction set, each compiled
        # with its own target (a pragma: one extension has one set of flags)
        "blake3/blake3.c", "blake3/blake3_dispatch.c", "blake3/blake3_portable.c",
        "blake3_sse2_target.c", "blake3_sse41_target.c", "blake3_avx2_target.c", "blake3_avx512_target.c")],
    include_dirs=["native", os.path.join("native", "blake3")],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    # Debian's libzstd-dev and liblz4-dev: the chunk decompressors of the fill core
    libraries=["pthread", "zstd", "lz4"],
)

if __name__ == "__main__":
    os.chdir(_ROOT)
    ffibuilder.compile(verbose=True)
