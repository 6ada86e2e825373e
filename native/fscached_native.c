/* fscached native helpers: aligned buffers, full pwrite, the READ_COMPLETE ioctl and
 * a kernel-side copy for uncompressed local blobs.  Every function returns 0/count on
 * success and -errno on failure; no function touches Python objects, so cffi runs them
 * with the GIL released. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/fanotify.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/types.h>
#include <sys/vfs.h>

#include "fscached_native.h"

/* _IOW(0x98, 1, int), include/uapi/linux/cachefiles.h; spelled out so the build does not
 * need kernel headers that have the on-demand definitions. */
#define FSC_IOC_READ_COMPLETE _IOW(0x98, 1, int)

void *fsc_aligned_alloc(size_t size)
{
    void *p = NULL;
    if (size == 0)
        size = FSC_BLOCK;
    if (posix_memalign(&p, FSC_PAGE, size) != 0)
        return NULL;
    memset(p, 0, size);
    return p;
}

void fsc_aligned_free(void *p)
{
    free(p);
}

int64_t fsc_pwrite_full(int fd, const void *buf, uint64_t len, uint64_t off)
{
    const char *p = buf;
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, p + done, (size_t)(len - done), (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO; /* no progress: never spin */
        done += (uint64_t)n;
    }
    return (int64_t)done;
}

int64_t fsc_pread_full(int fd, void *buf, uint64_t len, uint64_t off)
{
    char *p = buf;
    uint64_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, p + done, (size_t)(len - done), (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            break; /* end of file */
        done += (uint64_t)n;
    }
    return (int64_t)done;
}

int fsc_read_complete(int anon_fd, uint32_t msg_id)
{
    if (ioctl(anon_fd, FSC_IOC_READ_COMPLETE, (unsigned long)msg_id) < 0)
        return -errno;
    return 0;
}

int64_t fsc_fs_type(const char *path)
{
    struct statfs st;
    if (statfs(path, &st) < 0)
        return -errno;
    return (int64_t)(uint64_t)(unsigned long)st.f_type;
}

static int64_t copy_one(int src_fd, int dst_fd, const struct fsc_range *r, char *buf,
                        uint64_t bufsize)
{
    uint64_t done = 0;
    if (r->dst_off % FSC_BLOCK)
        return -EINVAL;
    while (done < r->len) {
        uint64_t want = r->len - done;
        if (want > bufsize)
            want = bufsize;
        int64_t got = fsc_pread_full(src_fd, buf, want, r->src_off + done);
        if (got < 0)
            return got;
        if ((uint64_t)got < want)
            return -ENODATA; /* the source ends inside the range */
        uint64_t out = (want + FSC_BLOCK - 1) & ~(uint64_t)(FSC_BLOCK - 1);
        if (out > want)
            memset(buf + want, 0, out - want);
        int64_t put = fsc_pwrite_full(dst_fd, buf, out, r->dst_off + done);
        if (put < 0)
            return put;
        done += want;
    }
    return (int64_t)((r->len + FSC_BLOCK - 1) & ~(uint64_t)(FSC_BLOCK - 1));
}

int64_t fsc_copy_ranges(int src_fd, int dst_fd, const struct fsc_range *ranges, size_t n,
                        size_t *n_done)
{
    uint64_t biggest = 0, total = 0;
    size_t i;
    if (n_done)
        *n_done = 0;
    for (i = 0; i < n; i++)
        if (ranges[i].len > biggest)
            biggest = ranges[i].len;
    if (biggest == 0)
        return 0;
    uint64_t bufsize = (biggest + FSC_BLOCK - 1) & ~(uint64_t)(FSC_BLOCK - 1);
    if (bufsize > FSC_COPY_CHUNK)
        bufsize = FSC_COPY_CHUNK;
    char *buf = fsc_aligned_alloc(bufsize);
    if (!buf)
        return -ENOMEM;
    for (i = 0; i < n; i++) {
        int64_t r = copy_one(src_fd, dst_fd, &ranges[i], buf, bufsize);
        if (r < 0) {
            free(buf);
            return r;
        }
        total += (uint64_t)r;
        if (n_done)
            *n_done = i + 1;
    }
    free(buf);
    return (int64_t)total;
}

int64_t fsc_copy_range(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off, uint64_t len)
{
    struct fsc_range r = { src_off, dst_off, len };
    return fsc_copy_ranges(src_fd, dst_fd, &r, 1, NULL);
}

int fsc_fanotify_init(uint32_t flags, uint32_t event_f_flags)
{
    int fd = fanotify_init(flags, event_f_flags);
    return fd < 0 ? -errno : fd;
}

int fsc_fanotify_mark(int group_fd, uint32_t flags, uint64_t mask, int dirfd, const char *path)
{
    return fanotify_mark(group_fd, flags, mask, dirfd, path) < 0 ? -errno : 0;
}

int fsc_mount(const char *source, const char *target, const char *fstype, unsigned long flags,
              const char *data)
{
    return mount(source, target, fstype, flags, data) < 0 ? -errno : 0;
}

int fsc_umount(const char *target, int flags)
{
    return umount2(target, flags) < 0 ? -errno : 0;
}
