/* avx512 with its instruction set enabled for this file alone (one cffi extension, one set of flags) */
#pragma GCC target("avx512f,avx512vl")
#include "blake3_avx512.c"
