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
#include <sys/mman.h>
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

/* True when a pin's bytes are exactly data. */
static int pin_holds(const struct cache_pin *pin, const unsigned char *data, size_t len)
{
    if (pin->fd < 0)
        return 0;
    unsigned char *buf = malloc(len);
    if (!buf)
        return 0;
    ssize_t n = pread(pin->fd, buf, len, (off_t)pin->off);
    int ok = n == (ssize_t)len && memcmp(buf, data, len) == 0;
    free(buf);
    return ok;
}

/* Where a resident chunk is; CHECKs that it is. */
struct where {
    char path[PATH_MAX];
    uint64_t off, len;
};

static struct where locate(struct cache *cache, const struct chunk_hash *h)
{
    struct where w = {"", 0, 0};
    CHECK(cache_locate(cache, h, w.path, sizeof(w.path), &w.off, &w.len) == 0);
    return w;
}

/* Copies len bytes at from in one file over the bytes at to in another. */
static int copy_bytes(const char *from_path, off_t from, const char *to_path, off_t to, size_t len)
{
    int in = open(from_path, O_RDONLY), out = open(to_path, O_RDWR);
    unsigned char *buf = malloc(len);
    int rc = in >= 0 && out >= 0 && buf && pread(in, buf, len, from) == (ssize_t)len &&
                     pwrite(out, buf, len, to) == (ssize_t)len
                 ? 0
                 : -1;
    free(buf);
    if (in >= 0)
        close(in);
    if (out >= 0)
        close(out);
    return rc;
}

