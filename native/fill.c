/* The fill of one run of chunks in one call, without the GIL: read the run's stored bytes (from
 * a local blob fd, or a buffer a source received), decompress each chunk (zstd, lz4 block, or
 * none), check its size and blake3 digest, and only when EVERY chunk of the run matches, write
 * them into the cache fd at their uncompressed offsets. A run that fails writes nothing: the
 * caller learns which chunk failed and why (-EBADMSG: bad bytes; other -errno: I/O).
 *
 * Buffers are per thread and reused (a fresh one costs more in page faults than the copy into
 * it); a buffer larger than FILL_KEEP is freed after the call, so idle workers hold little. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include <lz4.h>
#include <zstd.h>

#include "blake3.h"
#include "fscached_native.h"

int64_t fsc_pwritev_full(int fd, struct iovec *iov, int cnt, uint64_t len, uint64_t off);

#define FILL_KEEP (16u << 20)
#define FILL_HUGE ((size_t)2 << 20) /* a transparent huge page */

struct tbuf {
    char *p;
    size_t cap;
};

static __thread struct tbuf t_src, t_out;
static __thread ZSTD_DCtx *t_zstd;

static char *tbuf_get(struct tbuf *b, size_t size)
{
    if (size == 0)
        size = FSC_BLOCK;
    if (b->cap >= size)
        return b->p;
    free(b->p);
    b->p = NULL;
    b->cap = 0;
    size_t align = FSC_PAGE;
    if (size >= FILL_HUGE) { /* huge pages: a fresh run buffer costs 8 faults per 16 MiB, not 4,096 */
        align = FILL_HUGE;
        size = (size + FILL_HUGE - 1) & ~(size_t)(FILL_HUGE - 1);
    } else {
        size = (size + FSC_BLOCK - 1) & ~(size_t)(FSC_BLOCK - 1);
    }
    void *p = NULL;
    if (posix_memalign(&p, align, size) != 0)
        return NULL;
    if (align == FILL_HUGE)
        (void)madvise(p, size, MADV_HUGEPAGE); /* a hint: refused, it is 4 KiB pages as before */
    b->p = p;
    b->cap = size;
    return b->p;
}

static void tbuf_trim(struct tbuf *b)
{
    if (b->cap > FILL_KEEP) {
        free(b->p);
        b->p = NULL;
        b->cap = 0;
    }
}

void fsc_blake3(const void *data, size_t len, uint8_t *out)
{
    blake3_hasher h;
    blake3_hasher_init(&h);
    blake3_hasher_update(&h, data, len);
    blake3_hasher_finalize(&h, out, 32);
}

static int64_t decode_one(int compressor, const struct fsc_chunk *c, const char *src, char *out)
{
    if (!(c->flags & FSC_CHUNK_COMPRESSED)) {
        if (c->src_len != c->dst_len)
            return -EBADMSG;
        memcpy(out, src, c->dst_len);
        return 0;
    }
    if (compressor == FSC_COMP_ZSTD) {
        if (!t_zstd && !(t_zstd = ZSTD_createDCtx()))
            return -ENOMEM;
        size_t got = ZSTD_decompressDCtx(t_zstd, out, c->dst_len, src, c->src_len);
        if (ZSTD_isError(got) || got != c->dst_len)
            return -EBADMSG;
        return 0;
    }
    if (compressor == FSC_COMP_LZ4) {
        int got = LZ4_decompress_safe(src, out, (int)c->src_len, (int)c->dst_len);
        if (got < 0 || (uint32_t)got != c->dst_len)
            return -EBADMSG;
        return 0;
    }
    return -EPROTONOSUPPORT;
}

static const char zero_block[FSC_BLOCK];

/* Read [base, base+len) of a local blob into this thread's buffer; the bytes at *at. With an
 * O_DIRECT fd the read is widened to whole blocks (a file's end may cut the last one short). */
static int64_t read_source(int fd, int direct, uint64_t base, uint64_t len, const char **at)
{
    uint64_t start = direct ? base & ~(uint64_t)(FSC_BLOCK - 1) : base;
    uint64_t end = direct ? (base + len + FSC_BLOCK - 1) & ~(uint64_t)(FSC_BLOCK - 1) : base + len;
    char *buf = tbuf_get(&t_src, end - start);
    if (!buf)
        return -ENOMEM;
    int64_t got = fsc_pread_full(fd, buf, end - start, start);
    if (got < 0)
        return got;
    if ((uint64_t)got < base + len - start)
        return -ENODATA;
    *at = buf + (base - start);
    return 0;
}

