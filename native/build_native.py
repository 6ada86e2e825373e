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
    sources=[os.path.join("native", "fscached_native.c")],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    os.chdir(_ROOT)
    ffibuilder.compile(verbose=True)