static uint64_t disk_bytes_of_packs(const char *dir)
{
    char path[PATH_MAX];
    path_join(path, sizeof(path), "%s/packs", dir);
    DIR *d = opendir(path);
    uint64_t total = 0;
    struct dirent *de;
    while (d && (de = readdir(d))) {
        struct stat st;
        if (strstr(de->d_name, ".pack") && fstatat(dirfd(d), de->d_name, &st, 0) == 0)
            total += (uint64_t)st.st_blocks * 512;
    }
    if (d)
        closedir(d);
    return total;
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

static struct cache *open_cache(const char *dir)
{
    struct cache *c = NULL;
    char err[256] = "";
    CHECK(cache_open(dir, &c, err, sizeof(err)) == 0 && c != NULL);
    if (!c) {
        fprintf(stderr, "cache_open: %s\n", err);
        exit(1);
    }
    return c;
}

/* A miss filled with data and released; CHECKs each step. */
static void fill_chunk(struct cache *cache, const struct chunk_hash *h, const unsigned char *data)
{
    struct cache_pin pin = {.entry = NULL, .fd = -1};
    CHECK(cache_acquire(cache, h, CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_MUST_FILL);
    CHECK(cache_fill(cache, &pin, data, CS) == 0);
    cache_release(cache, &pin);
}

/* True when the chunk is a hit and its bytes are data. */
static bool hits_with(struct cache *cache, const struct chunk_hash *h, const unsigned char *data)
{
    struct cache_pin pin = {.entry = NULL, .fd = -1};
    if (cache_acquire(cache, h, CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin) != CACHE_HIT)
        return false;
    bool ok = pin_holds(&pin, data, CS);
    cache_release(cache, &pin);
    return ok;
}

static struct cache *reopen(struct cache *cache, const char *dir)
{
    cache_close(cache);
    return open_cache(dir);
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

    /* Layout: the marker and the packs directory. */
    char *marker = NULL;
    size_t mlen = 0;
    path_join(path, sizeof(path), "%s/imgfs-cache", dir);
    CHECK(read_file(path, 64, &marker, &mlen) == 0 && mlen == 14 && memcmp(marker, "imgfs-cache 2\n", 14) == 0);
    free(marker);
    path_join(path, sizeof(path), "%s/packs", dir);
    CHECK(stat(path, &st) == 0 && S_ISDIR(st.st_mode));

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
    CHECK(cache_acquire(cache, &ha, CS, 0, 0, deadline, &pin) == CACHE_MUST_FILL);
    CHECK(pin.entry != NULL);
    CHECK(!cache_contains(cache, &ha)); /* not resident until filled */
    CHECK(cache_fill(cache, &pin, a, CS) == 0);
    CHECK(pin_holds(&pin, a, CS));
    CHECK(cache_contains(cache, &ha));
    cache_release(cache, &pin);
    CHECK(pin.entry == NULL && pin.fd == -1);

    /* The chunk is in a pack, at an aligned offset. */
    struct where wa = locate(cache, &ha);
    CHECK(strstr(wa.path, "/packs/") && strstr(wa.path, ".pack") && wa.off % 4096 == 0 && wa.len == CS);
    CHECK(stat(wa.path, &st) == 0 && (uint64_t)st.st_size >= wa.off + CS);

    /* Hit. */
    CHECK(cache_acquire(cache, &ha, CS, 0, 0, deadline, &pin) == CACHE_HIT);
    CHECK(pin_holds(&pin, a, CS) && pin.off == wa.off);
    /* Two pins of one chunk at once. */
    struct cache_pin pin2 = {.entry = NULL, .fd = -1};
    CHECK(cache_acquire(cache, &ha, CS, 0, 0, deadline, &pin2) == CACHE_HIT);
    CHECK(pin_holds(&pin2, a, CS));
    cache_release(cache, &pin2);
    CHECK(pin_holds(&pin, a, CS)); /* still valid while pinned */
    cache_release(cache, &pin);
    cache_release(cache, &pin); /* releasing a released pin is harmless */

    /* A second chunk. */
    fill_chunk(cache, &hb, b);
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 2 && u.bytes == 2 * CS && u.packs == 1);

    /* Reopen: the chunks are found again and verified on first use. A pack
     * file without its index (a crash between creating the two) goes. */
    char orphan[PATH_MAX];
    path_join(orphan, sizeof(orphan), "%s/packs/0000ff00.pack", dir);
    int fd = open(orphan, O_WRONLY | O_CREAT, 0644);
    CHECK(fd >= 0);
    if (fd >= 0)
        close(fd);
    cache = reopen(cache, dir);
    CHECK(access(orphan, F_OK) != 0);
    CHECK(cache_contains(cache, &ha) && cache_contains(cache, &hb));
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 2 && u.bytes == 2 * CS && u.dropped_damaged == 0);
    CHECK(hits_with(cache, &ha, a));

    /* Damage: flip a byte of a inside its pack; cut the pack in the middle
     * of b (a fill that a crash cut short), then reopen. */
    wa = locate(cache, &ha);
    struct where wb = locate(cache, &hb);
    CHECK(strcmp(wa.path, wb.path) == 0 && wb.off > wa.off);
    CHECK(flip_byte_in_file(wa.path, (off_t)(wa.off + CS / 2)) == 0);
    CHECK(truncate(wb.path, (off_t)(wb.off + CS / 2)) == 0);
    cache = reopen(cache, dir);
    CHECK(!cache_contains(cache, &hb)); /* its record points past the end: never served */
    CHECK(cache_acquire(cache, &ha, CS, 0, 0, deadline, &pin) == CACHE_MUST_FILL);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 1);
    CHECK(!cache_contains(cache, &ha) || pin.entry); /* dropped, and being refilled by us */
    CHECK(cache_fill(cache, &pin, a, CS) == 0);
    CHECK(pin_holds(&pin, a, CS));
    cache_release(cache, &pin);
    CHECK(cache_acquire(cache, &hb, CS, 0, 0, deadline, &pin) == CACHE_MUST_FILL);
    cache_abandon(cache, &pin);
    CHECK(pin.entry == NULL);
    CHECK(!cache_contains(cache, &hb));
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 1 && u.bytes == CS);

    /* After refilling, a reopened cache verifies the chunk and hits; the
     * dropped copy stays dropped (its DROP record). */
    cache = reopen(cache, dir);
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 1);
    CHECK(hits_with(cache, &ha, a));
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 0);

    /* Another chunk's bytes where a chunk should be is damage too. */
    fill_chunk(cache, &hb, b);
    wa = locate(cache, &ha);
    wb = locate(cache, &hb);
    CHECK(copy_bytes(wb.path, (off_t)wb.off, wa.path, (off_t)wa.off, CS) == 0);
    cache = reopen(cache, dir);
    CHECK(cache_acquire(cache, &ha, CS, 0, 0, deadline, &pin) == CACHE_MUST_FILL);
    cache_abandon(cache, &pin);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 1);
    CHECK(hits_with(cache, &hb, b));

    /* A torn last index record (a crash in the middle of its write) ends
     * the log: that chunk is not served, and later records line up. */
    unsigned char *c = malloc(CS);
    struct chunk_hash hc;
    make_chunk(c, CS, 3, &hc);
    fill_chunk(cache, &hc, c);
    fill_chunk(cache, &ha, a);
    wa = locate(cache, &ha);
    CHECK(strcmp(locate(cache, &hc).path, wa.path) == 0);
    char idx[PATH_MAX];
    snprintf(idx, sizeof(idx), "%.*s.idx", (int)(strlen(wa.path) - 5), wa.path);
    CHECK(stat(idx, &st) == 0 && st.st_size >= 64 && st.st_size % 64 == 0);
    CHECK(truncate(idx, st.st_size - 10) == 0);
    cache = reopen(cache, dir);
    CHECK(!cache_contains(cache, &ha) && cache_contains(cache, &hb) && cache_contains(cache, &hc));
    CHECK(stat(idx, &st) == 0 && st.st_size == 64); /* c's record, and the torn one cut off */
    CHECK(hits_with(cache, &hc, c));
    free(c);
    /* A garbled record in the middle: the log is cut there too. */
    fill_chunk(cache, &ha, a);
    wa = locate(cache, &ha);
    snprintf(idx, sizeof(idx), "%.*s.idx", (int)(strlen(wa.path) - 5), wa.path);
    CHECK(flip_byte_in_file(idx, 20) == 0); /* the first record: a's */
    cache = reopen(cache, dir);
    CHECK(!cache_contains(cache, &ha));
    CHECK(hits_with(cache, &hb, b));

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
    w->acquire_rc = cache_acquire(f->cache, &f->hash, CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin);
    if (w->acquire_rc == CACHE_MUST_FILL) {
        atomic_fetch_add(&f->fills, 1);
        sleep_ms(50); /* a slow fetch: the others must wait, not fetch */
        w->fill_rc = cache_fill(f->cache, &pin, f->data, CS);
        if (w->fill_rc != 0)
            return NULL;
    } else if (w->acquire_rc != CACHE_HIT) {
        return NULL;
    }
    w->data_ok = pin_holds(&pin, f->data, CS);
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
    CHECK(cache_acquire(cache, &f.hash, CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_HIT);
    CHECK(pin_holds(&pin, data, CS));
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
    w->acquire_rc = cache_acquire(w->cache, &w->hash, CS, 0, 0, w->deadline_ns, &pin);
    if (w->acquire_rc == CACHE_MUST_FILL) {
        if (w->fill) {
            w->fill_rc = cache_fill(w->cache, &pin, w->data, CS);
            if (w->fill_rc == 0)
                w->data_ok = pin_holds(&pin, w->data, CS);
            if (w->fill_rc == 0)
                cache_release(w->cache, &pin);
        } else {
            cache_abandon(w->cache, &pin);
        }
    } else if (w->acquire_rc == CACHE_HIT) {
        w->data_ok = pin_holds(&pin, w->data, CS);
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
    CHECK(cache_acquire(cache, &w.hash, CS, 0, 0, w.deadline_ns, &pin) == CACHE_MUST_FILL);
    pthread_t th;
    CHECK(pthread_create(&th, NULL, wait_worker, &w) == 0);
    sleep_ms(50); /* most likely the waiter is now waiting; either way the result is the same */
    cache_abandon(cache, &pin);
    pthread_join(th, NULL);
    CHECK(w.acquire_rc == CACHE_MUST_FILL); /* the waiter took over */
    CHECK(w.fill_rc == 0 && w.data_ok);
    CHECK(cache_acquire(cache, &w.hash, CS, 0, 0, w.deadline_ns, &pin) == CACHE_HIT);
    CHECK(pin_holds(&pin, data, CS));
    cache_release(cache, &pin);

    /* Abandon with nobody waiting: the next caller must fill. */
    struct chunk_hash h2;
    make_chunk(data, CS, 78, &h2);
    CHECK(cache_acquire(cache, &h2, CS, 0, 0, w.deadline_ns, &pin) == CACHE_MUST_FILL);
    cache_abandon(cache, &pin);
    CHECK(!cache_contains(cache, &h2));
    CHECK(cache_acquire(cache, &h2, CS, 0, 0, w.deadline_ns, &pin) == CACHE_MUST_FILL);
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
    CHECK(cache_acquire(cache, &w.hash, CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_MUST_FILL);

    /* A waiter in another thread whose deadline passes while we hold the fill. */
    w.deadline_ns = now_ns() + 30ull * 1000000ull;
    pthread_t th;
    CHECK(pthread_create(&th, NULL, wait_worker, &w) == 0);
    pthread_join(th, NULL);
    CHECK(w.acquire_rc == -ETIMEDOUT);

    /* A deadline that has already passed. */
    struct cache_pin other = {.entry = NULL, .fd = -1};
    CHECK(cache_acquire(cache, &w.hash, CS, 0, 0, now_ns() - 1, &other) == -ETIMEDOUT);
    CHECK(cache_acquire(cache, &w.hash, CS, 0, 0, 0, &other) == -ETIMEDOUT);

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
        int rc = cache_acquire(s->cache, &s->hash[k], CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin);
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
        if (!pin_holds(&pin, s->data[k], CS))
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

/* ---- the old layout ------------------------------------------------------- */

/* A cache of the one-file-per-chunk layout (imgfs-cache 1) is imported into
 * packs at open: good chunks are served, a damaged one is dropped on first
 * use, leftovers go, other files (meta/, the lock) stay. */
static void test_old_layout(const char *dir)
{
    char path[PATH_MAX];
    path_join(path, sizeof(path), "%s/imgfs-cache", dir);
    CHECK(write_file_atomic(path, "imgfs-cache 1\n", 14) == 0);
    path_join(path, sizeof(path), "%s/meta", dir);
    CHECK(mkdir(path, 0700) == 0);
    path_join(path, sizeof(path), "%s/meta/trust", dir);
    CHECK(write_file_atomic(path, "kept\n", 5) == 0);
    unsigned char *data[3];
    struct chunk_hash h[3];
    for (int i = 0; i < 3; i++) {
        data[i] = malloc(CS);
        make_chunk(data[i], CS, 300 + (unsigned)i, &h[i]);
        char hex[CHUNK_HASH_HEX + 1];
        chunk_hash_to_hex(&h[i], hex);
        path_join(path, sizeof(path), "%s/chunks/%.2s", dir, hex);
        CHECK(mkdir_p(path) == 0);
        path_join(path, sizeof(path), "%s/chunks/%.2s/%s", dir, hex, hex);
        CHECK(write_file_atomic(path, data[i], CS) == 0);
        if (i == 2)
            CHECK(flip_byte_in_file(path, 7) == 0);
        if (i == 0) {
            char tmp[PATH_MAX + 16];
            snprintf(tmp, sizeof(tmp), "%s.tmp.4242", path);
            CHECK(write_file_atomic(tmp, "junk", 4) == 0);
        }
    }
    struct cache *cache = open_cache(dir);
    path_join(path, sizeof(path), "%s/chunks", dir);
    CHECK(access(path, F_OK) != 0); /* imported and gone */
    char *text = NULL;
    size_t len = 0;
    path_join(path, sizeof(path), "%s/imgfs-cache", dir);
    CHECK(read_file(path, 64, &text, &len) == 0 && len == 14 && memcmp(text, "imgfs-cache 2\n", 14) == 0);
    free(text);
    path_join(path, sizeof(path), "%s/meta/trust", dir);
    CHECK(read_file(path, 64, &text, &len) == 0 && len == 5);
    free(text);
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 3 && u.bytes == 3 * CS);
    struct cache_pin pin = {.entry = NULL, .fd = -1};
    uint64_t deadline = now_ns() + LONG_DEADLINE_NS;
    for (int i = 0; i < 2; i++) {
        CHECK(cache_acquire(cache, &h[i], CS, 0, 0, deadline, &pin) == CACHE_HIT);
        CHECK(pin_holds(&pin, data[i], CS));
        cache_release(cache, &pin);
    }
    CHECK(cache_acquire(cache, &h[2], CS, 0, 0, deadline, &pin) == CACHE_MUST_FILL);
    CHECK(cache_fill(cache, &pin, data[2], CS) == 0);
    cache_release(cache, &pin);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 1 && u.chunks == 3);
    /* And the imported chunks are still there after another restart. */
    cache = reopen(cache, dir);
    for (int i = 0; i < 3; i++) {
        CHECK(cache_acquire(cache, &h[i], CS, 0, 0, deadline, &pin) == CACHE_HIT);
        CHECK(pin_holds(&pin, data[i], CS));
        cache_release(cache, &pin);
        free(data[i]);
    }
    cache_close(cache);
}

/* ---- eviction with pins in packs -------------------------------------------- */

/* A small cache_size with small packs: many fills roll packs over and evict
 * by LRU, a pinned and a held chunk keep their bytes throughout, empty packs
 * are removed, the disk use stays near the limit, and a restart brings no
 * evicted chunk back. */
static void test_evict_pins(const char *dir)
{
    struct cache *cache = open_cache(dir);
    const uint64_t limit = 8 * CS;
    cache_set_limit(cache, limit);
    cache_set_pack_limit(cache, 3 * CS);
    uint64_t deadline = now_ns() + LONG_DEADLINE_NS;
    unsigned char *pinned = malloc(CS), *held = malloc(CS), *data = malloc(CS);
    struct chunk_hash hp, hh, h;
    make_chunk(pinned, CS, 700, &hp);
    make_chunk(held, CS, 701, &hh);
    struct cache_pin keep = {.entry = NULL, .fd = -1};
    CHECK(cache_hold(cache, &hh, true) == 0);
    fill_chunk(cache, &hh, held);
    CHECK(cache_acquire(cache, &hp, CS, 0, 0, deadline, &keep) == CACHE_MUST_FILL);
    CHECK(cache_fill(cache, &keep, pinned, CS) == 0);
    struct chunk_hash last[4];
    for (unsigned i = 0; i < 40; i++) {
        make_chunk(data, CS, 800 + i, &h);
        last[i % 4] = h;
        fill_chunk(cache, &h, data);
        struct cache_usage u;
        cache_get_usage(cache, &u);
        CHECK(u.bytes <= limit);
    }
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.evictions >= 30);
    CHECK(u.packs <= 6); /* 42 chunks went through packs of 3 */
    CHECK(pin_holds(&keep, pinned, CS));
    CHECK(cache_contains(cache, &hh) && cache_contains(cache, &last[39 % 4]));
    CHECK(disk_bytes_of_packs(dir) <= limit + 4 * CS); /* punched holes gave the space back */
    /* Everything unpinned is in use: a fill that cannot fit fails with ENOSPC. */
    struct cache_pin many[8];
    int npinned = 0;
    for (unsigned i = 0; i < 8; i++) {
        make_chunk(data, CS, 900 + i, &h);
        many[i] = (struct cache_pin){.entry = NULL, .fd = -1};
        int rc = cache_acquire(cache, &h, CS, 0, 0, deadline, &many[i]);
        CHECK(rc == CACHE_MUST_FILL);
        rc = cache_fill(cache, &many[i], data, CS);
        CHECK(rc == 0 || rc == -ENOSPC);
        npinned += rc == 0;
    }
    CHECK(npinned >= 5 && npinned < 8);
    for (int i = 0; i < 8; i++)
        cache_release(cache, &many[i]);
    cache_release(cache, &keep);
    cache_get_usage(cache, &u);
    uint64_t chunks = u.chunks;
    cache = reopen(cache, dir);
    cache_get_usage(cache, &u);
    CHECK(u.chunks == chunks); /* no evicted chunk is back */
    CHECK(hits_with(cache, &hp, pinned));
    cache_close(cache);
    free(pinned);
    free(held);
    free(data);
}

