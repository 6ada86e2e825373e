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
#endif
