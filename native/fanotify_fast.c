/* The fanotify fast path: a thread of its own reads the group's events and answers FAN_ALLOW
 * for every event whose range already holds verified bytes, without Python.
 *
 * The promises of the Python path are kept:
 * - every event of a read(2) of a file we serve is journaled (the MAP_SHARED journal of
 *   fscached.frontends.fanotify.journal, same slot layout) before any event of the read is
 *   worked on: a kill -9 leaves them to a successor;
 * - only blobs Python declared fast (a write fd in hand, no start-up profile recording their
 *   reads) are answered here; everything else (a miss, an unknown file, an overflow, a blob
 *   being recorded) goes to Python through a bounded queue and an eventfd, already journaled;
 * - "filled" is a bitmap per blob, one bit per 4 KiB block: set for blocks with no chunk (a
 *   hole of the sparse file reads as zeros) and, by Python, for a chunk's blocks only once its
 *   verified bytes are written;
 * - answers go out in batches (writev of N responses: the group's write takes one response per
 *   call, and writev calls it once per iovec), the event fds closed just before (see one_batch),
 *   the journal slots cleared just after.
 * Nothing here touches Python objects; Python calls these functions with the GIL released. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "fscached_native.h"

#define FAN_READ_BUF (64 * 1024)
#define FAN_MIN_EVENT 24 /* struct fanotify_event_metadata: no event is shorter */
#define FAN_MAX_PER_READ (FAN_READ_BUF / FAN_MIN_EVENT + 1)
#define FAN_QUEUE (4 * FAN_MAX_PER_READ)
#define FAN_Q_OVERFLOW_MASK 0x00004000ULL
#define FAN_ALLOW_RESPONSE 0x01
#define FAN_INFO_RANGE 6
#define FAN_METADATA_VERSION 3
#define JOURNAL_PENDING 1

struct journal_slot { /* fanotify/journal.py: "<IiQQQq" */
    uint32_t state;
    int32_t fd;
    uint64_t dev;
    uint64_t ino;
    uint64_t offset;
    int64_t count;
};

struct fan_blob {
    uint64_t dev, ino, size, nblocks;
    uint64_t *filled; /* 1 bit per block: no fill needed */
    int fast;
    int used;
};

struct fsc_fan {
    int group_fd;
    int notify_fd; /* eventfd: Python's loop wakes on it for misses */
    int stop_fd;   /* eventfd: tells the thread to stop */
    struct journal_slot *journal;
    uint32_t journal_slots;
    pthread_t thread;
    int running;
    pthread_mutex_t lock; /* blobs, queue, stats */
    pthread_cond_t room;  /* the queue has room again */
    struct fan_blob *blobs;
    size_t nblobs, cap_blobs;
    struct fsc_fan_event queue[FAN_QUEUE];
    size_t q_head, q_len;
    struct fsc_fan_stats stats;
    double buckets[FSC_FAN_BUCKETS];
    size_t nbuckets;
    int error; /* a read error that stopped the thread: -errno */
};

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct fsc_fan *fsc_fan_new(int group_fd, void *journal, uint32_t journal_slots,
                            const double *buckets, size_t nbuckets)
{
    struct fsc_fan *fan = calloc(1, sizeof(*fan));
    if (!fan)
        return NULL;
    fan->group_fd = group_fd;
    fan->journal = journal;
    fan->journal_slots = journal ? journal_slots : 0;
    if (nbuckets > FSC_FAN_BUCKETS - 1)
        nbuckets = FSC_FAN_BUCKETS - 1;
    memcpy(fan->buckets, buckets, nbuckets * sizeof(double));
    fan->nbuckets = nbuckets;
    fan->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    fan->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fan->notify_fd < 0 || fan->stop_fd < 0) {
        if (fan->notify_fd >= 0)
            close(fan->notify_fd);
        if (fan->stop_fd >= 0)
            close(fan->stop_fd);
        free(fan);
        return NULL;
    }
    pthread_mutex_init(&fan->lock, NULL);
    pthread_cond_init(&fan->room, NULL);
    return fan;
}

int fsc_fan_notify_fd(struct fsc_fan *fan)
{
    return fan->notify_fd;
}