/* ---- running counts: held bytes and the generation --------------------------- */

static uint64_t held_bytes(struct cache *cache)
{
    struct cache_usage u;
    cache_get_usage(cache, &u);
    return u.held_bytes;
}

/* held_bytes follows holds and storage without a walk, and the generation
 * changes exactly when what is stored does: fills, evictions and drops, not
 * holds or hits. */
static void test_running_counts(const char *dir)
{
    struct cache *cache = open_cache(dir);
    unsigned char *a = malloc(CS), *b = malloc(CS), *data = malloc(CS);
    struct chunk_hash ha, hb, h;
    make_chunk(a, CS, 1100, &ha);
    make_chunk(b, CS, 1101, &hb);
    uint64_t gen = cache_generation(cache);
    CHECK(cache_hold(cache, &ha, true) == 0); /* held before it is stored: nothing counts yet */
    CHECK(held_bytes(cache) == 0 && !cache_stores(cache, &ha) && cache_generation(cache) == gen);
    fill_chunk(cache, &ha, a);
    CHECK(held_bytes(cache) == CS && cache_stores(cache, &ha));
    CHECK(cache_generation(cache) != gen);
    gen = cache_generation(cache);
    fill_chunk(cache, &hb, b);
    CHECK(held_bytes(cache) == CS && cache_generation(cache) != gen);
    gen = cache_generation(cache);
    CHECK(cache_hold(cache, &hb, true) == 0 && cache_hold(cache, &hb, true) == 0); /* holds nest */
    CHECK(held_bytes(cache) == 2 * CS);
    CHECK(cache_hold(cache, &hb, false) == 0 && held_bytes(cache) == 2 * CS);
    CHECK(cache_hold(cache, &hb, false) == 0 && held_bytes(cache) == CS);
    CHECK(cache_hold(cache, &hb, false) == 0 && held_bytes(cache) == CS); /* not held: no change */
    CHECK(hits_with(cache, &ha, a) && hits_with(cache, &hb, b));
    CHECK(cache_generation(cache) == gen); /* holds and hits store nothing */

    /* Holds live in memory (pre-copy loads them again); storage survives. */
    cache = reopen(cache, dir);
    gen = cache_generation(cache);
    CHECK(held_bytes(cache) == 0 && cache_stores(cache, &ha) && cache_stores(cache, &hb));
    CHECK(cache_hold(cache, &ha, true) == 0 && held_bytes(cache) == CS);

    /* A held chunk found damaged is dropped: it stops counting. */
    struct where wa = locate(cache, &ha);
    CHECK(flip_byte_in_file(wa.path, (off_t)(wa.off + CS / 3)) == 0);
    struct cache_pin pin = {.entry = NULL, .fd = -1};
    CHECK(cache_acquire(cache, &ha, CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_MUST_FILL);
    CHECK(held_bytes(cache) == 0 && !cache_stores(cache, &ha) && cache_generation(cache) != gen);
    CHECK(cache_fill(cache, &pin, a, CS) == 0); /* filled again, still held */
    cache_release(cache, &pin);
    CHECK(held_bytes(cache) == CS && cache_stores(cache, &ha));

    /* Evictions change the generation; held chunks stay and keep counting. */
    cache_set_limit(cache, 6 * CS);
    gen = cache_generation(cache);
    for (unsigned i = 0; i < 12; i++) {
        make_chunk(data, CS, 1200 + i, &h);
        fill_chunk(cache, &h, data);
    }
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.evictions > 0 && cache_generation(cache) != gen);
    CHECK(!cache_stores(cache, &hb)); /* the oldest unheld one went */
    CHECK(cache_stores(cache, &ha) && u.held_bytes == CS);
    CHECK(cache_hold(cache, &ha, false) == 0 && held_bytes(cache) == 0);
    cache_close(cache);
    free(a);
    free(b);
    free(data);
}

