/* BLAKE3 C sources from Debian's librust-blake3-dev (see build_native.py), one per unit */
#include "blake3_dispatch.c"
