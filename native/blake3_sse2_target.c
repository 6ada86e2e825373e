/* sse2 with its instruction set enabled for this file alone (one cffi extension, one set of flags) */
#pragma GCC target("sse2")
#include "blake3_sse2.c"
