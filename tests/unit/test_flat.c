/* Unit tests for flat.c: a flat file built from cached chunks holds the
 * version's bytes (zero chunks as holes, the last chunk cut at the size);
 * one found at open is not handed out before it is checked, and a damaged
 * one is rejected and removed; a build with a chunk missing leaves nothing;
 * a kill -9 in the middle of a build leaves no file that is used; flat files
 * count against the cache limit and give way first when a fill needs room,
 * unchecked ones before READY ones; a removed file is unlinked before stats
 * stop showing it; a new server of the same mount takes a file checked by
 * the last one without reading it only while it is exactly as recorded. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "check.h"
#include "flat.h"
#include "manifest.h"
#include "test_files.h"
#include "util.h"

#define CS (64u * 1024)
#define CHUNKS 6
#define SIZE ((uint64_t)(CHUNKS - 1) * CS + 1000) /* the last chunk is cut */
#define DEADLINE (now_ns() + 60ull * 1000000000ull)

static unsigned char chunk_bytes[CHUNKS][CS]; /* chunk 2 is all zeros */

static struct cache *open_cache(const char *dir)
{
    struct cache *c = NULL;
    char err[256] = "";
    if (cache_open(dir, &c, err, sizeof(err)) != 0) {
        fprintf(stderr, "cache_open: %s\n", err);
        exit(1);
    }
    return c;
}

static struct flat_store *open_flat_trusting(struct cache *cache, const char *trust_dir)
{
    struct flat_store *f = NULL;
    char err[256] = "";
    if (flat_open(cache, trust_dir, &f, err, sizeof(err)) != 0) {
        fprintf(stderr, "flat_open: %s\n", err);
        exit(1);
    }
    return f;
}

static struct flat_store *open_flat(struct cache *cache) { return open_flat_trusting(cache, NULL); }

/* A manifest of CHUNKS chunks whose chunk 2 is a zero chunk. */
static struct manifest *make_manifest(void)
{
    struct manifest *m = manifest_new(CHUNKS);
    snprintf(m->name, sizeof(m->name), "deb");
    m->version = 3;
    m->size = SIZE;
    m->chunk_size = CS;
    for (int i = 0; i < CHUNKS; i++) {
        if (i == 2)
            continue;
        for (size_t j = 0; j < CS; j++)
            chunk_bytes[i][j] = (unsigned char)(rand() & 0xff);
        if (i == CHUNKS - 1) /* zero-padded past the size */
            memset(chunk_bytes[i] + (SIZE - (uint64_t)i * CS), 0, CS - (SIZE - (uint64_t)i * CS));
        chunk_hash_compute(chunk_bytes[i], CS, &m->chunks[i]);
    }
    chunk_hash_compute("deb@3", 5, &m->id);
    return m;
}

static void fill(struct cache *cache, const struct manifest *m, int i, bool hold)
{
    struct cache_pin pin;
    if (cache_acquire(cache, &m->chunks[i], CS, 0, 0, DEADLINE, &pin) == CACHE_MUST_FILL)
        CHECK(cache_fill(cache, &pin, chunk_bytes[i], CS) == 0);
    cache_release(cache, &pin);
    if (hold)
        CHECK(cache_hold(cache, &m->chunks[i], true) == 0);
}

/* A manifest (make_manifest) whose every stored chunk is in the cache. */
static struct manifest *make_cached_manifest(struct cache *cache)
{
    struct manifest *m = make_manifest();
    for (int i = 0; i < CHUNKS; i++)
        if (i != 2)
            fill(cache, m, i, false);
    return m;
}

static void flat_path(const char *dir, const char *suffix, char *out)
{
    CHECK(path_join(out, PATH_MAX, "%s/flat/deb@3%s", dir, suffix) == 0);
}

/* Whether fd holds exactly the version's bytes. */
static bool holds_version(int fd)
{
    struct stat st;
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_size != SIZE)
        return false;
    static unsigned char buf[CS];
    for (int i = 0; i < CHUNKS; i++) {
        size_t len = i == CHUNKS - 1 ? SIZE - (uint64_t)i * CS : CS;
        if (read_full_at(fd, buf, len, (off_t)i * CS) != 0 || memcmp(buf, chunk_bytes[i], len) != 0)
            return false;
    }
    return true;
}

