/* Unit tests for the fetch engine (fetch.c) against a local repository and
 * a real cache, with no FUSE and no root:
 *   - a miss is fetched, verified, served from memory and then written
 *     behind (the next request is a cache hit);
 *   - single flight: 16 threads asking for the same chunks at once cause
 *     one repository request per chunk;
 *   - asynchronous requests (fetch_start) call done() exactly once each;
 *   - a chunk missing from the repository fails at once (a directory does
 *     not grow it), a corrupted one fails after one more try, and neither
 *     is ever served;
 *   - fetcher_shutdown() fails nothing that finished and refuses new work;
 *   - no memory to check a cached chunk fails with -ENOMEM and keeps it.
 * Also run under ThreadSanitizer (label "concurrency"): every CHECK runs on
 * the main thread; worker threads only record results. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache.h"
#include "check.h"
#include "chunkfmt.h"
#include "fetch.h"
#include "repo.h"
#include "repo_publish.h"
#include "test_files.h"
#include "util.h"

#define CS (64u * 1024)
#define NCHUNKS 8
#define THREADS 16

static unsigned char chunks[NCHUNKS][CS];
static struct chunk_hash hashes[NCHUNKS];

static void fill(unsigned char *p, size_t len, unsigned seed)
{
    uint32_t x = seed * 2654435761u + 3;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        p[i] = (unsigned char)x;
    }
}

static int put(struct repo *repo, unsigned i)
{
    static unsigned char enc[CS * 2 + 1024]; /* more than chunkfmt_bound(CS) */
    long n = chunkfmt_encode(chunks[i], CS, 1, enc, sizeof(enc));
    return n > 0 ? repo_put_chunk(repo, &hashes[i], enc, (size_t)n) : -EIO;
}

struct shared {
    struct fetcher *f;
    atomic_int bad;    /* wrong bytes or a failure where none was expected */
    atomic_int ok;
};

static void *reader(void *arg)
{
    struct shared *s = arg;
    for (unsigned i = 0; i < NCHUNKS; i++) {
        struct fetch_ref ref;
        unsigned char got[256];
        if (fetch_get(s->f, &hashes[i], CS, FETCH_DEMAND, NULL, &ref) != 0) {
            atomic_fetch_add(&s->bad, 1);
            continue;
        }
        if (fetch_ref_read(&ref, got, sizeof(got), CS - sizeof(got)) != 0 ||
            memcmp(got, chunks[i] + CS - sizeof(got), sizeof(got)) != 0)
            atomic_fetch_add(&s->bad, 1);
        else
            atomic_fetch_add(&s->ok, 1);
        fetch_ref_release(s->f, &ref);
    }
    return NULL;
}

struct async_wait {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int calls;
    int errors;
};