int64_t fsc_fan_add_blob(struct fsc_fan *fan, uint64_t dev, uint64_t ino, uint64_t size)
{
    uint64_t nblocks = (size + FSC_BLOCK - 1) / FSC_BLOCK;
    uint64_t words = (nblocks + 63) / 64;
    uint64_t *bits = malloc((words ? words : 1) * sizeof(uint64_t));
    if (!bits)
        return -ENOMEM;
    memset(bits, 0xff, (words ? words : 1) * sizeof(uint64_t)); /* no chunk: nothing to fill */
    pthread_mutex_lock(&fan->lock);
    size_t i;
    for (i = 0; i < fan->nblobs; i++)
        if (!fan->blobs[i].used)
            break;
    if (i == fan->nblobs) {
        if (fan->nblobs == fan->cap_blobs) {
            size_t cap = fan->cap_blobs ? 2 * fan->cap_blobs : 16;
            struct fan_blob *grown = realloc(fan->blobs, cap * sizeof(*grown));
            if (!grown) {
                pthread_mutex_unlock(&fan->lock);
                free(bits);
                return -ENOMEM;
            }
            fan->blobs = grown;
            fan->cap_blobs = cap;
        }
        fan->nblobs++;
    }
    struct fan_blob *b = &fan->blobs[i];
    b->dev = dev;
    b->ino = ino;
    b->size = size;
    b->nblocks = nblocks;
    b->filled = bits;
    b->fast = 0;
    b->used = 1;
    pthread_mutex_unlock(&fan->lock);
    return (int64_t)i;
}

void fsc_fan_remove_blob(struct fsc_fan *fan, int64_t id)
{
    pthread_mutex_lock(&fan->lock);
    if (id >= 0 && (size_t)id < fan->nblobs && fan->blobs[id].used) {
        free(fan->blobs[id].filled);
        fan->blobs[id].filled = NULL;
        fan->blobs[id].used = 0;
        fan->blobs[id].fast = 0;
    }
    pthread_mutex_unlock(&fan->lock);
}

void fsc_fan_set_fast(struct fsc_fan *fan, int64_t id, int on)
{
    pthread_mutex_lock(&fan->lock);
    if (id >= 0 && (size_t)id < fan->nblobs && fan->blobs[id].used)
        fan->blobs[id].fast = on;
    pthread_mutex_unlock(&fan->lock);
}

static void set_bits(struct fan_blob *b, uint64_t off, uint64_t len, int value)
{
    if (len == 0 || off >= b->size)
        return;
    uint64_t first = off / FSC_BLOCK;
    uint64_t end = (off + len + FSC_BLOCK - 1) / FSC_BLOCK;
    if (end > b->nblocks)
        end = b->nblocks;
    for (uint64_t k = first; k < end; k++) {
        if (value)
            b->filled[k / 64] |= 1ULL << (k % 64);
        else
            b->filled[k / 64] &= ~(1ULL << (k % 64));
    }
}

int fsc_fan_set_ranges(struct fsc_fan *fan, int64_t id, const uint64_t *offsets,
                       const uint64_t *lengths, size_t n, int filled)
{
    pthread_mutex_lock(&fan->lock);
    if (id < 0 || (size_t)id >= fan->nblobs || !fan->blobs[id].used) {
        pthread_mutex_unlock(&fan->lock);
        return -ENOENT;
    }
    struct fan_blob *b = &fan->blobs[id];
    for (size_t i = 0; i < n; i++)
        set_bits(b, offsets[i], lengths[i], filled);
    pthread_mutex_unlock(&fan->lock);
    return 0;
}

static int range_filled(const struct fan_blob *b, uint64_t off, int64_t count)
{
    if (count < 0)
        count = off < b->size ? (int64_t)(b->size - off) : 0;
    if (count == 0 || off >= b->size)
        return 1;
    uint64_t first = off / FSC_BLOCK;
    uint64_t end = (off + (uint64_t)count + FSC_BLOCK - 1) / FSC_BLOCK;
    if (end > b->nblocks)
        end = b->nblocks;
    uint64_t k = first;
    for (; k < end && (k % 64); k++)
        if (!(b->filled[k / 64] & (1ULL << (k % 64))))
            return 0;
    while (k + 64 <= end) {
        if (b->filled[k / 64] != ~0ULL)
            return 0;
        k += 64;
    }
    for (; k < end; k++)
        if (!(b->filled[k / 64] & (1ULL << (k % 64))))
            return 0;
    return 1;
}

