/* Unit tests for cache.c: layout, acquire/fill/release, persistence across
 * reopen, dropping of damaged chunk files, single flight, abandon and
 * deadlines. Also run under ThreadSanitizer (label "concurrency"), so every
 * CHECK runs on the main thread; worker threads only record results. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "check.h"
#include "test_files.h"
#include "hash.h"
#include "util.h"

#define CS (64u * 1024)
#define THREADS 8
#define LONG_DEADLINE_NS (60ull * 1000000000ull)

static void make_chunk(unsigned char *buf, size_t len, unsigned seed, struct chunk_hash *h)
{
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (unsigned char)x;
    }
    chunk_hash_compute(buf, len, h);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* True when fd holds exactly data. */
static int fd_holds(int fd, const unsigned char *data, size_t len)
{
    if (fd < 0)
        return 0;
    unsigned char *buf = malloc(len + 1);
    if (!buf)
        return 0;
    ssize_t n = pread(fd, buf, len + 1, 0);
    int ok = n == (ssize_t)len && memcmp(buf, data, len) == 0;
    free(buf);
    return ok;
}

static void chunk_file(const char *dir, const struct chunk_hash *h, char *out, size_t len)
{
    char hex[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(h, hex);
    snprintf(out, len, "%s/chunks/%.2s/%s", dir, hex, hex);
}

static int flip_byte_in_file(const char *path, off_t off)
{
    int fd = open(path, O_RDWR);
    if (fd < 0)
        return -1;
    unsigned char b;
    int rc = -1;
    if (pread(fd, &b, 1, off) == 1) {
        b ^= 0x40;
        rc = pwrite(fd, &b, 1, off) == 1 ? 0 : -1;
    }
    close(fd);
    return rc;
}

static struct cache *reopen(struct cache *cache, const char *dir)
{
    cache_close(cache);
    struct cache *c = NULL;
    char err[256] = "";
    int rc = cache_open(dir, &c, err, sizeof(err));
    CHECK(rc == 0 && c != NULL);
    if (rc) {
        fprintf(stderr, "cache_open: %s\n", err);
        exit(1);
    }
    return c;
}

/* ---- basic life cycle ------------------------------------------------------ */

static void test_basic(const char *dir)
{
    char path[PATH_MAX], err[256] = "";
    struct stat st;
    struct cache *cache = NULL;
    CHECK(cache_open(dir, &cache, err, sizeof(err)) == 0 && cache);
    if (!cache) {
        fprintf(stderr, "cache_open: %s\n", err);
        exit(1);
    }
    CHECK(strcmp(cache_dir(cache), dir) == 0);

    /* Layout: the marker and the 256 chunk subdirectories. */
    char *marker = NULL;
    size_t mlen = 0;
    path_join(path, sizeof(path), "%s/imgfs-cache", dir);
    CHECK(read_file(path, 64, &marker, &mlen) == 0 && mlen == 14 && memcmp(marker, "imgfs-cache 1\n", 14) == 0);
    free(marker);
    int subdirs = 0;
    for (int i = 0; i < 256; i++) {
        path_join(path, sizeof(path), "%s/chunks/%02x", dir, i);
        subdirs += stat(path, &st) == 0 && S_ISDIR(st.st_mode);
    }
    CHECK(subdirs == 256);

    unsigned char *a = malloc(CS), *b = malloc(CS);
    struct chunk_hash ha, hb;
    make_chunk(a, CS, 1, &ha);
    make_chunk(b, CS, 2, &hb);

    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 0 && u.bytes == 0 && u.dropped_damaged == 0);
    CHECK(!cache_contains(cache, &ha));

    /* Miss: the caller must fill. */
    struct cache_pin pin = {.entry = NULL, .fd = -1};
    uint64_t deadline = now_ns() + LONG_DEADLINE_NS;
    CHECK(cache_acquire(cache, &ha, CS, deadline, &pin) == CACHE_MUST_FILL);
    CHECK(pin.entry != NULL);
    CHECK(!cache_contains(cache, &ha)); /* not resident until filled */
    CHECK(cache_fill(cache, &pin, a, CS) == 0);
    CHECK(fd_holds(pin.fd, a, CS));
    CHECK(cache_contains(cache, &ha));
    cache_release(cache, &pin);
    CHECK(pin.entry == NULL && pin.fd == -1);

    chunk_file(dir, &ha, path, sizeof(path));
    CHECK(stat(path, &st) == 0 && st.st_size == CS);

    /* Hit. */
    CHECK(cache_acquire(cache, &ha, CS, deadline, &pin) == CACHE_HIT);
    CHECK(fd_holds(pin.fd, a, CS));
    /* Two pins of one chunk at once. */
    struct cache_pin pin2 = {.entry = NULL, .fd = -1};
    CHECK(cache_acquire(cache, &ha, CS, deadline, &pin2) == CACHE_HIT);
    CHECK(fd_holds(pin2.fd, a, CS));
    cache_release(cache, &pin2);
    CHECK(fd_holds(pin.fd, a, CS)); /* still valid while pinned */
    cache_release(cache, &pin);
    cache_release(cache, &pin); /* releasing a released pin is harmless */

    /* A second chunk. */
    CHECK(cache_acquire(cache, &hb, CS, deadline, &pin) == CACHE_MUST_FILL);
    CHECK(cache_fill(cache, &pin, b, CS) == 0);
    cache_release(cache, &pin);
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 2 && u.bytes == 2 * CS);

    /* Reopen: the chunks are found again and verified on first use. A
     * leftover temp file of a crashed fill is cleaned up. */
    char tmp[PATH_MAX + 16];
    snprintf(tmp, sizeof(tmp), "%s.tmp.12345", path);
    int fd = open(tmp, O_WRONLY | O_CREAT, 0644);
    CHECK(fd >= 0);
    if (fd >= 0)
        close(fd);
    cache = reopen(cache, dir);
    CHECK(access(tmp, F_OK) != 0);
    CHECK(cache_contains(cache, &ha) && cache_contains(cache, &hb));
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 2 && u.bytes == 2 * CS && u.dropped_damaged == 0);
    CHECK(cache_acquire(cache, &ha, CS, deadline, &pin) == CACHE_HIT);
    CHECK(fd_holds(pin.fd, a, CS));
    cache_release(cache, &pin);

    /* Damage: flip a byte of a's file, truncate b's file, then reopen. */
    chunk_file(dir, &ha, path, sizeof(path));
    CHECK(flip_byte_in_file(path, CS / 2) == 0);
    char path_b[PATH_MAX];
    chunk_file(dir, &hb, path_b, sizeof(path_b));
    CHECK(truncate(path_b, CS / 2) == 0);
    cache = reopen(cache, dir);
    CHECK(cache_acquire(cache, &ha, CS, deadline, &pin) == CACHE_MUST_FILL);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 1);
    CHECK(access(path, F_OK) != 0); /* the damaged file is gone */
    CHECK(cache_fill(cache, &pin, a, CS) == 0);
    CHECK(fd_holds(pin.fd, a, CS));
    cache_release(cache, &pin);
    CHECK(cache_acquire(cache, &hb, CS, deadline, &pin) == CACHE_MUST_FILL);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 2);
    cache_abandon(cache, &pin);
    CHECK(pin.entry == NULL);
    CHECK(!cache_contains(cache, &hb));
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 1 && u.bytes == CS);

    /* After refilling, a reopened cache verifies the file and hits. */
    cache = reopen(cache, dir);
    CHECK(cache_acquire(cache, &ha, CS, deadline, &pin) == CACHE_HIT);
    CHECK(fd_holds(pin.fd, a, CS));
    cache_release(cache, &pin);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 0);

    /* A chunk file swapped for another chunk's bytes is also damage. */
    CHECK(cache_acquire(cache, &hb, CS, deadline, &pin) == CACHE_MUST_FILL);
    CHECK(cache_fill(cache, &pin, b, CS) == 0);
    cache_release(cache, &pin);
    chunk_file(dir, &ha, path, sizeof(path));
    CHECK(rename(path_b, path) == 0);
    cache = reopen(cache, dir);
    CHECK(cache_acquire(cache, &ha, CS, deadline, &pin) == CACHE_MUST_FILL);
    cache_abandon(cache, &pin);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 1);

    /* A chunk file with an extra byte appended is damage too, even though
     * its first CS bytes hash correctly. */
    CHECK(cache_acquire(cache, &hb, CS, deadline, &pin) == CACHE_MUST_FILL);
    CHECK(cache_fill(cache, &pin, b, CS) == 0);
    cache_release(cache, &pin);
    chunk_file(dir, &hb, path_b, sizeof(path_b));
    fd = open(path_b, O_WRONLY | O_APPEND);
    CHECK(fd >= 0 && write(fd, "x", 1) == 1);
    if (fd >= 0)
        close(fd);
    cache = reopen(cache, dir);
    CHECK(cache_acquire(cache, &hb, CS, deadline, &pin) == CACHE_MUST_FILL);
    cache_abandon(cache, &pin);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 1);

    cache_close(cache);
    free(a);
    free(b);

    /* Bad directories. */
    path_join(path, sizeof(path), "%s/no-such-dir", dir);
    err[0] = '\0';
    cache = NULL;
    CHECK(cache_open(path, &cache, err, sizeof(err)) < 0 && err[0]);
    path_join(path, sizeof(path), "%s/imgfs-cache", dir);
    err[0] = '\0';
    CHECK(cache_open(path, &cache, err, sizeof(err)) < 0 && err[0]); /* a file */
    CHECK(write_file_atomic(path, "imgfs-cache 9\n", 14) == 0);
    err[0] = '\0';
    CHECK(cache_open(dir, &cache, err, sizeof(err)) == -EBADMSG && err[0]);
}

