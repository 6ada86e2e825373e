/* avx2 with its instruction set enabled for this file alone (one cffi extension, one set of flags) */
#pragma GCC target("avx2")
#include "blake3_avx2.c"