static void flip_byte(const char *path, off_t off)
{
    int fd = open(path, O_RDWR);
    unsigned char b = 0;
    CHECK(fd >= 0 && pread(fd, &b, 1, off) == 1);
    b ^= 0x40;
    CHECK(pwrite(fd, &b, 1, off) == 1);
    close(fd);
}

static void test_build_check_reject(const char *dir)
{
    struct cache *cache = open_cache(dir);
    struct flat_store *f = open_flat(cache);
    struct manifest *m = make_manifest();
    for (int i = 0; i < CHUNKS; i++)
        if (i != 2 && i != 4)
            fill(cache, m, i, false);
    /* Chunk 4 is missing: no file, no charge, nothing left behind. */
    CHECK(flat_build(f, m) == -ENOENT);
    CHECK(flat_state_of(f, m) == FLAT_NONE);
    char flat_dir[PATH_MAX], raw[PATH_MAX];
    CHECK(path_join(flat_dir, sizeof(flat_dir), "%s/flat", dir) == 0);
    CHECK(count_entries(flat_dir) == 0);
    struct cache_usage u;
    cache_get_usage(cache, &u);
    CHECK(u.charged_bytes == 0);

    fill(cache, m, 4, false);
    CHECK(flat_build(f, m) == 0);
    CHECK(flat_state_of(f, m) == FLAT_READY);
    CHECK(flat_build(f, m) == -EALREADY);
    int fd = flat_open_ready(f, m);
    CHECK(fd >= 0 && holds_version(fd));
    struct stat st;
    CHECK(fd >= 0 && fstat(fd, &st) == 0 && (uint64_t)st.st_blocks * 512 < SIZE); /* chunk 2 is a hole */
    if (fd >= 0)
        close(fd);
    cache_get_usage(cache, &u);
    CHECK(u.charged_bytes >= 4 * CS);

    /* At the next start the file is not handed out before its check. */
    flat_close(f);
    f = open_flat(cache);
    CHECK(flat_state_of(f, m) == FLAT_UNCHECKED);
    CHECK(flat_open_ready(f, m) == -ENOENT);
    CHECK(flat_check(f, m) == 0);
    CHECK(flat_state_of(f, m) == FLAT_READY);
    fd = flat_open_ready(f, m);
    CHECK(fd >= 0);
    if (fd >= 0)
        close(fd);

    /* Damaged while no daemon ran: rejected at the check and removed. */
    flat_close(f);
    flat_path(dir, ".raw", raw);
    flip_byte(raw, 3 * CS + 17);
    f = open_flat(cache);
    CHECK(flat_check(f, m) == -EBADMSG);
    CHECK(flat_state_of(f, m) == FLAT_NONE);
    CHECK(flat_open_ready(f, m) == -ENOENT);
    CHECK(access(raw, F_OK) != 0);
    struct flat_usage fu;
    flat_get_usage(f, &fu);
    CHECK(fu.rejected == 1 && fu.files == 0);
    cache_get_usage(cache, &u);
    CHECK(u.charged_bytes == 0);

    /* A byte of a zero chunk (a hole) written is caught too. */
    CHECK(flat_build(f, m) == 0);
    flat_close(f);
    flip_byte(raw, 2 * CS + 5);
    f = open_flat(cache);
    CHECK(flat_check(f, m) == -EBADMSG);

    /* Removal gives the charge back. */
    CHECK(flat_build(f, m) == 0);
    flat_remove(f, m);
    CHECK(flat_state_of(f, m) == FLAT_NONE && access(raw, F_OK) != 0);
    cache_get_usage(cache, &u);
    CHECK(u.charged_bytes == 0);
    flat_close(f);
    cache_close(cache);
    manifest_free(m);
}

/* A child builds with a delay after each chunk and is killed once its
 * .tmp file exists: the next open leaves no file, and nothing is READY. */