/* ---- single flight --------------------------------------------------------- */

struct flight {
    struct cache *cache;
    struct chunk_hash hash;
    const unsigned char *data;
    pthread_barrier_t start;
    atomic_int fills;
};

struct worker {
    struct flight *f;
    int acquire_rc;
    int fill_rc;
    int data_ok;
};

static void *flight_worker(void *arg)
{
    struct worker *w = arg;
    struct flight *f = w->f;
    pthread_barrier_wait(&f->start);
    struct cache_pin pin = {.entry = NULL, .fd = -1};
    w->acquire_rc = cache_acquire(f->cache, &f->hash, CS, now_ns() + LONG_DEADLINE_NS, &pin);
    if (w->acquire_rc == CACHE_MUST_FILL) {
        atomic_fetch_add(&f->fills, 1);
        sleep_ms(50); /* a slow fetch: the others must wait, not fetch */
        w->fill_rc = cache_fill(f->cache, &pin, f->data, CS);
        if (w->fill_rc != 0)
            return NULL;
    } else if (w->acquire_rc != CACHE_HIT) {
        return NULL;
    }
    w->data_ok = fd_holds(pin.fd, f->data, CS);
    cache_release(f->cache, &pin);
    return NULL;
}

/* expect_fill: the chunk is missing (one filler) or already on disk (none). */
static void test_single_flight(struct cache *cache, unsigned seed, int expect_fill)
{
    unsigned char *data = malloc(CS);
    struct flight f = {.cache = cache, .data = data};
    make_chunk(data, CS, seed, &f.hash);
    atomic_init(&f.fills, 0);
    pthread_barrier_init(&f.start, NULL, THREADS);
    pthread_t th[THREADS];
    struct worker w[THREADS];
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct worker){.f = &f, .acquire_rc = -1, .fill_rc = -1};
        CHECK(pthread_create(&th[i], NULL, flight_worker, &w[i]) == 0);
    }
    int must_fill = 0, hits = 0, ok = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        must_fill += w[i].acquire_rc == CACHE_MUST_FILL;
        hits += w[i].acquire_rc == CACHE_HIT;
        ok += w[i].data_ok;
        if (w[i].acquire_rc == CACHE_MUST_FILL)
            CHECK(w[i].fill_rc == 0);
    }
    pthread_barrier_destroy(&f.start);
    CHECK(must_fill == expect_fill);
    CHECK(hits == THREADS - expect_fill);
    CHECK(ok == THREADS);
    CHECK(atomic_load(&f.fills) == expect_fill);
    CHECK(cache_contains(cache, &f.hash));
    struct cache_pin pin = {.entry = NULL, .fd = -1};
    CHECK(cache_acquire(cache, &f.hash, CS, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_HIT);
    CHECK(fd_holds(pin.fd, data, CS));
    cache_release(cache, &pin);
    free(data);
}