/* ---- compaction ------------------------------------------------------------- */

/* A full pack kept alive by a hot chunk (and a pinned one) while everything
 * else in it is evicted: the hot chunk moves to the active pack, the pinned
 * one stays put and readable, and once it is unpinned the old pack goes. */
static void test_compaction(const char *dir)
{
    struct cache *cache = open_cache(dir);
    cache_set_limit(cache, 40 * CS);
    cache_set_pack_limit(cache, 32 * CS);
    uint64_t deadline = now_ns() + LONG_DEADLINE_NS;
    unsigned char *hot = malloc(CS), *pinned = malloc(CS), *data = malloc(CS);
    struct chunk_hash hh, hp, h;
    make_chunk(hot, CS, 1100, &hh);
    make_chunk(pinned, CS, 1101, &hp);
    struct cache_pin keep = {.entry = NULL, .fd = -1};
    fill_chunk(cache, &hh, hot);
    CHECK(cache_acquire(cache, &hp, CS, 0, 0, deadline, &keep) == CACHE_MUST_FILL);
    CHECK(cache_fill(cache, &keep, pinned, CS) == 0);
    struct where first = locate(cache, &hh);
    CHECK(strcmp(locate(cache, &hp).path, first.path) == 0);
    int hot_ok = 1;
    for (unsigned i = 0; i < 120; i++) {
        make_chunk(data, CS, 1200 + i, &h);
        fill_chunk(cache, &h, data);
        /* Keep the hot chunk the most recently used. */
        hot_ok &= hits_with(cache, &hh, hot);
    }
    CHECK(hot_ok);
    CHECK(strcmp(locate(cache, &hh).path, first.path) != 0); /* moved out */
    CHECK(strcmp(locate(cache, &hp).path, first.path) == 0); /* pinned: stays */
    CHECK(pin_holds(&keep, pinned, CS));
    CHECK(access(first.path, F_OK) == 0);
    cache_release(cache, &keep);
    for (unsigned i = 0; i < 60; i++) {
        make_chunk(data, CS, 1400 + i, &h);
        fill_chunk(cache, &h, data);
        hot_ok &= hits_with(cache, &hh, hot);
    }
    CHECK(hot_ok);
    CHECK(access(first.path, F_OK) != 0); /* the old pack is gone */
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.bytes <= 40 * CS);
    /* The moved chunk is found in its new place after a restart. */
    cache = reopen(cache, dir);
    CHECK(hits_with(cache, &hh, hot));
    cache_close(cache);
    free(hot);
    free(pinned);
    free(data);
}

/* Threads over more chunks than a small cache holds, with small packs: fills,
 * evictions, compaction and hits race; every pinned byte must be right. */
#define CHURN_CHUNKS 48
struct churn {
    struct cache *cache;
    unsigned char **data;
    struct chunk_hash *hash;
    int id;
    int errors;
};

