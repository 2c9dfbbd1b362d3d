/* Unit tests for the host-wide budget of zeros ahead (layer.h, Disk): with
 * a budget of two windows, two layers that flush little get their zeros and
 * a third gets none while they hold them; once one closes, the third gets
 * its own; a compaction gives a layer's share back, and so does writing
 * over the zeros, and so does a layer that writes nothing for the idle
 * time (layer_set_ahead_idle), keeping times set while it cuts its log.
 * Times set while zeros are written are kept too, and a zeroing that fails
 * after it extended the log gives that space back at once.
 * The count never goes over the budget and is 0 once all close.
 *
 * Zeroing runs on a background thread: the test waits (up to 60 s) for
 * what must happen, and, for what must not, watches for 2 s, during which
 * the thread has long since had its turn; a slower machine could let a
 * broken budget pass, never fail a sound one. Needs a file system where
 * zeroing runs (not tmpfs): the test is skipped on one. */
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "layer.h"

#define BS LAYER_BLOCK_SIZE
#define WINDOW (4ull << 20) /* the smallest window: what a small log zeroes */
#define DISK_SIZE (64ull << 20)

static char dir[256];

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* The size of a layer's log file: past its data once it is zeroed ahead. */
static uint64_t log_size(const struct layer *l)
{
    char path[512];
    struct stat st;
    snprintf(path, sizeof(path), "%s/%s.log", dir, layer_id(l));
    return stat(path, &st) == 0 ? (uint64_t)st.st_size : 0;
}

/* A small flush: 16 KiB of data, then layer_flush, which asks for zeros. */
static void small_flush(struct layer *l, unsigned seed)
{
    char buf[4 * BS];
    memset(buf, (int)seed, sizeof(buf));
    CHECK(layer_write(l, buf, sizeof(buf), (uint64_t)seed * sizeof(buf)) == 0);
    CHECK(layer_flush(l) == 0);
}

/* A layer_set_times of a layer from another thread while its log is cut
 * (the give-back of its zeros): the cut waits (at most 2 s: a sound layer
 * holds the touch back until its times are back) for the touch. */
static _Atomic(struct layer *) touched;
static _Atomic bool touch_due, touch_done;
static const struct timespec touch_times[2] = {{1000000000, 0}, {1000000000, 0}};
static int (*real_ftruncate_saved)(int fd, off_t len);
static int touching_ftruncate(int fd, off_t len)
{
    if (atomic_exchange(&touched, NULL)) {
        atomic_store(&touch_due, true);
        for (uint64_t end = now_ms() + 2000; !atomic_load(&touch_done) && now_ms() < end;)
            sleep_ms(5);
    }
    return real_ftruncate_saved(fd, len);
}

/* The zeros' writes, for the two tests of a zeroing under way: the first
 * one sets the times of zeroing_touched first (as a utimensat between the
 * pass's start and its writes), and with zeroing_fails every one after the
 * first fails with ENOSPC (a disk that fills up during the pass). */
static _Atomic(struct layer *) zeroing_touched;
static _Atomic bool zeroing_fails, zeroing_failed, touch_failed; /* (no CHECK off the main thread) */
static _Atomic unsigned zero_writes;
static ssize_t (*real_zero_pwrite_saved)(int fd, const void *buf, size_t len, off_t off);
static ssize_t hooked_zero_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    struct layer *t = atomic_exchange(&zeroing_touched, NULL);
    if (t && layer_set_times(t, touch_times) != 0)
        atomic_store(&touch_failed, true);
    if (atomic_fetch_add(&zero_writes, 1) > 0 && atomic_load(&zeroing_fails)) {
        atomic_store(&zeroing_failed, true);
        errno = ENOSPC;
        return -1;
    }
    return real_zero_pwrite_saved(fd, buf, len, off);
}

/* An allocation ahead that gets half its space and fails (ENOSPC): ext4
 * keeps what it allocated, and the size with it. */
static _Atomic bool allocation_failed;
static int half_fallocate(int fd, int mode, off_t off, off_t len)
{
    int rc = fallocate(fd, mode, off, len / 2);
    atomic_store(&allocation_failed, true);
    errno = rc == 0 ? ENOSPC : errno;
    return -1;
}

static bool zeroed(const struct layer *l) { return log_size(l) >= WINDOW; }
static bool has_touch_times(const struct layer *l)
{
    struct timespec at, mt;
    return layer_get_times(l, &at, &mt) == 0 && mt.tv_sec == touch_times[1].tv_sec && at.tv_sec == touch_times[0].tv_sec;
}
/* A failed zeroing gave back what it wrote: the log is the small flush's. */
static bool zeroing_given_back(const struct layer *l)
{
    return atomic_load(&zeroing_failed) && log_size(l) < 64 * 1024;
}
static bool nothing_held(const struct layer *l) { return (void)l, layer_ahead_host_bytes() == 0; }