static struct fan_blob *find_blob(struct fsc_fan *fan, uint64_t dev, uint64_t ino)
{
    for (size_t i = 0; i < fan->nblobs; i++) {
        struct fan_blob *b = &fan->blobs[i];
        if (b->used && b->ino == ino && b->dev == dev)
            return b;
    }
    return NULL;
}

static void journal_record(struct fsc_fan *fan, int fd, uint64_t dev, uint64_t ino,
                           uint64_t offset, int64_t count)
{
    if (fd < 0 || (uint32_t)fd >= fan->journal_slots)
        return;
    struct journal_slot *s = &fan->journal[fd];
    s->fd = fd;
    s->dev = dev;
    s->ino = ino;
    s->offset = offset;
    s->count = count;
    atomic_signal_fence(memory_order_release);
    s->state = JOURNAL_PENDING;
}

static void journal_clear(struct fsc_fan *fan, int fd)
{
    if (fd >= 0 && (uint32_t)fd < fan->journal_slots)
        fan->journal[fd].state = 0;
}

static void account(struct fsc_fan *fan, uint64_t nbytes, double seconds)
{
    size_t b = 0;
    while (b < fan->nbuckets && seconds > fan->buckets[b])
        b++;
    fan->stats.latency[b]++;
    fan->stats.events++;
    fan->stats.bytes += nbytes;
    fan->stats.seconds += seconds;
    if (nbytes) {
        size_t s = 0; /* 4 KiB << s, as fscached.core.stats.SIZE_BUCKETS */
        while (s < 9 && nbytes > (4096ULL << s))
            s++;
        fan->stats.sizes[s]++;
    }
}

struct parsed {
    struct fsc_fan_event ev;
    struct fan_blob *blob; /* valid under the lock only (an added blob may move the table) */
    uint64_t nbytes;       /* the range's length, clipped to the blob */
};