static void *churn_worker(void *arg)
{
    struct churn *c = arg;
    uint32_t x = 2654435761u * (uint32_t)(c->id + 1);
    for (int i = 0; i < 300; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        /* Skewed: the low chunks are hot, so packs keep a few live ones. */
        int k = (int)(x % 4 == 0 ? x % 4 : x % CHURN_CHUNKS);
        struct cache_pin pin = {.entry = NULL, .fd = -1};
        int rc = cache_acquire(c->cache, &c->hash[k], CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin);
        if (rc == CACHE_MUST_FILL) {
            rc = cache_fill(c->cache, &pin, c->data[k], CS);
            if (rc == -ENOSPC)
                continue; /* everything in use at that moment */
            if (rc) {
                c->errors++;
                continue;
            }
        } else if (rc != CACHE_HIT) {
            c->errors++;
            continue;
        }
        if (!pin_holds(&pin, c->data[k], CS))
            c->errors++;
        cache_release(c->cache, &pin);
    }
    return NULL;
}

static void test_churn(const char *dir)
{
    struct cache *cache = open_cache(dir);
    cache_set_limit(cache, 16 * CS);
    cache_set_pack_limit(cache, 8 * CS);
    unsigned char *data[CHURN_CHUNKS];
    struct chunk_hash hash[CHURN_CHUNKS];
    for (int k = 0; k < CHURN_CHUNKS; k++) {
        data[k] = malloc(CS);
        make_chunk(data[k], CS, 2000 + (unsigned)k, &hash[k]);
    }
    struct churn c[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        c[i] = (struct churn){.cache = cache, .data = data, .hash = hash, .id = i};
        CHECK(pthread_create(&th[i], NULL, churn_worker, &c[i]) == 0);
    }
    int errors = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        errors += c[i].errors;
    }
    CHECK(errors == 0);
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.bytes <= 16 * CS && u.evictions > 0);
    /* What is left is right after a restart, too. */
    cache = reopen(cache, dir);
    int wrong = 0;
    for (int k = 0; k < CHURN_CHUNKS; k++) {
        struct cache_pin pin = {.entry = NULL, .fd = -1};
        int rc = cache_acquire(cache, &hash[k], CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin);
        if (rc == CACHE_HIT)
            wrong += !pin_holds(&pin, data[k], CS);
        if (rc == CACHE_HIT)
            cache_release(cache, &pin);
        else if (rc == CACHE_MUST_FILL)
            cache_abandon(cache, &pin);
        free(data[k]);
    }
    cache_get_usage(cache, &u);
    CHECK(wrong == 0 && u.dropped_damaged == 0);
    cache_close(cache);
}

/* Acquires [off, off + len) of a chunk; CACHE_HIT with the bytes of data
 * there, and releases. */
static int range_hits_with(struct cache *cache, const struct chunk_hash *h, uint32_t off, uint32_t len,
                           const unsigned char *data)
{
    struct cache_pin pin;
    if (cache_acquire(cache, h, CS, off, len, now_ns() + LONG_DEADLINE_NS, &pin) != CACHE_HIT)
        return 0;
    unsigned char buf[4096];
    int ok = len <= sizeof(buf) && pread(pin.fd, buf, len, (off_t)(pin.off + off)) == (ssize_t)len &&
             memcmp(buf, data + off, len) == 0;
    cache_release(cache, &pin);
    return ok;
}

static void sums_path_of(const struct where *w, char *out, size_t len)
{
    snprintf(out, len, "%.*s.sums", (int)(strlen(w->path) - 5), w->path);
}

/* Reads of part of a chunk are checked by 4 KiB block against the sums
 * stored with it: a damaged block is caught when it is read, a read of a
 * good block of the same chunk is served, and unknown or wrong sums only
 * make the whole chunk be checked (and the sums written anew). */
static void test_block_checks(const char *dir)
{
    struct cache *cache = open_cache(dir);
    unsigned char *a = malloc(CS);
    struct chunk_hash ha;
    make_chunk(a, CS, 41, &ha);
    fill_chunk(cache, &ha, a);
    struct where wa = locate(cache, &ha);
    char sums[PATH_MAX];
    sums_path_of(&wa, sums, sizeof(sums));
    struct stat st;
    CHECK(stat(sums, &st) == 0 && (uint64_t)st.st_size >= (wa.off + CS) / 4096 * 8);
    struct cache_usage u;

    /* Block 5 damaged: block 2 still reads (checked alone), block 5 is
     * caught, and then the chunk is gone. */
    CHECK(flip_byte_in_file(wa.path, (off_t)(wa.off + 5 * 4096 + 100)) == 0);
    cache = reopen(cache, dir);
    CHECK(range_hits_with(cache, &ha, 2 * 4096 + 10, 4000, a));
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 0);
    struct cache_pin pin;
    CHECK(cache_acquire(cache, &ha, CS, 5 * 4096, 4096, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_MUST_FILL);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 1);
    CHECK(cache_fill(cache, &pin, a, CS) == 0);
    cache_release(cache, &pin);

    /* A pack without sums (an older build's): a read of part of the chunk
     * checks it whole, which writes its sums; after that a damaged block no
     * longer stops reads of the others. */
    wa = locate(cache, &ha);
    sums_path_of(&wa, sums, sizeof(sums));
    cache_close(cache);
    CHECK(unlink(sums) == 0);
    cache = open_cache(dir);
    CHECK(range_hits_with(cache, &ha, 0, 4096, a));
    CHECK(stat(sums, &st) == 0 && (uint64_t)st.st_size >= (wa.off + CS) / 4096 * 8);
    CHECK(flip_byte_in_file(wa.path, (off_t)(wa.off + 9 * 4096)) == 0);
    cache = reopen(cache, dir);
    CHECK(range_hits_with(cache, &ha, 0, 4096, a));
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 0);
    CHECK(flip_byte_in_file(wa.path, (off_t)(wa.off + 9 * 4096)) == 0); /* repaired */

    /* Wrong sums over good bytes: served (the whole check decides), and the
     * sums are right again afterwards. */
    CHECK(flip_byte_in_file(sums, (off_t)(wa.off / 4096 * 8 + 3 * 8)) == 0);
    cache = reopen(cache, dir);
    CHECK(range_hits_with(cache, &ha, 3 * 4096, 4096, a));
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 0);
    CHECK(flip_byte_in_file(wa.path, (off_t)(wa.off + 12 * 4096)) == 0);
    cache = reopen(cache, dir);
    CHECK(range_hits_with(cache, &ha, 3 * 4096, 4096, a)); /* its sum was rewritten */

    /* A damaged block found while another reader holds a good block: the
     * finder gets the fill at once (no waiting for that reader, who may be
     * itself), and the damaged copy's bytes stay until the reader is done. */
    struct cache_pin keep;
    CHECK(cache_acquire(cache, &ha, CS, 0, 4096, now_ns() + LONG_DEADLINE_NS, &keep) == CACHE_HIT);
    CHECK(cache_acquire(cache, &ha, CS, 12 * 4096, 4096, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_MUST_FILL);
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 1);
    unsigned char buf[4096];
    CHECK(pread(keep.fd, buf, sizeof(buf), (off_t)keep.off) == (ssize_t)sizeof(buf) && memcmp(buf, a, 4096) == 0);
    CHECK(cache_fill(cache, &pin, a, CS) == 0);
    CHECK(pin.fd >= 0 && (pin.fd != keep.fd || pin.off != keep.off)); /* a new copy */
    CHECK(pread(keep.fd, buf, sizeof(buf), (off_t)keep.off) == (ssize_t)sizeof(buf) && memcmp(buf, a, 4096) == 0);
    cache_release(cache, &pin);
    uint64_t before_release = disk_bytes_of_packs(dir);
    cache_release(cache, &keep); /* the last reader of the damaged copy: its bytes go */
    CHECK(disk_bytes_of_packs(dir) < before_release);
    CHECK(range_hits_with(cache, &ha, 12 * 4096, 4096, a));
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 1 && u.bytes == CS);
    cache = reopen(cache, dir); /* the damaged copy's DROP record holds */
    CHECK(hits_with(cache, &ha, a));
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 1 && u.dropped_damaged == 0);
    free(a);
    cache_close(cache);
}

