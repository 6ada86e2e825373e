/* sse41 with its instruction set enabled for this file alone (one cffi extension, one set of flags) */
#pragma GCC target("sse4.1")
#include "blake3_sse41.c"
