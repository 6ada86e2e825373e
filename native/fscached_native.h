/* Declarations shared by fscached_native.c and the cffi cdef in build_native.py. */
#ifndef FSCACHED_NATIVE_H
#define FSCACHED_NATIVE_H
#include <stddef.h>
#include <stdint.h>

#define FSC_PAGE 4096
#define FSC_BLOCK 4096
#define FSC_COPY_CHUNK (1024 * 1024)

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
int64_t fsc_copy_range(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off, uint64_t len);
int64_t fsc_copy_ranges(int src_fd, int dst_fd, const struct fsc_range *ranges, size_t n,
                        size_t *n_done);
/* fanotify and mount(2): thin wrappers so every kernel call goes through one typed layer */
int fsc_fanotify_init(uint32_t flags, uint32_t event_f_flags);
int fsc_fanotify_mark(int group_fd, uint32_t flags, uint64_t mask, int dirfd, const char *path);
int fsc_mount(const char *source, const char *target, const char *fstype, unsigned long flags,
              const char *data);
int fsc_umount(const char *target, int flags);

/* the fanotify fast path (fanotify_fast.c) */
#define FSC_FAN_BUCKETS 32
struct fsc_fan_event { /* an event left to Python */
    int32_t fd;
    int32_t pid;
    uint64_t mask;
    uint64_t offset;
    int64_t count; /* -1: no range given */
    uint64_t dev;
    uint64_t ino;
    uint32_t known;   /* a file of ours: journaled already */
    uint32_t stat_ok; /* dev and ino are set */
};
struct fsc_fan_stats {
    uint64_t events; /* answered FAN_ALLOW by the fast path */
    uint64_t bytes;
    double seconds;
    uint64_t latency[32]; /* FSC_FAN_BUCKETS */
    uint64_t sizes[16];
    uint64_t batches;
    uint64_t answer_errors;
};
struct fsc_fan;
struct fsc_fan *fsc_fan_new(int group_fd, void *journal, uint32_t journal_slots,
                            const double *buckets, size_t nbuckets);
int fsc_fan_notify_fd(struct fsc_fan *fan);
int64_t fsc_fan_add_blob(struct fsc_fan *fan, uint64_t dev, uint64_t ino, uint64_t size);
void fsc_fan_remove_blob(struct fsc_fan *fan, int64_t id);
void fsc_fan_set_fast(struct fsc_fan *fan, int64_t id, int on);
int fsc_fan_set_ranges(struct fsc_fan *fan, int64_t id, const uint64_t *offsets,
                       const uint64_t *lengths, size_t n, int filled);
int fsc_fan_start(struct fsc_fan *fan);
void fsc_fan_stop(struct fsc_fan *fan);
size_t fsc_fan_take(struct fsc_fan *fan, struct fsc_fan_event *out, size_t max);
int fsc_fan_get_stats(struct fsc_fan *fan, struct fsc_fan_stats *out);
void fsc_fan_free(struct fsc_fan *fan);

/* one run of chunks: read / decompress / verify / write (fill.c) */
#define FSC_CHUNK_COMPRESSED 1
#define FSC_COMP_NONE 0
#define FSC_COMP_LZ4 1
#define FSC_COMP_ZSTD 3
#define FSC_SRC_DIRECT 0x40000000 /* or-ed into src_fd: it was opened O_DIRECT */
struct fsc_chunk {
    uint64_t src_off; /* in the run's stored bytes */
    uint64_t dst_off; /* in the cache file (uncompressed offset) */
    uint32_t src_len;
    uint32_t dst_len;
    uint32_t flags; /* FSC_CHUNK_COMPRESSED */
    uint32_t pad;
    uint8_t digest[32]; /* blake3 of the uncompressed bytes */
};
void fsc_blake3(const void *data, size_t len, uint8_t *out);
int64_t fsc_fill_run(int src_fd, const void *src_buf, uint64_t src_base, uint64_t src_len,
                     int compressor, const struct fsc_chunk *chunks, size_t n, int dst_fd,
                     int direct, uint64_t dst_size, size_t *failed);

/* a bootstrap's chunk table, checked and indexed (chunk_index.c) */
struct fsc_blob_limit {
    uint64_t uncompressed_size;
    uint64_t compressed_size; /* 0: unknown */
    uint32_t chunk_size;      /* 0: unknown */
    uint32_t pad;
};
int64_t fsc_chunk_index(const uint8_t *table, size_t n, const struct fsc_blob_limit *blobs,
                        size_t nblobs, uint32_t *order, uint64_t *starts, uint32_t *sizes,
                        uint64_t *blob_first, char *err, size_t errlen);
void *fsc_map(int fd, uint64_t offset, uint64_t length);
void fsc_unmap(void *p, uint64_t length);
void fsc_map_drop(void *p, uint64_t length);
#endif