/* Acquires [off, off + len) of a chunk, some of whose blocks there are not
 * checked yet in this run: a hit whose pin hands over the bytes it read,
 * block-aligned around the range, and exactly the chunk's there. */
static int checked_bytes_are(struct cache *cache, const struct chunk_hash *h, uint32_t off, uint32_t len,
                             const unsigned char *data)
{
    struct cache_pin pin;
    if (cache_acquire(cache, h, CS, off, len, now_ns() + LONG_DEADLINE_NS, &pin) != CACHE_HIT)
        return 0;
    const char *bytes = cache_pin_bytes(&pin, off, len);
    int ok = bytes && pin.bytes_off % 4096 == 0 && pin.bytes_len % 4096 == 0 &&
             pin.bytes_off + pin.bytes_len <= CS && memcmp(bytes, data + off, len) == 0;
    cache_release(cache, &pin);
    return ok && pin.bytes == NULL; /* the release freed them */
}

/* The bytes a check read are handed to the reader (cache_pin.bytes), so a
 * reply sends what was checked without reading the pack again: right for a
 * range inside one block, across a block boundary, at the chunk's end and
 * for a whole chunk; a hit of blocks checked before holds none (read from
 * the pack); a range over a damaged block is never a hit and hands out
 * nothing, read ahead (cache_prefetch) or not. */