static void async_done(void *arg, int err)
{
    struct async_wait *w = arg;
    pthread_mutex_lock(&w->lock);
    w->calls++;
    w->errors += err != 0;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

/* cache_check_alloc with no memory. */
static void *no_memory(size_t len)
{
    (void)len;
    return NULL;
}

int main(void)
{
    char dir[] = "/tmp/imgfs-test-fetch.XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    char repo_dir[PATH_MAX], cache_dir[PATH_MAX], err[256];
    snprintf(repo_dir, sizeof(repo_dir), "%s/repo", dir);
    snprintf(cache_dir, sizeof(cache_dir), "%s/cache", dir);
    CHECK(mkdir_p(cache_dir) == 0);
    struct repo *repo = NULL;
    CHECK(repo_open_for_publish(repo_dir, &repo, err, sizeof(err)) == 0);
    for (unsigned i = 0; i < NCHUNKS; i++) {
        fill(chunks[i], CS, i + 1);
        chunk_hash_compute(chunks[i], CS, &hashes[i]);
        if (i != NCHUNKS - 1) /* the last one is missing from the repository */
            CHECK(put(repo, i) == 0);
    }
    struct cache *cache = NULL;
    CHECK(cache_open(cache_dir, &cache, err, sizeof(err)) == 0);
    struct fetcher *f = NULL;
    struct fetch_options opts = {.timeout_seconds = 10};
    CHECK(fetcher_create(cache, repo, &opts, &f) == 0);
    if (!repo || !cache || !f)
        return check_summary();

    /* A miss, then a hit. */
    struct fetch_counters counters = {0};
    struct fetch_ref ref;
    CHECK(fetch_get(f, &hashes[0], CS, FETCH_DEMAND, &counters, &ref) == 0);
    CHECK(!ref.hit && ref.data && memcmp(ref.data, chunks[0], CS) == 0); /* served from memory */
    fetch_ref_release(f, &ref);
    for (int i = 0; i < 200 && !cache_contains(cache, &hashes[0]); i++)
        usleep(10000); /* written behind the reply */
    CHECK(cache_contains(cache, &hashes[0]));
    CHECK(fetch_get(f, &hashes[0], CS, FETCH_DEMAND, &counters, &ref) == 0);
    CHECK(ref.hit && !ref.data && ref.pin.fd >= 0);
    unsigned char got[CS];
    CHECK(fetch_ref_read(&ref, got, CS, 0) == 0 && memcmp(got, chunks[0], CS) == 0);
    fetch_ref_release(f, &ref);
    CHECK(atomic_load(&counters.misses) == 1 && atomic_load(&counters.hits) == 1);

    /* Single flight: THREADS readers of chunks 1..6 at once. */
    struct shared s = {.f = f};
    pthread_t threads[THREADS];
    struct fetch_totals before, after;
    fetcher_get_totals(f, &before);
    for (int t = 0; t < THREADS; t++)
        pthread_create(&threads[t], NULL, reader, &s);
    for (int t = 0; t < THREADS; t++)
        pthread_join(threads[t], NULL);
    fetcher_get_totals(f, &after);
    /* Each thread also asked for the missing chunk: those fail. */
    CHECK(atomic_load(&s.ok) == THREADS * (NCHUNKS - 1));
    CHECK(atomic_load(&s.bad) == THREADS);
    uint64_t requests = after.requests - before.requests;
    printf("%d threads x %d chunks: %llu repository requests\n", THREADS, NCHUNKS,
           (unsigned long long)requests);
    /* One per new chunk (1..6), and at most one per thread for the missing
     * one (each failed fetch ends its job; a later request starts anew). */
    CHECK(requests >= NCHUNKS - 1 && requests <= NCHUNKS - 2 + THREADS);

    /* Asynchronous requests: done() exactly once each, with the bytes. */
    struct async_wait w = {.calls = 0};
    pthread_mutex_init(&w.lock, NULL);
    pthread_cond_init(&w.cond, NULL);
    struct fetch_ref refs[4];
    int pending = 0, immediate = 0;
    for (unsigned i = 0; i < 4; i++) {
        int rc = fetch_start(f, &hashes[i], CS, FETCH_DEMAND, fetch_deadline(f), NULL, &refs[i], async_done, &w);
        pending += rc == FETCH_PENDING;
        immediate += rc == 0;
    }
    pthread_mutex_lock(&w.lock);
    while (w.calls < pending)
        pthread_cond_wait(&w.cond, &w.lock);
    pthread_mutex_unlock(&w.lock);
    CHECK(pending + immediate == 4 && w.errors == 0);
    bool same = true;
    for (unsigned i = 0; i < 4; i++) {
        same &= fetch_ref_read(&refs[i], got, CS, 0) == 0 && memcmp(got, chunks[i], CS) == 0;
        fetch_ref_release(f, &refs[i]);
    }
    CHECK(same);
    usleep(50000);
    CHECK(w.calls == pending); /* never a second call */

    /* A corrupted chunk: fetched again once, then -EIO, never served. */
    char rel[64], path[PATH_MAX + 64];
    repo_chunk_relpath(&hashes[NCHUNKS - 2], rel, sizeof(rel));
    snprintf(path, sizeof(path), "%s/%s", repo_dir, rel);
    unsigned char junk[CS];
    fill(junk, CS, 999);
    FILE *fp = fopen(path, "r+b");
    CHECK(fp && fseek(fp, 40, SEEK_SET) == 0 && fwrite(junk, 1, 64, fp) == 64);
    if (fp)
        fclose(fp);
    struct cache *cache2 = NULL;
    char cache2_dir[PATH_MAX];
    snprintf(cache2_dir, sizeof(cache2_dir), "%s/cache2", dir);
    CHECK(mkdir_p(cache2_dir) == 0 && cache_open(cache2_dir, &cache2, err, sizeof(err)) == 0);
    struct fetcher *f2 = NULL;
    CHECK(cache2 && fetcher_create(cache2, repo, &opts, &f2) == 0);
    if (f2) {
        fetcher_get_totals(f2, &before);
        CHECK(fetch_get(f2, &hashes[NCHUNKS - 2], CS, FETCH_DEMAND, NULL, &ref) == -EIO);
        fetcher_get_totals(f2, &after);
        CHECK(after.verify_failures == 2 && after.requests == 2);
        CHECK(!cache_contains(cache2, &hashes[NCHUNKS - 2]));
        CHECK(fetch_get(f2, &hashes[1], CS, FETCH_DEMAND, NULL, &ref) == 0); /* others still fine */
        fetch_ref_release(f2, &ref);
        /* After shutdown nothing new starts. */
        fetcher_shutdown(f2);
        CHECK(fetch_get(f2, &hashes[2], CS, FETCH_DEMAND, NULL, &ref) == -EIO);
        fetcher_destroy(f2);
    }
    cache_close(cache2);

    fetcher_destroy(f);
    cache_close(cache);

    /* No memory to check a cached chunk in (a restart: none is checked in
     * this run): the request fails with -ENOMEM, not -EIO, whole or for a
     * block, fetches nothing and keeps the chunk, which the next request
     * with memory hits. */
    cache = NULL, f = NULL;
    CHECK(cache_open(cache_dir, &cache, err, sizeof(err)) == 0);
    CHECK(cache && fetcher_create(cache, repo, &opts, &f) == 0);
    if (f) {
        fetcher_get_totals(f, &before);
        cache_check_alloc = no_memory;
        int whole = fetch_get(f, &hashes[0], CS, FETCH_DEMAND, NULL, &ref);
        struct async_wait none = {.calls = 0};
        int block = fetch_start_range(f, &hashes[0], CS, 4096, 4096, FETCH_DEMAND, fetch_deadline(f), NULL, &ref,
                                      async_done, &none);
        cache_check_alloc = malloc;
        if (whole != -ENOMEM || block != -ENOMEM)
            fprintf(stderr, "without memory to check a cached chunk: %d and %d\n", whole, block);
        CHECK(whole == -ENOMEM && block == -ENOMEM && none.calls == 0);
        CHECK(fetch_get(f, &hashes[0], CS, FETCH_DEMAND, NULL, &ref) == 0);
        CHECK(ref.hit && fetch_ref_read(&ref, got, CS, 0) == 0 && memcmp(got, chunks[0], CS) == 0);
        fetch_ref_release(f, &ref);
        fetcher_get_totals(f, &after);
        CHECK(after.requests == before.requests);
    }
    fetcher_destroy(f);
    cache_close(cache);
    repo_close(repo);
    pthread_mutex_destroy(&w.lock);
    pthread_cond_destroy(&w.cond);
    remove_tree(dir);
    return check_summary();
}
