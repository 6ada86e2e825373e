"""cffi build script (out-of-line API mode) for native._fscached_native.

Built by `pip install -e .` through setup.py's cffi_modules; run directly
(`python native/build_native.py`) to compile in place while developing.
"""
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

ffibuilder = FFI()

# Keep in step with fscached_native.h.  API-mode calls release the GIL (cffi's default).
ffibuilder.cdef(
    """
    struct fsc_range {
        uint64_t src_off;
        uint64_t dst_off;
        uint64_t len;
    };
    void *fsc_aligned_alloc(size_t size);
    void fsc_aligned_free(void *p);
    int64_t fsc_pwrite_full(int fd, const void *buf, uint64_t len, uint64_t off);
    int64_t fsc_pread_full(int fd, void *buf, uint64_t len, uint64_t off);
    int fsc_read_complete(int anon_fd, uint32_t msg_id);
    int64_t fsc_fs_type(const char *path);
    int64_t fsc_copy_range(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off,
                           uint64_t len);
    int64_t fsc_copy_ranges(int src_fd, int dst_fd, const struct fsc_range *ranges, size_t n,
                            size_t *n_done);
    """
)

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