int64_t fsc_fill_run(int src_fd, const void *src_buf, uint64_t src_base, uint64_t src_len,
                     int compressor, const struct fsc_chunk *chunks, size_t n, int dst_fd,
                     int direct, uint64_t dst_size, size_t *failed)
{
    const char *src = src_buf;
    int64_t ret = 0;
    *failed = n;
    if (n == 0)
        return 0;
    if (src_fd >= 0) {
        int src_direct = src_fd & FSC_SRC_DIRECT ? 1 : 0;
        ret = read_source(src_fd & ~FSC_SRC_DIRECT, src_direct, src_base, src_len, &src);
        if (ret < 0)
            return ret;
    }
    /* where each chunk's bytes are: in the source itself (stored uncompressed, written from
     * there: no copy), else decompressed into this thread's output buffer, one after another,
     * each padded to whole blocks (an O_DIRECT write needs them in one aligned buffer) */
    uint64_t out_len = 0;
    for (size_t i = 0; i < n; i++) {
        const struct fsc_chunk *c = &chunks[i];
        if (c->src_off + c->src_len > src_len || c->src_off + c->src_len < c->src_off) {
            *failed = i;
            ret = -EINVAL;
            goto out;
        }
        if (direct || (c->flags & FSC_CHUNK_COMPRESSED))
            out_len += ((uint64_t)c->dst_len + FSC_BLOCK - 1) & ~(uint64_t)(FSC_BLOCK - 1);
    }
    char *out = NULL;
    if (out_len && !(out = tbuf_get(&t_out, out_len))) {
        ret = -ENOMEM;
        goto out;
    }
    const char **data = malloc(n * sizeof(*data));
    if (!data) {
        ret = -ENOMEM;
        goto out;
    }
    /* 1. every chunk decoded and checked before anything is written */
    uint64_t at = 0;
    for (size_t i = 0; i < n; i++) {
        const struct fsc_chunk *c = &chunks[i];
        uint64_t padded = ((uint64_t)c->dst_len + FSC_BLOCK - 1) & ~(uint64_t)(FSC_BLOCK - 1);
        if (!(c->flags & FSC_CHUNK_COMPRESSED) && c->src_len != c->dst_len) {
            *failed = i;
            ret = -EBADMSG;
            goto out_data;
        }
        if (direct || (c->flags & FSC_CHUNK_COMPRESSED)) {
            int64_t r = decode_one(compressor, c, src + c->src_off, out + at);
            if (r < 0) {
                *failed = i;
                ret = r;
                goto out_data;
            }
            if (padded > c->dst_len)
                memset(out + at + c->dst_len, 0, padded - c->dst_len); /* zeros, not an older run */
            data[i] = out + at;
            at += padded;
        } else {
            data[i] = src + c->src_off;
        }
        uint8_t digest[32];
        fsc_blake3(data[i], c->dst_len, digest);
        if (memcmp(digest, c->digest, 32) != 0) {
            *failed = i;
            ret = -EBADMSG;
            goto out_data;
        }
    }
    /* 2. written: one write per stretch of chunks that follow each other in the file, each
     * padded to whole blocks (a chunk's block tail is zeros; no other chunk lives there),
     * never past the file's end */
    uint64_t limit = dst_size ? dst_size : UINT64_MAX;
    struct iovec iov[2 * 64];
    size_t i = 0;
    while (i < n) {
        uint64_t first = chunks[i].dst_off, len = 0;
        size_t j = i, k = 0;
        while (j < n && chunks[j].dst_off == first + len && k + 2 <= sizeof(iov) / sizeof(iov[0])) {
            const struct fsc_chunk *c = &chunks[j];
            uint64_t padded = ((uint64_t)c->dst_len + FSC_BLOCK - 1) & ~(uint64_t)(FSC_BLOCK - 1);
            uint64_t keep = first + len + padded > limit ? (limit > first + len ? limit - first - len : 0) : padded;
            uint64_t body = keep < c->dst_len ? keep : c->dst_len;
            if (direct) { /* decoded with its padding, in one aligned buffer */
                if (k && (const char *)iov[k - 1].iov_base + iov[k - 1].iov_len == data[j])
                    iov[k - 1].iov_len += keep;
                else
                    iov[k++] = (struct iovec){ (void *)data[j], keep };
            } else {
                iov[k++] = (struct iovec){ (void *)data[j], body };
                if (keep > body)
                    iov[k++] = (struct iovec){ (void *)zero_block, keep - body };
            }
            len += padded;
            j++;
        }
        if (first + len > limit)
            len = limit > first ? limit - first : 0;
        int64_t put = direct && k == 1 ? fsc_pwrite_full(dst_fd, iov[0].iov_base, len, first)
                                       : fsc_pwritev_full(dst_fd, iov, (int)k, len, first);
        if (put < 0) {
            *failed = i;
            ret = put;
            goto out_data;
        }
        ret += put;
        i = j;
    }
    *failed = n;
out_data:
    free(data);
out:
    tbuf_trim(&t_src);
    tbuf_trim(&t_out);
    return ret;
}

int64_t fsc_pwritev_full(int fd, struct iovec *iov, int cnt, uint64_t len, uint64_t off)
{
    uint64_t done = 0;
    while (done < len && cnt > 0) {
        ssize_t w = pwritev(fd, iov, cnt, (off_t)(off + done));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        done += (uint64_t)w;
        size_t left = (size_t)w;
        while (cnt > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0 && left) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return (int64_t)done;
}