static void test_checked_bytes(const char *dir)
{
    struct cache *cache = open_cache(dir);
    unsigned char *a = malloc(CS), *b = malloc(CS);
    struct chunk_hash ha, hb;
    make_chunk(a, CS, 77, &ha);
    make_chunk(b, CS, 78, &hb);
    fill_chunk(cache, &ha, a);
    fill_chunk(cache, &hb, b);
    cache = reopen(cache, dir);
    CHECK(checked_bytes_are(cache, &ha, 2 * 4096 + 10, 4000, a));     /* inside block 2 */
    CHECK(checked_bytes_are(cache, &ha, 5 * 4096 - 100, 200, a));     /* across blocks 4 and 5 */
    CHECK(checked_bytes_are(cache, &ha, CS - 300, 300, a));           /* the chunk's last bytes */
    CHECK(checked_bytes_are(cache, &ha, CS - 4096 - 1, 4096 + 1, a)); /* its last two blocks */
    CHECK(checked_bytes_are(cache, &ha, 8 * 4096, 2 * 4096, a));      /* whole blocks 8 and 9 */
    CHECK(checked_bytes_are(cache, &ha, 9 * 4096, 3 * 4096, a));      /* 9 checked, 10 and 11 not */
    struct cache_pin pin;
    CHECK(cache_acquire(cache, &ha, CS, 2 * 4096 + 10, 4000, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_HIT);
    CHECK(pin.bytes == NULL && cache_pin_bytes(&pin, 2 * 4096 + 10, 4000) == NULL); /* checked before */
    cache_release(cache, &pin);
    CHECK(range_hits_with(cache, &ha, 2 * 4096 + 10, 4000, a));
    CHECK(checked_bytes_are(cache, &ha, 0, CS, a)); /* the rest of it, read and checked as one run */
    CHECK(checked_bytes_are(cache, &hb, 0, 0, b));  /* a whole chunk, checked against its hash */
    CHECK(cache_acquire(cache, &hb, CS, 0, 0, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_HIT);
    CHECK(pin.bytes == NULL);
    cache_release(cache, &pin);

    /* Block 6 damaged: a range over blocks 5-7 is no hit, hands out no
     * bytes, and the chunk is fetched again. */
    struct where wa = locate(cache, &ha);
    cache_close(cache);
    CHECK(flip_byte_in_file(wa.path, (off_t)(wa.off + 6 * 4096 + 33)) == 0);
    cache = open_cache(dir);
    struct chunk_hash unknown;
    make_chunk(b, CS, 79, &unknown); /* b is not used after this */
    CHECK(cache_prefetch(cache, &unknown) == -ENOENT);
    CHECK(cache_prefetch(cache, &ha) == 0); /* read ahead, not checked: the acquire still is */
    CHECK(cache_acquire(cache, &ha, CS, 5 * 4096 + 1, 2 * 4096, now_ns() + LONG_DEADLINE_NS, &pin) ==
          CACHE_MUST_FILL);
    CHECK(pin.bytes == NULL);
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.dropped_damaged == 1);
    CHECK(cache_fill(cache, &pin, a, CS) == 0);
    cache_release(cache, &pin);
    CHECK(range_hits_with(cache, &ha, 6 * 4096, 4096, a));
    free(a);
    free(b);
    cache_close(cache);
}

/* A chunk moved by compaction keeps the sums it was stored with: a block
 * damaged in the old pack (after the chunk was checked) is still caught in
 * the new one, and never vouched for by sums made from the damaged bytes. */
static void test_compaction_damage(const char *dir)
{
    struct cache *cache = open_cache(dir);
    cache_set_limit(cache, 40 * CS);
    cache_set_pack_limit(cache, 32 * CS);
    unsigned char *hot = malloc(CS), *data = malloc(CS);
    struct chunk_hash hh, h;
    make_chunk(hot, CS, 2100, &hh);
    fill_chunk(cache, &hh, hot);
    struct where first = locate(cache, &hh);
    CHECK(flip_byte_in_file(first.path, (off_t)(first.off + 7 * 4096 + 9)) == 0);
    for (unsigned i = 0; i < 120; i++) {
        make_chunk(data, CS, 2200 + i, &h);
        fill_chunk(cache, &h, data);
        range_hits_with(cache, &hh, 0, 4096, hot); /* keeps it the most recently used */
    }
    CHECK(strcmp(locate(cache, &hh).path, first.path) != 0); /* moved out */
    cache = reopen(cache, dir);
    struct cache_pin pin;
    CHECK(cache_acquire(cache, &hh, CS, 7 * 4096, 4096, now_ns() + LONG_DEADLINE_NS, &pin) == CACHE_MUST_FILL);
    if (pin.entry)
        cache_abandon(cache, &pin);
    cache_close(cache);
    free(hot);
    free(data);
}

/* No memory to check a resident chunk in: the read fails with ENOMEM, and
 * the chunk stays (no DROP, no fetch): the next read hits it, also after a
 * restart. */
static void *no_memory(size_t len)
{
    (void)len;
    return NULL;
}

static void test_check_no_memory(const char *dir)
{
    struct cache *cache = open_cache(dir);
    unsigned char *a = malloc(CS);
    struct chunk_hash ha;
    make_chunk(a, CS, 91, &ha);
    fill_chunk(cache, &ha, a);
    struct cache_pin pin;
    const uint32_t ranges[][2] = {{4096, 4096}, {0, 0}}; /* by block, then whole */
    for (int r = 0; r < 2; r++) {
        cache = reopen(cache, dir); /* not checked in this run */
        cache_check_alloc = no_memory;
        int rc = cache_acquire(cache, &ha, CS, ranges[r][0], ranges[r][1], now_ns() + LONG_DEADLINE_NS, &pin);
        cache_check_alloc = malloc;
        CHECK(rc == -ENOMEM);
        if (rc >= 0)
            cache_release(cache, &pin);
        struct cache_usage u;
        cache_get_usage(cache, &u);
        CHECK(u.dropped_damaged == 0 && u.chunks == 1);
        CHECK(range_hits_with(cache, &ha, ranges[r][0], 4096, a));
    }
    cache = reopen(cache, dir);
    CHECK(range_hits_with(cache, &ha, 8192, 4096, a));
    free(a);
    cache_close(cache);
}

/* Which pages of a file are in the page cache: resident[i] for page i of
 * the first pages pages. -1 when it cannot be told. */
static int pages_resident(const char *path, size_t pages, unsigned char *resident)
{
    long page = sysconf(_SC_PAGESIZE);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    void *map = mmap(NULL, pages * (size_t)page, PROT_READ, MAP_SHARED, fd, 0); /* touches nothing */
    close(fd);
    if (map == MAP_FAILED)
        return -1;
    int rc = mincore(map, pages * (size_t)page, resident);
    munmap(map, pages * (size_t)page);
    for (size_t i = 0; rc == 0 && i < pages; i++)
        resident[i] &= 1;
    return rc;
}

/* Drops a file's pages from the page cache (written out first). 0 when
 * none of its first pages pages is left resident. */
static int evict_pages(const char *path, size_t pages)
{
    int fd = open(path, O_RDWR);
    if (fd < 0)
        return -1;
    int rc = fdatasync(fd) == 0 && posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0 ? 0 : -1;
    close(fd);
    unsigned char resident[64];
    if (rc || pages > sizeof(resident) || pages_resident(path, pages, resident) != 0)
        return -1;
    for (size_t i = 0; i < pages; i++)
        if (resident[i])
            return -1;
    return 0;
}

/* The first read of part of a chunk in a pack, in a run, starts reading the
 * pack's whole sums file (after a reboot, each random read would otherwise
 * wait for its sums page and then its block): a read of the last chunk's
 * block brings in the sums pages of the first chunks too. */
static void test_sums_read_ahead(const char *dir)
{
    enum { SUMS_PAGES = 8, CHUNKS = SUMS_PAGES * 4096 / 8 * 4096 / CS }; /* 8 pages of sums */
    struct cache *cache = open_cache(dir);
    unsigned char *data = malloc(CS), *last = malloc(CS);
    struct chunk_hash h, hl;
    for (unsigned i = 0; i < CHUNKS; i++) {
        make_chunk(data, CS, 3000 + i, &h);
        fill_chunk(cache, &h, data);
    }
    make_chunk(last, CS, 3000 + CHUNKS - 1, &hl);
    struct where w = locate(cache, &hl);
    char sums[PATH_MAX];
    sums_path_of(&w, sums, sizeof(sums));
    CHECK(w.off / 4096 * 8 >= (SUMS_PAGES - 1) * 4096ull); /* its sums are on the last page */
    cache_close(cache);
    if (evict_pages(sums, SUMS_PAGES) != 0) {
        /* tmpfs keeps every page: nothing to see there */
        printf("test_sums_read_ahead: skipped, the page cache of %s cannot be dropped here\n", sums);
        free(data);
        free(last);
        return;
    }
    cache = open_cache(dir);
    unsigned char resident[SUMS_PAGES];
    CHECK(pages_resident(sums, SUMS_PAGES, resident) == 0 && !resident[0] && !resident[SUMS_PAGES / 2]);
    CHECK(range_hits_with(cache, &hl, 4096, 4096, last));
    /* The readahead is asynchronous: wait for it (the bound only ends a
     * run that fails). */
    bool all = false;
    for (int waited = 0; !all && waited < 60000; waited += 10) {
        all = pages_resident(sums, SUMS_PAGES, resident) == 0;
        for (size_t i = 0; all && i < SUMS_PAGES; i++)
            all = resident[i];
        if (!all)
            sleep_ms(10);
    }
    CHECK(all);
    free(data);
    free(last);
    cache_close(cache);
}

/* ---- what a power cut leaves ------------------------------------------------ */

static int copy_file(const char *from, const char *to)
{
    char *data = NULL;
    size_t len = 0;
    int rc = read_file(from, 1 << 20, &data, &len);
    if (!rc)
        rc = write_file_atomic(to, data, len);
    free(data);
    return rc;
}

/* Two copies of chunk x on disk, as a cut can leave them: x and y are
 * filled into one pack, whose files are saved; x is evicted (y, held,
 * keeps the pack) and filled again into a later pack; the cache is closed.
 * Putting a saved file back is the cut losing what came after it. */
struct two_copies {
    struct where first, second; /* of x */
    char idx[PATH_MAX], saved_idx[PATH_MAX], saved_pack[PATH_MAX];
};

static void make_two_copies(const char *dir, const unsigned char *x, const struct chunk_hash *hx,
                            const unsigned char *y, const struct chunk_hash *hy, struct two_copies *t)
{
    struct cache *cache = open_cache(dir);
    fill_chunk(cache, hx, x);
    fill_chunk(cache, hy, y);
    t->first = locate(cache, hx);
    snprintf(t->idx, sizeof(t->idx), "%.*s.idx", (int)(strlen(t->first.path) - 5), t->first.path);
    path_join(t->saved_idx, sizeof(t->saved_idx), "%s/saved.idx", dir);
    path_join(t->saved_pack, sizeof(t->saved_pack), "%s/saved.pack", dir);
    cache = reopen(cache, dir);
    CHECK(copy_file(t->idx, t->saved_idx) == 0 && copy_file(t->first.path, t->saved_pack) == 0);
    CHECK(cache_hold(cache, hy, true) == 0);
    cache_set_limit(cache, 1); /* evicts x: a DROP record and a punch */
    CHECK(!cache_stores(cache, hx));
    cache_set_limit(cache, 0);
    fill_chunk(cache, hx, x); /* into this run's pack */
    t->second = locate(cache, hx);
    CHECK(strcmp(t->second.path, t->first.path) != 0);
    cache_close(cache);
}

/* Whether open made anything durable before its first punch. */
static struct cache_syscalls real_syscalls;
static bool synced, punched, punched_after_sync;

static int tracing_fdatasync(int fd)
{
    synced = true;
    return real_syscalls.fdatasync(fd);
}

static int tracing_fallocate(int fd, int mode, off_t off, off_t len)
{
    if ((mode & FALLOC_FL_PUNCH_HOLE) && !punched) {
        punched = true;
        punched_after_sync = synced;
    }
    return real_syscalls.fallocate(fd, mode, off, len);
}

/* Opens the cache in dir, tracing the order of its syncs and punches. */
static struct cache *open_cache_traced(const char *dir)
{
    real_syscalls = cache_syscalls;
    synced = punched = punched_after_sync = false;
    cache_syscalls.fdatasync = tracing_fdatasync;
    cache_syscalls.fallocate = tracing_fallocate;
    struct cache *cache = open_cache(dir);
    cache_syscalls = real_syscalls;
    return cache;
}

/* A cut lost an eviction's DROP record but kept its punch, and the chunk
 * was filled again in a later pack: the later copy (good) wins, the
 * punched one gets its DROP record, and nothing is refetched. The later
 * copy may be sound only in the page cache (after a kill -9): it is made
 * durable before the older one is punched. */
static void test_refill_after_lost_drop(const char *dir)
{
    unsigned char *x = malloc(CS), *y = malloc(CS);
    struct chunk_hash hx, hy;
    make_chunk(x, CS, 9001, &hx);
    make_chunk(y, CS, 9002, &hy);
    struct two_copies t;
    make_two_copies(dir, x, &hx, y, &hy, &t);
    CHECK(copy_file(t.saved_idx, t.idx) == 0); /* the cut lost the DROP record */
    struct cache *cache = open_cache_traced(dir);
    CHECK(punched && punched_after_sync);
    CHECK(hits_with(cache, &hx, x));
    struct where now = locate(cache, &hx);
    CHECK(strcmp(now.path, t.second.path) == 0 && now.off == t.second.off);
    CHECK(hits_with(cache, &hy, y));
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 2);
    cache = reopen(cache, dir); /* the punched copy stays dropped */
    CHECK(hits_with(cache, &hx, x));
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 2);
    cache_close(cache);
    unlink(t.saved_idx);
    unlink(t.saved_pack);
    free(x);
    free(y);
}