static void test_kill_during_build(const char *dir)
{
    struct cache *cache = open_cache(dir);
    struct manifest *m = make_cached_manifest(cache);
    cache_close(cache);
    char tmp[PATH_MAX], raw[PATH_MAX];
    flat_path(dir, ".tmp", tmp);
    flat_path(dir, ".raw", raw);
    pid_t child = fork();
    if (child == 0) {
        struct cache *c = open_cache(dir);
        struct flat_store *f = open_flat(c);
        flat_build_delay_ms = 200;
        flat_build(f, m);
        _exit(0);
    }
    bool seen = false;
    for (int i = 0; i < 500 && !seen; i++) {
        seen = access(tmp, F_OK) == 0;
        if (!seen)
            usleep(10000);
    }
    CHECK(seen);
    usleep(250000); /* a chunk or two in */
    kill(child, SIGKILL);
    int status;
    waitpid(child, &status, 0);
    CHECK(WIFSIGNALED(status));
    CHECK(access(raw, F_OK) != 0); /* never renamed */
    cache = open_cache(dir);
    struct flat_store *f = open_flat(cache);
    CHECK(access(tmp, F_OK) != 0); /* removed at open */
    CHECK(flat_state_of(f, m) == FLAT_NONE);
    CHECK(flat_open_ready(f, m) == -ENOENT);
    flat_build_delay_ms = 0;
    CHECK(flat_build(f, m) == 0); /* and a build starts over */
    flat_close(f);
    cache_close(cache);
    manifest_free(m);
}

/* Flat files fit only into free room and go before any chunk. */
static void test_limit(const char *dir)
{
    struct cache *cache = open_cache(dir);
    cache_set_limit(cache, 10 * CS);
    struct flat_store *f = open_flat(cache);
    struct manifest *m = make_manifest();
    for (int i = 0; i < CHUNKS; i++)
        if (i != 2)
            fill(cache, m, i, true);
    CHECK(flat_build(f, m) == -ENOSPC); /* 5 chunks + about 4 in the file > 90% of 10 */
    for (int i = 0; i < CHUNKS; i++)
        if (i != 2 && i != 0)
            CHECK(cache_hold(cache, &m->chunks[i], false) == 0);
    cache_set_limit(cache, 16 * CS);
    CHECK(flat_build(f, m) == 0);
    struct cache_usage u;
    cache_get_usage(cache, &u);
    uint64_t evictions = u.evictions;
    /* Fills that need room: the flat file goes first, then chunks. */
    static unsigned char more[CS];
    for (unsigned k = 0; k < 8; k++) { /* about 9 + 8 > 16 */
        struct chunk_hash h;
        memset(more, (int)(k + 1), sizeof(more));
        more[0] = 0x7f;
        chunk_hash_compute(more, CS, &h);
        struct cache_pin pin;
        if (cache_acquire(cache, &h, CS, 0, 0, DEADLINE, &pin) == CACHE_MUST_FILL)
            CHECK(cache_fill(cache, &pin, more, CS) == 0);
        cache_release(cache, &pin);
    }
    cache_get_usage(cache, &u);
    CHECK(u.evictions == evictions); /* the flat file's room was enough */
    struct flat_usage fu;
    flat_get_usage(f, &fu);
    CHECK(fu.reclaimed == 1 && fu.files == 0);
    CHECK(flat_state_of(f, m) == FLAT_NONE);
    cache_get_usage(cache, &u);
    CHECK(u.charged_bytes == 0);
    flat_close(f);
    cache_close(cache);
    manifest_free(m);
}

/* What stats show when a flat file is unlinked: it is still listed (a
 * removal drops the entry only after the unlink), and it is handed out no
 * more. */
static struct flat_store *seen_store;
static int seen_unlinks, seen_listed;

static void on_unlink(enum flat_test_point point, const char *name)
{
    (void)name;
    if (point != FLAT_TEST_UNLINK)
        return;
    struct flat_usage fu;
    flat_get_usage(seen_store, &fu);
    seen_unlinks++;
    seen_listed += fu.files == 1 && fu.ready == 0;
}