/* ---- abandon and deadline -------------------------------------------------- */

struct waiter {
    struct cache *cache;
    struct chunk_hash hash;
    const unsigned char *data;
    uint64_t deadline_ns;
    bool fill;
    int acquire_rc;
    int fill_rc;
    int data_ok;
};

static void *wait_worker(void *arg)
{
    struct waiter *w = arg;
    struct cache_pin pin = {.entry = NULL, .fd = -1};
    w->acquire_rc = cache_acquire(w->cache, &w->hash, CS, w->deadline_ns, &pin);
    if (w->acquire_rc == CACHE_MUST_FILL) {
        if (w->fill) {
            w->fill_rc = cache_fill(w->cache, &pin, w->data, CS);
            if (w->fill_rc == 0)
                w->data_ok = fd_holds(pin.fd, w->data, CS);
            if (w->fill_rc == 0)
                cache_release(w->cache, &pin);
        } else {
            cache_abandon(w->cache, &pin);
        }
    } else if (w->acquire_rc == CACHE_HIT) {
        w->data_ok = fd_holds(pin.fd, w->data, CS);
        cache_release(w->cache, &pin);
    }
    return NULL;
}

static void test_abandon(struct cache *cache)
{
    unsigned char *data = malloc(CS);
    struct waiter w = {.cache = cache, .data = data, .fill = true, .acquire_rc = -1, .fill_rc = -1};
    make_chunk(data, CS, 77, &w.hash);
    w.deadline_ns = now_ns() + LONG_DEADLINE_NS;

    struct cache_pin pin = {.entry = NULL, .fd = -1};
    CHECK(cache_acquire(cache, &w.hash, CS, w.deadline_ns, &pin) == CACHE_MUST_FILL);
    pthread_t th;
    CHECK(pthread_create(&th, NULL, wait_worker, &w) == 0);
    sleep_ms(50); /* most likely the waiter is now waiting; either way the result is the same */
    cache_abandon(cache, &pin);
    pthread_join(th, NULL);
    CHECK(w.acquire_rc == CACHE_MUST_FILL); /* the waiter took over */
    CHECK(w.fill_rc == 0 && w.data_ok);
    CHECK(cache_acquire(cache, &w.hash, CS, w.deadline_ns, &pin) == CACHE_HIT);
    CHECK(fd_holds(pin.fd, data, CS));
    cache_release(cache, &pin);

    /* Abandon with nobody waiting: the next caller must fill. */
    struct chunk_hash h2;
    make_chunk(data, CS, 78, &h2);
    CHECK(cache_acquire(cache, &h2, CS, w.deadline_ns, &pin) == CACHE_MUST_FILL);
    cache_abandon(cache, &pin);
    CHECK(!cache_contains(cache, &h2));
    CHECK(cache_acquire(cache, &h2, CS, w.deadline_ns, &pin) == CACHE_MUST_FILL);
    CHECK(cache_fill(cache, &pin, data, CS) == 0);
    cache_release(cache, &pin);
    free(data);
}