/* Waits for cond(l) up to 60 s; checks the budget all along. */
static bool wait_for(bool (*cond)(const struct layer *), const struct layer *l)
{
    for (uint64_t end = now_ms() + 60000; now_ms() < end; sleep_ms(5)) {
        CHECK(layer_ahead_host_bytes() <= 2 * WINDOW);
        if (cond(l))
            return true;
    }
    return false;
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/var/tmp/imgfs-test-ahead-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    struct statfs fs;
    if (statfs(dir, &fs) != 0 || fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC) {
        printf("skipped: %s is on tmpfs, where nothing is zeroed ahead\n", dir);
        rmdir(dir);
        return 0;
    }
    setenv("IMGFS_LAYER_AHEAD_HOST_MAX", "8M", 1); /* two windows of 4 MiB */
    layer_set_ahead_idle(3600ull * 1000000000ull); /* nothing is idle until the end */

    struct layer *a, *b, *c;
    CHECK(layer_create(dir, DISK_SIZE, &a) == 0);
    CHECK(layer_create(dir, DISK_SIZE, &b) == 0);
    CHECK(layer_create(dir, DISK_SIZE, &c) == 0);
    small_flush(a, 1);
    CHECK(wait_for(zeroed, a));
    small_flush(b, 2);
    CHECK(wait_for(zeroed, b));
    CHECK(layer_ahead_host_bytes() == 2 * WINDOW);

    /* The budget is held: c gets nothing, however often it asks. */
    for (uint64_t end = now_ms() + 2000; now_ms() < end; sleep_ms(100)) {
        small_flush(c, 3);
        CHECK(!zeroed(c));
        CHECK(layer_ahead_host_bytes() == 2 * WINDOW);
    }

    /* a closes and gives its share back: c's next flush gets zeros. */
    layer_close(a);
    CHECK(layer_ahead_host_bytes() == WINDOW);
    small_flush(c, 4);
    CHECK(wait_for(zeroed, c));
    CHECK(layer_ahead_host_bytes() == 2 * WINDOW);

    /* What was zeroed reads as nothing: the data is what was written. */
    char buf[4 * BS], want[4 * BS];
    memset(want, 4, sizeof(want));
    CHECK(layer_read(c, buf, sizeof(buf), 4 * sizeof(buf)) == 0 && memcmp(buf, want, sizeof(buf)) == 0);

    /* A compaction, here one asked for, moves c to a new log with nothing
     * zeroed ahead: c's share goes back at once, not when c closes. */
    CHECK(layer_compact(c) == 0);
    CHECK(layer_ahead_host_bytes() == WINDOW);
    CHECK(layer_read(c, buf, sizeof(buf), 4 * sizeof(buf)) == 0 && memcmp(buf, want, sizeof(buf)) == 0);

    layer_close(b);
    layer_close(c);
    CHECK(layer_ahead_host_bytes() == 0);

    /* A layer that writes over its zeros in large flushes (which ask for no
     * zeros again) gives its share back while it stays open. */
    struct layer *d;
    CHECK(layer_create(dir, DISK_SIZE, &d) == 0);
    small_flush(d, 5);
    CHECK(wait_for(zeroed, d));
    CHECK(layer_ahead_host_bytes() == WINDOW);
    char *big = malloc(2 << 20);
    CHECK(big != NULL);
    for (uint64_t i = 0; big && i < 4; i++) { /* 8 MiB in flushes of 2 MiB: past the 4 MiB of zeros */
        memset(big, (int)(10 + i), 2 << 20);
        CHECK(layer_write(d, big, 2 << 20, (8 + 2 * i) << 20) == 0);
        CHECK(layer_flush(d) == 0);
    }
    free(big);
    CHECK(wait_for(nothing_held, d));
    layer_close(d);

    /* A layer written through (O_DIRECT) in large flushes gets its log
     * allocated ahead instead of zeroed, by the flush itself, before it
     * returns: three flushes' worth (6 MiB past the first flush's 2 MiB and
     * its record; a window of zeros would be 4 MiB). Its next writes go
     * through into that space, two flushes of them (the second flush tops
     * the space up), reading back as written, and the share stays within
     * the budget. */
    struct layer *e;
    CHECK(layer_create(dir, DISK_SIZE, &e) == 0);
    void *aligned = NULL;
    CHECK(posix_memalign(&aligned, BS, 2 << 20) == 0);
    if (aligned) {
        memset(aligned, 20, 2 << 20);
        CHECK(layer_write_through(e, aligned, 2 << 20, 0) == 0);
        CHECK(layer_flush(e) == 0);
        CHECK(log_size(e) >= (8 << 20));
        CHECK(layer_ahead_host_bytes() <= 2 * WINDOW);
        struct layer_stats before, after;
        layer_stats(e, &before);
        for (unsigned i = 0; i < 2; i++) {
            memset(aligned, 21 + (int)i, 2 << 20);
            CHECK(layer_write_through(e, aligned, 1 << 20, (4 + 2 * (uint64_t)i) << 20) == 0);
            CHECK(layer_write_through(e, (char *)aligned + (1 << 20), 1 << 20, (5 + 2 * (uint64_t)i) << 20) == 0);
            CHECK(layer_flush(e) == 0);
            CHECK(layer_ahead_host_bytes() <= 2 * WINDOW);
        }
        layer_stats(e, &after);
        CHECK(after.through_blocks - before.through_blocks == (4 << 20) / BS);
        char *back = malloc(2 << 20);
        CHECK(back && layer_read(e, back, 2 << 20, 6 << 20) == 0 && memcmp(back, aligned, 2 << 20) == 0);
        free(back);
    }
    free(aligned);
    layer_close(e);
    CHECK(layer_ahead_host_bytes() == 0);

    /* The same layer's allocation ahead failing half way (a disk filling
     * up): the flush gives back what it got at once, and the layer reads
     * and writes on. */
    struct layer *h;
    CHECK(layer_create(dir, DISK_SIZE, &h) == 0);
    aligned = NULL;
    CHECK(posix_memalign(&aligned, BS, 2 << 20) == 0);
    if (aligned) {
        int (*real_ahead_fallocate)(int, int, off_t, off_t) = layer_syscalls.ahead_fallocate;
        layer_syscalls.ahead_fallocate = half_fallocate;
        memset(aligned, 24, 2 << 20);
        CHECK(layer_write_through(h, aligned, 2 << 20, 0) == 0);
        CHECK(layer_flush(h) == 0);
        layer_syscalls.ahead_fallocate = real_ahead_fallocate;
        CHECK(atomic_load(&allocation_failed));
        if (log_size(h) >= (3 << 20))
            fprintf(stderr, "a failed allocation ahead kept its space: the log has %llu bytes\n",
                    (unsigned long long)log_size(h));
        CHECK(log_size(h) < (3 << 20) && layer_ahead_host_bytes() == 0);
        char *back = malloc(2 << 20);
        CHECK(back && layer_read(h, back, 2 << 20, 0) == 0 && memcmp(back, aligned, 2 << 20) == 0);
        CHECK(layer_write_through(h, aligned, 2 << 20, 2 << 20) == 0 && layer_flush(h) == 0);
        CHECK(back && layer_read(h, back, 2 << 20, 2 << 20) == 0 && memcmp(back, aligned, 2 << 20) == 0);
        free(back);
    }
    free(aligned);
    layer_close(h);
    CHECK(layer_ahead_host_bytes() == 0);

    /* A layer that wrote nothing for the idle time gives its zeros back
     * while it stays open: its log is cut at its tail, with its times kept,
     * and what it wrote reads back, also after a reopen; it gets zeros
     * again when it writes and flushes little again. */
    struct layer *g;
    CHECK(layer_create(dir, DISK_SIZE, &g) == 0);
    char path[512];
    struct stat flushed_st, cut_st;
    snprintf(path, sizeof(path), "%s/%s.log", dir, layer_id(g));
    small_flush(g, 30);
    CHECK(stat(path, &flushed_st) == 0); /* the write's time, or the zeroing's if it came first */
    CHECK(wait_for(zeroed, g));
    CHECK(layer_ahead_host_bytes() == WINDOW);
    layer_set_ahead_idle(0); /* wakes the background threads, which find g idle */
    CHECK(wait_for(nothing_held, g));
    CHECK(stat(path, &cut_st) == 0);
    CHECK((uint64_t)cut_st.st_size < WINDOW && cut_st.st_size > 0);
    CHECK(cut_st.st_mtim.tv_sec < flushed_st.st_mtim.tv_sec || /* not the cut's own time */
          (cut_st.st_mtim.tv_sec == flushed_st.st_mtim.tv_sec && cut_st.st_mtim.tv_nsec <= flushed_st.st_mtim.tv_nsec));
    memset(want, 30, sizeof(want));
    CHECK(layer_read(g, buf, sizeof(buf), 30 * sizeof(buf)) == 0 && memcmp(buf, want, sizeof(buf)) == 0);
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(g));
    layer_close(g);
    CHECK(layer_open(dir, id, DISK_SIZE, &g) == 0);
    CHECK(g && layer_read(g, buf, sizeof(buf), 30 * sizeof(buf)) == 0 && memcmp(buf, want, sizeof(buf)) == 0);
    layer_set_ahead_idle(3600ull * 1000000000ull);
    if (g) {
        small_flush(g, 32);
        CHECK(wait_for(zeroed, g));
        CHECK(layer_ahead_host_bytes() == WINDOW);
        memset(want, 32, sizeof(want));
        CHECK(layer_read(g, buf, sizeof(buf), 32 * sizeof(buf)) == 0 && memcmp(buf, want, sizeof(buf)) == 0);
    }
    layer_close(g);
    CHECK(layer_ahead_host_bytes() == 0);

    /* Times set while an idle layer gives its zeros back are kept: the
     * give-back puts back only the times its cut moved. */
    struct layer *t;
    CHECK(layer_create(dir, DISK_SIZE, &t) == 0);
    small_flush(t, 34);
    CHECK(wait_for(zeroed, t));
    real_ftruncate_saved = layer_syscalls.ftruncate;
    layer_syscalls.ftruncate = touching_ftruncate;
    atomic_store(&touched, t);
    layer_set_ahead_idle(0);
    for (uint64_t end = now_ms() + 60000; !atomic_load(&touch_due) && now_ms() < end;)
        sleep_ms(5);
    CHECK(atomic_load(&touch_due)); /* the cut came */
    CHECK(layer_set_times(t, touch_times) == 0);
    atomic_store(&touch_done, true);
    CHECK(wait_for(nothing_held, t));
    layer_set_ahead_idle(3600ull * 1000000000ull);
    layer_syscalls.ftruncate = real_ftruncate_saved;
    struct timespec at, mt;
    CHECK(layer_get_times(t, &at, &mt) == 0);
    if (mt.tv_sec != touch_times[1].tv_sec)
        fprintf(stderr, "the times set during the give-back were lost: mtime %lld\n", (long long)mt.tv_sec);
    CHECK(mt.tv_sec == touch_times[1].tv_sec && at.tv_sec == touch_times[0].tv_sec);
    layer_close(t);
    CHECK(layer_ahead_host_bytes() == 0);

    /* Times set between a zeroing's start and its writes stay once it is
     * done: it puts back those, not the ones it saw at its start. */
    real_zero_pwrite_saved = layer_syscalls.zero_pwrite;
    layer_syscalls.zero_pwrite = hooked_zero_pwrite;
    struct layer *u;
    CHECK(layer_create(dir, DISK_SIZE, &u) == 0);
    atomic_store(&zeroing_touched, u);
    small_flush(u, 36);
    CHECK(wait_for(zeroed, u));
    CHECK(atomic_load(&zeroing_touched) == NULL && !atomic_load(&touch_failed)); /* the touch came */
    /* The pass ends (synced, times put back) some time after its last
     * write: the times are looked at until then, and after. */
    bool kept = wait_for(has_touch_times, u);
    sleep_ms(500);
    CHECK(layer_get_times(u, &at, &mt) == 0);
    if (!kept || mt.tv_sec != touch_times[1].tv_sec)
        fprintf(stderr, "the times set during the zeroing were lost: mtime %lld\n", (long long)mt.tv_sec);
    CHECK(kept && mt.tv_sec == touch_times[1].tv_sec && at.tv_sec == touch_times[0].tv_sec);
    layer_close(u);

    /* A zeroing whose writes fail after the first (a disk filling up) gives
     * back what it wrote at once, not when the layer is opened again, and
     * counts nothing; what was written reads back, and writes go on. */
    struct layer *v;
    CHECK(layer_create(dir, DISK_SIZE, &v) == 0);
    atomic_store(&zero_writes, 0);
    atomic_store(&zeroing_fails, true);
    small_flush(v, 38);
    if (!wait_for(zeroing_given_back, v))
        fprintf(stderr, "a failed zeroing kept its space: the log has %llu bytes\n", (unsigned long long)log_size(v));
    CHECK(zeroing_given_back(v));
    CHECK(layer_ahead_host_bytes() == 0);
    atomic_store(&zeroing_fails, false);
    layer_syscalls.zero_pwrite = real_zero_pwrite_saved;
    memset(want, 38, sizeof(want));
    CHECK(layer_read(v, buf, sizeof(buf), 38 * sizeof(buf)) == 0 && memcmp(buf, want, sizeof(buf)) == 0);
    small_flush(v, 39);
    memset(want, 39, sizeof(want));
    CHECK(layer_read(v, buf, sizeof(buf), 39 * sizeof(buf)) == 0 && memcmp(buf, want, sizeof(buf)) == 0);
    layer_close(v);
    CHECK(layer_ahead_host_bytes() == 0);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    return check_summary();
}