static void test_unlinked_before_dropped(const char *dir)
{
    struct cache *cache = open_cache(dir);
    struct flat_store *f = open_flat(cache);
    struct manifest *m = make_cached_manifest(cache);
    char raw[PATH_MAX];
    flat_path(dir, ".raw", raw);
    seen_store = f;
    flat_test_hook = on_unlink;
    /* flat_remove, flat_reclaim and a failed check each unlink first. */
    CHECK(flat_build(f, m) == 0);
    flat_remove(f, m);
    CHECK(seen_unlinks == 1 && seen_listed == 1);
    CHECK(flat_build(f, m) == 0);
    CHECK(flat_reclaim(f, 1) > 0);
    CHECK(seen_unlinks == 2 && seen_listed == 2);
    CHECK(flat_build(f, m) == 0);
    flat_test_hook = NULL;
    flat_close(f);
    flip_byte(raw, 5);
    f = open_flat(cache);
    seen_store = f;
    flat_test_hook = on_unlink;
    CHECK(flat_check(f, m) == -EBADMSG);
    CHECK(seen_unlinks >= 3 && seen_listed == seen_unlinks);
    flat_test_hook = NULL;
    struct flat_usage fu;
    flat_get_usage(f, &fu);
    CHECK(fu.files == 0 && access(raw, F_OK) != 0);
    flat_close(f);
    cache_close(cache);
    manifest_free(m);
}

/* m's chunks under another version (and manifest id). */
static struct manifest *another_version(const struct manifest *m, uint64_t version, const char *id)
{
    struct manifest *c = manifest_new(m->chunk_count);
    snprintf(c->name, sizeof(c->name), "%s", m->name);
    c->version = version;
    c->size = m->size;
    c->chunk_size = m->chunk_size;
    memcpy(c->chunks, m->chunks, m->chunk_count * sizeof(*m->chunks));
    chunk_hash_compute(id, strlen(id), &c->id);
    return c;
}

/* Reclaim takes every unchecked file before any READY one, whatever the
 * order of the store's entries and though a check is under way. */
static struct flat_store *rank_store;
static struct manifest *rank_checking;
static int rank_step; /* 1: stop U's check; 2: reclaim during X's check */

static void on_compared(enum flat_test_point point, const char *name)
{
    char want[96];
    if (point != FLAT_TEST_COMPARED)
        return;
    snprintf(want, sizeof(want), "%s@%llu", rank_checking->name, (unsigned long long)rank_checking->version);
    if (strcmp(name, want) != 0)
        return;
    if (rank_step == 1)
        flat_stop(rank_store); /* U's check ends: U is UNCHECKED again */
    else if (rank_step == 2)
        CHECK(flat_reclaim(rank_store, 1) > 0);
    rank_step = 0;
}

static void test_reclaim_unchecked_first(const char *dir)
{
    struct cache *cache = open_cache(dir);
    struct flat_store *f = open_flat(cache);
    struct manifest *m = make_cached_manifest(cache);
    /* Entries X, R, U in that order, all READY. */
    struct manifest *x = another_version(m, 1, "x"), *r = another_version(m, 2, "r"), *u = another_version(m, 3, "u");
    CHECK(flat_build(f, x) == 0 && flat_build(f, r) == 0 && flat_build(f, u) == 0);
    /* U checked against another manifest, the check stopped: UNCHECKED. */
    struct manifest *u2 = another_version(m, 3, "u2"), *x2 = another_version(m, 1, "x2");
    rank_store = f;
    flat_test_hook = on_compared;
    rank_checking = u2;
    rank_step = 1;
    CHECK(flat_check(f, u2) == -ECANCELED);
    CHECK(flat_state_of(f, u) == FLAT_UNCHECKED);
    /* A reclaim while X is being checked takes U, not R. */
    rank_checking = x2;
    rank_step = 2;
    CHECK(flat_check(f, x2) == -ECANCELED);
    flat_test_hook = NULL;
    CHECK(flat_state_of(f, u) == FLAT_NONE);
    CHECK(flat_state_of(f, r) == FLAT_READY);
    struct flat_usage fu;
    flat_get_usage(f, &fu);
    CHECK(fu.reclaimed == 1);
    /* With nothing unchecked (a new store, whose X and R are checked), a
     * reclaim during Y's check dooms Y, whose charge comes back when the
     * check stops: no READY file goes. */
    flat_close(f);
    rank_store = f = open_flat(cache);
    CHECK(flat_check(f, x) == 0 && flat_check(f, r) == 0);
    struct manifest *y = another_version(m, 4, "y"), *y2 = another_version(m, 4, "y2");
    CHECK(flat_build(f, y) == 0);
    flat_test_hook = on_compared;
    rank_checking = y2;
    rank_step = 2;
    CHECK(flat_check(f, y2) == -ECANCELED);
    flat_test_hook = NULL;
    CHECK(flat_state_of(f, y2) == FLAT_NONE);
    CHECK(flat_state_of(f, x) == FLAT_READY && flat_state_of(f, r) == FLAT_READY);
    flat_close(f);
    cache_close(cache);
    struct manifest *all[] = {m, x, x2, r, u, u2, y, y2};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        manifest_free(all[i]);
}

