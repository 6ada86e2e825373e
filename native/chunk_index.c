/* A bootstrap's chunk table, checked and indexed in one pass without Python objects: every
 * entry checked as erofs_image.reader checks it, then sorted by (blob, uncompressed offset),
 * exact duplicates dropped, overlaps refused. The daemon maps the kernel's blob offsets to
 * chunks through this index; it never needs the directory tree. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "fscached_native.h"

#define ENTRY 80
#define MAX_CHUNK (16u << 20)
#define MAX_INDEX (1u << 24)

struct entry { /* RafsV5ChunkInfo, "<32sIIIIQQQII" */
    uint8_t digest[32];
    uint32_t blob_index, flags, compressed_size, uncompressed_size;
    uint64_t compressed_offset, uncompressed_offset, file_offset;
    uint32_t index, reserved;
};

static const uint8_t *g_table; /* qsort has no context argument */

static void load(const uint8_t *table, uint32_t i, struct entry *e)
{
    memcpy(e, table + (size_t)i * ENTRY, ENTRY);
}

static int by_blob_offset(const void *a, const void *b)
{
    struct entry x, y;
    load(g_table, *(const uint32_t *)a, &x);
    load(g_table, *(const uint32_t *)b, &y);
    if (x.blob_index != y.blob_index)
        return x.blob_index < y.blob_index ? -1 : 1;
    if (x.uncompressed_offset != y.uncompressed_offset)
        return x.uncompressed_offset < y.uncompressed_offset ? -1 : 1;
    return *(const uint32_t *)a < *(const uint32_t *)b ? -1 : 1;
}

int64_t fsc_chunk_index(const uint8_t *table, size_t n, const struct fsc_blob_limit *blobs,
                        size_t nblobs, uint32_t *order, uint64_t *starts, uint32_t *sizes,
                        uint64_t *blob_first, char *err, size_t errlen)
{
    if (n > UINT32_MAX) {
        snprintf(err, errlen, "chunk table of %zu entries is too large", n);
        return -EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        struct entry e;
        load(table, (uint32_t)i, &e);
        const char *what = NULL;
        if (e.blob_index >= nblobs) {
            snprintf(err, errlen, "chunk table entry %zu: blob index %u past the blob table (%zu blobs)", i,
                     e.blob_index, nblobs);
            return -EINVAL;
        }
        const struct fsc_blob_limit *b = &blobs[e.blob_index];
        uint32_t limit = b->chunk_size ? b->chunk_size : MAX_CHUNK;
        if (e.index >= MAX_INDEX)
            what = "chunk index does not fit 24 bits";
        else if (e.uncompressed_size == 0 || e.uncompressed_size > limit)
            what = "impossible uncompressed size";
        else if (e.compressed_size == 0 || e.compressed_size > MAX_CHUNK)
            what = "impossible compressed size";
        else if (!(e.flags & 1) && e.compressed_size != e.uncompressed_size)
            what = "stored uncompressed, but its stored size differs from its size";
        else if (e.uncompressed_offset % FSC_BLOCK)
            what = "uncompressed offset is not 4 KiB aligned";
        else if (e.uncompressed_offset + e.uncompressed_size > b->uncompressed_size
                 || e.uncompressed_offset + e.uncompressed_size < e.uncompressed_offset)
            what = "uncompressed bytes past the end of its blob";
        else if (b->compressed_size && (e.compressed_offset + e.compressed_size > b->compressed_size
                                        || e.compressed_offset + e.compressed_size < e.compressed_offset))
            what = "stored bytes past the end of its blob";
        if (what) {
            snprintf(err, errlen, "chunk table entry %zu (blob %u, offset %llu, %u bytes): %s", i, e.blob_index,
                     (unsigned long long)e.uncompressed_offset, e.uncompressed_size, what);
            return -EINVAL;
        }
        order[i] = (uint32_t)i;
    }
    g_table = table;
    qsort(order, n, sizeof(*order), by_blob_offset);
    size_t kept = 0;
    for (size_t b = 0; b <= nblobs; b++)
        blob_first[b] = 0;
    struct entry prev;
    int have = 0;
    for (size_t k = 0; k < n; k++) {
        struct entry e;
        load(table, order[k], &e);
        if (have && prev.blob_index == e.blob_index) {
            if (prev.uncompressed_offset == e.uncompressed_offset
                && prev.uncompressed_size == e.uncompressed_size && prev.compressed_offset == e.compressed_offset
                && prev.compressed_size == e.compressed_size && (prev.flags & 1) == (e.flags & 1)
                && !memcmp(prev.digest, e.digest, 32))
                continue; /* the same chunk listed twice */
            if (prev.uncompressed_offset + prev.uncompressed_size > e.uncompressed_offset) {
                snprintf(err, errlen, "blob %u: chunks overlap at uncompressed offset %llu", e.blob_index,
                         (unsigned long long)e.uncompressed_offset);
                return -EINVAL;
            }
        }
        order[kept] = order[k];
        starts[kept] = e.uncompressed_offset;
        sizes[kept] = e.uncompressed_size;
        blob_first[e.blob_index + 1] = kept + 1;
        kept++;
        prev = e;
        have = 1;
    }
    /* blob_first[b]..blob_first[b+1]: blob b's chunks (a blob without chunks: an empty range) */
    for (size_t b = 1; b <= nblobs; b++)
        if (blob_first[b] < blob_first[b - 1])
            blob_first[b] = blob_first[b - 1];
    return (int64_t)kept;
}

/* A read-only mapping of part of a file that holds no fd (Python's mmap keeps a dup of it). */
void *fsc_map(int fd, uint64_t offset, uint64_t length)
{
    void *p = mmap(NULL, length ? length : 1, PROT_READ, MAP_SHARED, fd, (off_t)offset);
    return p == MAP_FAILED ? NULL : p;
}

void fsc_unmap(void *p, uint64_t length)
{
    if (p)
        munmap(p, length ? length : 1);
}

void fsc_map_drop(void *p, uint64_t length)
{
    if (p && length)
        madvise(p, length, MADV_DONTNEED); /* clean file pages: out of our RSS, read again on use */
}