static void test_deadline(struct cache *cache)
{
    unsigned char *data = malloc(CS);
    struct waiter w = {.cache = cache, .data = data, .fill = false, .acquire_rc = -1, .fill_rc = -1};
    make_chunk(data, CS, 99, &w.hash);

    struct cache_pin pin = {.entry = NULL, .fd = -1};
    CHECK(cache_acquire(cache, &w.hash, CS, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_MUST_FILL);

    /* A waiter in another thread whose deadline passes while we hold the fill. */
    w.deadline_ns = now_ns() + 30ull * 1000000ull;
    pthread_t th;
    CHECK(pthread_create(&th, NULL, wait_worker, &w) == 0);
    pthread_join(th, NULL);
    CHECK(w.acquire_rc == -ETIMEDOUT);

    /* A deadline that has already passed. */
    struct cache_pin other = {.entry = NULL, .fd = -1};
    CHECK(cache_acquire(cache, &w.hash, CS, now_ns() - 1, &other) == -ETIMEDOUT);
    CHECK(cache_acquire(cache, &w.hash, CS, 0, &other) == -ETIMEDOUT);

    /* The fill still works after waiters gave up, and then everyone hits. */
    CHECK(cache_fill(cache, &pin, data, CS) == 0);
    cache_release(cache, &pin);
    w.deadline_ns = now_ns() + 30ull * 1000000ull;
    w.acquire_rc = -1;
    CHECK(pthread_create(&th, NULL, wait_worker, &w) == 0);
    pthread_join(th, NULL);
    CHECK(w.acquire_rc == CACHE_HIT && w.data_ok);
    free(data);
}

/* Many threads over a few chunks, a mix of hits, misses and abandons. */
struct storm {
    struct cache *cache;
    unsigned char *data[4];
    struct chunk_hash hash[4];
    int id;
    int errors;
};

static void *storm_worker(void *arg)
{
    struct storm *s = arg;
    for (int i = 0; i < 200; i++) {
        int k = (i + s->id) % 4;
        struct cache_pin pin = {.entry = NULL, .fd = -1};
        int rc = cache_acquire(s->cache, &s->hash[k], CS, now_ns() + LONG_DEADLINE_NS, &pin);
        if (rc == CACHE_MUST_FILL) {
            if ((i + s->id) % 3 == 0) {
                cache_abandon(s->cache, &pin);
                continue;
            }
            if (cache_fill(s->cache, &pin, s->data[k], CS) != 0) {
                s->errors++;
                continue;
            }
        } else if (rc != CACHE_HIT) {
            s->errors++;
            continue;
        }
        if (!fd_holds(pin.fd, s->data[k], CS))
            s->errors++;
        cache_release(s->cache, &pin);
    }
    return NULL;
}

static void test_storm(struct cache *cache)
{
    struct storm base = {.cache = cache};
    for (int k = 0; k < 4; k++) {
        base.data[k] = malloc(CS);
        make_chunk(base.data[k], CS, 1000 + (unsigned)k, &base.hash[k]);
    }
    struct storm s[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        s[i] = base;
        s[i].id = i;
        CHECK(pthread_create(&th[i], NULL, storm_worker, &s[i]) == 0);
    }
    int errors = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        errors += s[i].errors;
    }
    CHECK(errors == 0);
    for (int k = 0; k < 4; k++) {
        CHECK(cache_contains(cache, &base.hash[k]));
        free(base.data[k]);
    }
}

int main(void)
{
    log_set_level(LOG_LEVEL_ERROR); /* the damage tests log warnings on purpose */
    char dir[] = "/tmp/imgfs-test-cache-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char sub[PATH_MAX];
    path_join(sub, sizeof(sub), "%s/basic", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_basic(sub);

    path_join(sub, sizeof(sub), "%s/threads", dir);
    CHECK(mkdir(sub, 0755) == 0);
    struct cache *cache = NULL;
    char err[256] = "";
    CHECK(cache_open(sub, &cache, err, sizeof(err)) == 0);
    if (!cache) {
        fprintf(stderr, "cache_open: %s\n", err);
        return 1;
    }
    for (unsigned round = 0; round < 5; round++)
        test_single_flight(cache, 500 + round, 1);
    test_abandon(cache);
    test_deadline(cache);
    test_storm(cache);

    /* Single flight over a chunk that is on disk but not yet verified in
     * this run: one thread verifies, nobody fills. */
    cache = reopen(cache, sub);
    test_single_flight(cache, 500, 0); /* seed 500 was filled above */
    cache_close(cache);

    remove_tree(dir);
    return check_summary();
}