/* One read(2): journal, answer the hits, queue the rest. 1: events handled, 0: none, <0 error. */
static int one_batch(struct fsc_fan *fan, char *buf, struct parsed *evs, struct iovec *iov,
                     int32_t (*resp)[2], int *hit_fd)
{
    ssize_t n = read(fan->group_fd, buf, FAN_READ_BUF);
    if (n < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
    if (n == 0)
        return 0;
    double t0 = now_seconds();
    size_t count = 0, pos = 0;
    while (pos + FAN_MIN_EVENT <= (size_t)n && count < FAN_MAX_PER_READ) {
        uint32_t event_len;
        uint8_t vers;
        uint16_t metadata_len;
        uint64_t mask;
        int32_t fd, pid;
        memcpy(&event_len, buf + pos, 4);
        vers = (uint8_t)buf[pos + 4];
        memcpy(&metadata_len, buf + pos + 6, 2);
        memcpy(&mask, buf + pos + 8, 8);
        memcpy(&fd, buf + pos + 16, 4);
        memcpy(&pid, buf + pos + 20, 4);
        if (vers != FAN_METADATA_VERSION || event_len < FAN_MIN_EVENT || pos + event_len > (size_t)n)
            break; /* malformed: what follows cannot be trusted (Python's parser raises too) */
        struct parsed *p = &evs[count++];
        memset(p, 0, sizeof(*p));
        p->ev.fd = fd;
        p->ev.mask = mask;
        p->ev.pid = pid;
        p->ev.offset = 0;
        p->ev.count = -1;
        size_t info = pos + metadata_len;
        while (info + 4 <= pos + event_len) {
            uint8_t info_type = (uint8_t)buf[info];
            uint16_t info_len;
            memcpy(&info_len, buf + info + 2, 2);
            if (info_len < 4)
                break;
            if (info_type == FAN_INFO_RANGE && info_len >= 24 && info + 24 <= pos + event_len) {
                memcpy(&p->ev.offset, buf + info + 8, 8);
                uint64_t c;
                memcpy(&c, buf + info + 16, 8);
                p->ev.count = (int64_t)c;
            }
            info += info_len;
        }
        pos += event_len;
    }
    /* 1. every event of a file we serve journaled before any is worked on */
    pthread_mutex_lock(&fan->lock);
    for (size_t i = 0; i < count; i++) {
        struct parsed *p = &evs[i];
        struct stat st;
        if (p->ev.fd < 0 || (p->ev.mask & FAN_Q_OVERFLOW_MASK))
            continue;
        if (fstat(p->ev.fd, &st) < 0)
            continue;
        p->ev.dev = (uint64_t)st.st_dev;
        p->ev.ino = (uint64_t)st.st_ino;
        p->ev.stat_ok = 1;
        p->blob = find_blob(fan, p->ev.dev, p->ev.ino);
        if (p->blob) {
            p->ev.known = 1;
            int64_t c = p->ev.count >= 0 ? p->ev.count
                        : (p->ev.offset < p->blob->size ? (int64_t)(p->blob->size - p->ev.offset) : 0);
            p->nbytes = c > 0 ? (uint64_t)c : 0;
            if (c > 0)
                journal_record(fan, p->ev.fd, p->ev.dev, p->ev.ino, p->ev.offset, c);
        }
    }
    /* 2. hits answered here, the rest queued for Python */
    size_t hits = 0, queued = 0;
    for (size_t i = 0; i < count; i++) {
        struct parsed *p = &evs[i];
        if (p->blob && p->blob->fast && range_filled(p->blob, p->ev.offset, p->ev.count)) {
            resp[hits][0] = p->ev.fd;
            resp[hits][1] = FAN_ALLOW_RESPONSE;
            iov[hits].iov_base = resp[hits];
            iov[hits].iov_len = 8;
            hit_fd[hits] = (int)i;
            hits++;
        } else {
            size_t at = (fan->q_head + fan->q_len) % FAN_QUEUE;
            fan->queue[at] = p->ev;
            fan->q_len++;
            queued++;
        }
    }
    pthread_mutex_unlock(&fan->lock);
    /* 3. the event fds closed first, then the answers, in batches: a reader goes on the moment
     * its answer is written, and must find no fd of ours on the file then (a stop asks whether
     * anything else holds the cache file open). The kernel matches an answer by the number the
     * event carries, not by the fd table, and only this thread reads events: no new event can
     * take a closed number before its answer is written. A refused answer (ENOENT: answered
     * already) is skipped. */
    for (size_t h = 0; h < hits; h++)
        close(resp[h][0]);
    size_t done = 0;
    uint64_t failed = 0;
    while (done < hits) {
        size_t chunk = hits - done;
        if (chunk > 1024) /* IOV_MAX */
            chunk = 1024;
        ssize_t w = writev(fan->group_fd, iov + done, (int)chunk);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            failed++; /* the first response of this batch was refused */
            done++;
            continue;
        }
        done += (size_t)w / 8;
        if ((size_t)w / 8 < chunk) {
            /* stopped at a refused response: retry it alone once, then go on past it */
            ssize_t one = write(fan->group_fd, iov[done].iov_base, 8);
            if (one != 8)
                failed++;
            done++;
        }
    }
    double seconds = now_seconds() - t0;
    for (size_t h = 0; h < hits; h++)
        journal_clear(fan, resp[h][0]);
    pthread_mutex_lock(&fan->lock);
    for (size_t h = 0; h < hits; h++)
        account(fan, evs[hit_fd[h]].nbytes, seconds);
    fan->stats.answer_errors += failed;
    fan->stats.batches++;
    pthread_mutex_unlock(&fan->lock);
    if (queued) {
        uint64_t one = 1;
        ssize_t w = write(fan->notify_fd, &one, sizeof(one));
        (void)w;
    }
    return 1;
}