/* Two copies again, but the later one's bytes are wrong (a compaction's
 * copy that a cut lost before its sync) and the older one's right (the
 * cut lost the drop and the punch): the older one is kept. */
static void test_later_copy_damaged(const char *dir)
{
    unsigned char *x = malloc(CS), *y = malloc(CS);
    struct chunk_hash hx, hy;
    make_chunk(x, CS, 9011, &hx);
    make_chunk(y, CS, 9012, &hy);
    struct two_copies t;
    make_two_copies(dir, x, &hx, y, &hy, &t);
    CHECK(copy_file(t.saved_idx, t.idx) == 0 && copy_file(t.saved_pack, t.first.path) == 0);
    CHECK(flip_byte_in_file(t.second.path, (off_t)t.second.off + 100) == 0);
    struct cache *cache = open_cache(dir);
    struct where now = locate(cache, &hx);
    CHECK(strcmp(now.path, t.first.path) == 0 && now.off == t.first.off);
    CHECK(hits_with(cache, &hx, x));
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.chunks == 2 && u.dropped_damaged == 0);
    cache_close(cache);
    unlink(t.saved_idx);
    unlink(t.saved_pack);
    free(x);
    free(y);
}

/* A cut kept the unlink of a pack file but lost those of its index log
 * and sums: both go at open, and nothing stays uncounted. */
static void test_pack_lost_with_sums(const char *dir)
{
    unsigned char *x = malloc(CS);
    struct chunk_hash hx;
    make_chunk(x, CS, 9003, &hx);
    struct cache *cache = open_cache(dir);
    fill_chunk(cache, &hx, x);
    struct where w = locate(cache, &hx);
    cache_close(cache);
    CHECK(unlink(w.path) == 0);
    cache = open_cache(dir);
    CHECK(!cache_stores(cache, &hx));
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.packs == 0 && u.used == 0);
    char packs[PATH_MAX];
    path_join(packs, sizeof(packs), "%s/packs", dir);
    CHECK(count_entries(packs) == 0); /* main's cache.c left 00000000.sums */
    cache_close(cache);
    free(x);
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
    path_join(sub, sizeof(sub), "%s/old", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_old_layout(sub);
    path_join(sub, sizeof(sub), "%s/evict", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_evict_pins(sub);
    path_join(sub, sizeof(sub), "%s/counts", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_running_counts(sub);
    path_join(sub, sizeof(sub), "%s/compact", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_compaction(sub);
    path_join(sub, sizeof(sub), "%s/blocks", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_block_checks(sub);
    path_join(sub, sizeof(sub), "%s/checked-bytes", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_checked_bytes(sub);
    path_join(sub, sizeof(sub), "%s/compact-damage", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_compaction_damage(sub);
    path_join(sub, sizeof(sub), "%s/sums-read-ahead", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_sums_read_ahead(sub);
    path_join(sub, sizeof(sub), "%s/churn", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_churn(sub);
    path_join(sub, sizeof(sub), "%s/no-memory", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_check_no_memory(sub);

    path_join(sub, sizeof(sub), "%s/lost-drop", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_refill_after_lost_drop(sub);
    path_join(sub, sizeof(sub), "%s/later-damaged", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_later_copy_damaged(sub);
    path_join(sub, sizeof(sub), "%s/lost-pack", dir);
    CHECK(mkdir(sub, 0755) == 0);
    test_pack_lost_with_sums(sub);

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