/* Checks across the servers of one mount: a file recorded as checked and
 * unchanged since is taken without being read (trusted); a fresh mount, a
 * touched file, a damaged one (its mtime put back), one put in its place
 * and another manifest are all read in full; a file that changes while
 * being read is rejected. */
static int compared; /* chunks compared (the hook) */
static const char *change_path; /* written (same bytes) at the first compare */

static void on_compare_count(enum flat_test_point point, const char *name)
{
    (void)name;
    if (point != FLAT_TEST_COMPARED)
        return;
    if (compared++ == 0 && change_path) {
        int fd = open(change_path, O_RDWR);
        unsigned char b = 0;
        CHECK(fd >= 0 && pread(fd, &b, 1, 0) == 1 && pwrite(fd, &b, 1, 0) == 1);
        if (fd >= 0)
            close(fd);
    }
}

static void set_mtime(const char *path, time_t when)
{
    struct timespec times[2] = {{when, 0}, {when, 0}};
    CHECK(utimensat(AT_FDCWD, path, times, 0) == 0);
}

/* Waits (on the file system's clock, not a time) until a change made now
 * gets a ctime later than path's: the clock moves in ticks. */
static void wait_ctime_past(const char *path, const char *probe)
{
    struct stat st, pr;
    CHECK(stat(path, &st) == 0);
    for (;;) {
        int fd = open(probe, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        bool got = fd >= 0 && fstat(fd, &pr) == 0;
        if (fd >= 0)
            close(fd);
        if (!got) {
            CHECK(got);
            return;
        }
        if (pr.st_ctim.tv_sec > st.st_ctim.tv_sec ||
            (pr.st_ctim.tv_sec == st.st_ctim.tv_sec && pr.st_ctim.tv_nsec > st.st_ctim.tv_nsec))
            return;
        usleep(1000);
    }
}

/* Opens a store as a new server of the mount whose trust directory is
 * shm, checks m, and returns the usage. */
static int check_as_new_server(struct cache *cache, const char *shm, const struct manifest *m, struct flat_usage *fu)
{
    struct flat_store *f = open_flat_trusting(cache, shm);
    compared = 0;
    flat_test_hook = on_compare_count;
    int rc = flat_check(f, m);
    flat_test_hook = NULL;
    flat_get_usage(f, fu);
    flat_close(f);
    return rc;
}

static void test_trust_across_servers(const char *dir)
{
    struct cache *cache = open_cache(dir);
    struct manifest *m = make_cached_manifest(cache);
    char shm[PATH_MAX], shm2[PATH_MAX], raw[PATH_MAX], record[PATH_MAX], probe[PATH_MAX], copy[PATH_MAX];
    CHECK(path_join(shm, sizeof(shm), "%s/shm", dir) == 0 && mkdir(shm, 0700) == 0);
    CHECK(path_join(shm2, sizeof(shm2), "%s/shm2", dir) == 0 && mkdir(shm2, 0700) == 0);
    CHECK(path_join(record, sizeof(record), "%s/deb@3.flat", shm) == 0);
    CHECK(path_join(probe, sizeof(probe), "%s/probe", dir) == 0);
    CHECK(path_join(copy, sizeof(copy), "%s/copy", dir) == 0);
    flat_path(dir, ".raw", raw);
    struct flat_store *f = open_flat_trusting(cache, shm);
    CHECK(flat_build(f, m) == 0);
    CHECK(access(record, F_OK) == 0);
    flat_close(f);

    /* The next server of the mount reads nothing: trusted. */
    struct flat_usage fu;
    CHECK(check_as_new_server(cache, shm, m, &fu) == 0);
    CHECK(fu.trusted == 1 && fu.checked == 0 && fu.ready == 1 && compared == 0);
    CHECK(check_as_new_server(cache, shm, m, &fu) == 0); /* and the one after */
    CHECK(fu.trusted == 1 && compared == 0);

    /* A fresh mount (a new, empty directory) checks in full. */
    CHECK(check_as_new_server(cache, shm2, m, &fu) == 0);
    CHECK(fu.trusted == 0 && fu.checked == 1 && compared == CHUNKS);

    /* Another manifest of the same name: read in full. */
    struct manifest *other = another_version(m, 3, "deb@3 republished");
    CHECK(check_as_new_server(cache, shm, other, &fu) == 0);
    CHECK(fu.trusted == 0 && fu.checked == 1 && compared == CHUNKS);
    manifest_free(other);
    CHECK(check_as_new_server(cache, shm, m, &fu) == 0); /* recorded for other, not m */
    CHECK(fu.trusted == 0 && fu.checked == 1);

    /* Touched: read in full, then trusted again as it is now. */
    set_mtime(raw, 1000000000);
    CHECK(check_as_new_server(cache, shm, m, &fu) == 0);
    CHECK(fu.trusted == 0 && fu.checked == 1 && compared == CHUNKS);
    CHECK(check_as_new_server(cache, shm, m, &fu) == 0);
    CHECK(fu.trusted == 1 && compared == 0);

    /* The same bytes in another file put in its place: read in full. */
    char cmd[4 * PATH_MAX + 64];
    snprintf(cmd, sizeof(cmd), "cp --preserve=timestamps '%s' '%s' && mv '%s' '%s'", raw, copy, copy, raw);
    CHECK(system(cmd) == 0);
    CHECK(check_as_new_server(cache, shm, m, &fu) == 0);
    CHECK(fu.trusted == 0 && fu.checked == 1 && compared == CHUNKS);

    /* Damaged, its mtime put back (the ctime moves on): rejected. */
    struct stat st;
    CHECK(stat(raw, &st) == 0);
    wait_ctime_past(raw, probe);
    flip_byte(raw, 4 * CS + 3);
    set_mtime(raw, st.st_mtim.tv_sec);
    CHECK(check_as_new_server(cache, shm, m, &fu) == -EBADMSG);
    CHECK(fu.trusted == 0 && fu.rejected == 1 && fu.files == 0);
    CHECK(access(raw, F_OK) != 0 && access(record, F_OK) != 0);

    /* Written while being read (the same byte again): rejected. */
    f = open_flat_trusting(cache, shm);
    CHECK(flat_build(f, m) == 0);
    flat_close(f);
    set_mtime(raw, 1000000000); /* its mtime now differs from any write's */
    change_path = raw;
    CHECK(check_as_new_server(cache, shm2, m, &fu) == -EBADMSG);
    change_path = NULL;
    CHECK(fu.rejected == 1 && fu.checked == 0 && fu.files == 0);
    flat_path(dir, ".raw", raw);
    CHECK(access(raw, F_OK) != 0);
    cache_close(cache);
    manifest_free(m);
}

int main(void)
{
    char dir[] = "/tmp/imgfs-test-flat-XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    char sub[PATH_MAX];
    void (*tests[])(const char *) = {test_build_check_reject, test_kill_during_build, test_limit,
                                         test_unlinked_before_dropped, test_reclaim_unchecked_first,
                                         test_trust_across_servers};
    for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
        if (path_join(sub, sizeof(sub), "%s/%zu", dir, i) != 0 || mkdir(sub, 0700) != 0)
            return 1;
        tests[i](sub);
    }
    remove_tree(dir);
    return check_summary();
}