static void *fan_thread(void *arg)
{
    struct fsc_fan *fan = arg;
    char *buf = malloc(FAN_READ_BUF);
    struct parsed *evs = malloc(sizeof(*evs) * FAN_MAX_PER_READ);
    struct iovec *iov = malloc(sizeof(*iov) * FAN_MAX_PER_READ);
    int32_t (*resp)[2] = malloc(sizeof(*resp) * FAN_MAX_PER_READ);
    int *hit_fd = malloc(sizeof(int) * FAN_MAX_PER_READ);
    if (!buf || !evs || !iov || !resp || !hit_fd) {
        pthread_mutex_lock(&fan->lock);
        fan->error = -ENOMEM;
        pthread_mutex_unlock(&fan->lock);
        goto out;
    }
    for (;;) {
        /* room for a whole read's events in the queue first: none is ever dropped */
        pthread_mutex_lock(&fan->lock);
        while (FAN_QUEUE - fan->q_len < FAN_MAX_PER_READ && fan->running)
            pthread_cond_wait(&fan->room, &fan->lock);
        int running = fan->running;
        pthread_mutex_unlock(&fan->lock);
        if (!running)
            break;
        struct pollfd pfd[2] = { { fan->group_fd, POLLIN, 0 }, { fan->stop_fd, POLLIN, 0 } };
        int r = poll(pfd, 2, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            pthread_mutex_lock(&fan->lock);
            fan->error = -errno;
            pthread_mutex_unlock(&fan->lock);
            break;
        }
        if (pfd[1].revents)
            break;
        if (!(pfd[0].revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL)))
            continue;
        /* as long as the group has events and the queue room: no poll between batches */
        for (;;) {
            int got = one_batch(fan, buf, evs, iov, resp, hit_fd);
            if (got < 0) {
                pthread_mutex_lock(&fan->lock);
                fan->error = got;
                pthread_mutex_unlock(&fan->lock);
                uint64_t one = 1;
                ssize_t w = write(fan->notify_fd, &one, sizeof(one));
                (void)w;
                goto out;
            }
            if (got == 0)
                break;
            pthread_mutex_lock(&fan->lock);
            int room = FAN_QUEUE - fan->q_len >= FAN_MAX_PER_READ;
            pthread_mutex_unlock(&fan->lock);
            if (!room)
                break;
        }
    }
out:
    free(buf);
    free(evs);
    free(iov);
    free(resp);
    free(hit_fd);
    return NULL;
}

int fsc_fan_start(struct fsc_fan *fan)
{
    if (fan->running)
        return 0;
    fan->running = 1;
    int r = pthread_create(&fan->thread, NULL, fan_thread, fan);
    if (r) {
        fan->running = 0;
        return -r;
    }
    return 0;
}

void fsc_fan_stop(struct fsc_fan *fan)
{
    if (!fan->running)
        return;
    pthread_mutex_lock(&fan->lock);
    fan->running = 0;
    pthread_cond_broadcast(&fan->room);
    pthread_mutex_unlock(&fan->lock);
    uint64_t one = 1;
    ssize_t w = write(fan->stop_fd, &one, sizeof(one));
    (void)w;
    pthread_join(fan->thread, NULL);
    uint64_t drained;
    w = read(fan->stop_fd, &drained, sizeof(drained));
    (void)w;
}

size_t fsc_fan_take(struct fsc_fan *fan, struct fsc_fan_event *out, size_t max)
{
    uint64_t drained;
    ssize_t w = read(fan->notify_fd, &drained, sizeof(drained)); /* before taking: no wake lost */
    (void)w;
    pthread_mutex_lock(&fan->lock);
    size_t n = 0;
    while (n < max && fan->q_len) {
        out[n++] = fan->queue[fan->q_head];
        fan->q_head = (fan->q_head + 1) % FAN_QUEUE;
        fan->q_len--;
    }
    if (fan->q_len) { /* more than `max`: wake Python again */
        uint64_t one = 1;
        w = write(fan->notify_fd, &one, sizeof(one));
        (void)w;
    }
    pthread_cond_broadcast(&fan->room);
    pthread_mutex_unlock(&fan->lock);
    return n;
}

int fsc_fan_get_stats(struct fsc_fan *fan, struct fsc_fan_stats *out)
{
    pthread_mutex_lock(&fan->lock);
    *out = fan->stats;
    int err = fan->error;
    pthread_mutex_unlock(&fan->lock);
    return err;
}

void fsc_fan_free(struct fsc_fan *fan)
{
    if (!fan)
        return;
    fsc_fan_stop(fan);
    for (size_t i = 0; i < fan->nblobs; i++)
        free(fan->blobs[i].filled);
    free(fan->blobs);
    close(fan->notify_fd);
    close(fan->stop_fd);
    pthread_mutex_destroy(&fan->lock);
    pthread_cond_destroy(&fan->room);
    free(fan);
}
