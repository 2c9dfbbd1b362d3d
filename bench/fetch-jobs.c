/* fetch-jobs: the fetch engine with many jobs in flight at once.
 *
 *   fetch-jobs make DIR N            writes N distinct 16 KiB chunks into a
 *                                    repository at DIR/repo (once per run)
 *   fetch-jobs run DIR REPO N        with an empty cache at DIR/cache, asks
 *                                    for the N chunks at once (fetch_start,
 *                                    demand class, one waiter each) from REPO
 *                                    (DIR/repo, or its http:// URL) and waits
 *                                    for every answer
 *
 * run prints "SECONDS CPU_SECONDS": the wall time from the first request to
 * the last answer, and the CPU time of the whole process meanwhile (the
 * dispatcher's passes over the jobs are what grows with N). Built by
 * bench/bench-fetch-jobs.sh against each build's libimgfs_core.a. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "cache.h"
#include "chunkfmt.h"
#include "fetch.h"
#include "repo.h"
#include "repo_publish.h"
#include "util.h"

#define CS (16u * 1024)

static void chunk_bytes(unsigned char *p, unsigned seed)
{
    uint32_t x = seed * 2654435761u + 7;
    for (size_t i = 0; i < CS; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        p[i] = (unsigned char)x;
    }
}

static struct {
    struct fetcher *f;
    pthread_mutex_t lock;
    pthread_cond_t all_done;
    long left;
    long errors;
} answers = {NULL, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};

/* Each answer is let go at once, as a FUSE reply does: what stays in
 * memory is the jobs, not every chunk. */
static void answered(void *arg, int err)
{
    if (!err)
        fetch_ref_release(answers.f, arg);
    pthread_mutex_lock(&answers.lock);
    answers.errors += err != 0;
    if (--answers.left == 0)
        pthread_cond_signal(&answers.all_done);
    pthread_mutex_unlock(&answers.lock);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static int make(const char *dir, long n)
{
    char path[4096], err[256];
    snprintf(path, sizeof(path), "%s/repo", dir);
    struct repo *repo;
    if (repo_open_for_publish(path, &repo, err, sizeof(err)) != 0) {
        fprintf(stderr, "fetch-jobs: %s\n", err);
        return 1;
    }
    unsigned char *data = malloc(CS), *enc = malloc(2 * CS + 1024);
    for (long i = 0; data && enc && i < n; i++) {
        struct chunk_hash h;
        chunk_bytes(data, (unsigned)i);
        chunk_hash_compute(data, CS, &h);
        long len = chunkfmt_encode(data, CS, 1, enc, 2 * CS + 1024);
        if (len <= 0 || repo_put_chunk(repo, &h, enc, (size_t)len) != 0) {
            fprintf(stderr, "fetch-jobs: cannot store chunk %ld\n", i);
            return 1;
        }
    }
    free(data);
    free(enc);
    repo_close(repo);
    return 0;
}

static int run(const char *dir, const char *location, long n)
{
    char path[4096], err[256];
    struct repo *repo;
    int rc = strncmp(location, "http", 4) == 0 ? repo_open(location, &repo, err, sizeof(err))
                                                : repo_open_for_publish(location, &repo, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "fetch-jobs: %s\n", err);
        return 1;
    }
    snprintf(path, sizeof(path), "%s/cache", dir);
    struct cache *cache;
    if (mkdir_p(path) != 0 || cache_open(path, &cache, err, sizeof(err)) != 0) {
        fprintf(stderr, "fetch-jobs: cannot open the cache %s\n", path);
        return 1;
    }
    struct fetcher *f;
    struct fetch_options opts = {.timeout_seconds = 600};
    if (fetcher_create(cache, repo, &opts, &f) != 0) {
        fprintf(stderr, "fetch-jobs: cannot start the fetch engine\n");
        return 1;
    }
    struct chunk_hash *hashes = malloc((size_t)n * sizeof(*hashes));
    struct fetch_ref *refs = calloc((size_t)n, sizeof(*refs));
    unsigned char *data = malloc(CS);
    if (!hashes || !refs || !data)
        return 1;
    for (long i = 0; i < n; i++) {
        chunk_bytes(data, (unsigned)i);
        chunk_hash_compute(data, CS, &hashes[i]);
    }
    answers.left = n;
    answers.f = f;
    double cpu0 = cpu_seconds();
    uint64_t t0 = now_ns();
    long at_once = 0;
    for (long i = 0; i < n; i++) {
        rc = fetch_start(f, &hashes[i], CS, FETCH_DEMAND, fetch_deadline(f), NULL, &refs[i], answered, &refs[i]);
        if (rc != FETCH_PENDING)
            answered(&refs[i], rc < 0 ? rc : 0);
        else
            at_once++;
    }
    pthread_mutex_lock(&answers.lock);
    while (answers.left > 0)
        pthread_cond_wait(&answers.all_done, &answers.lock);
    pthread_mutex_unlock(&answers.lock);
    double seconds = (double)(now_ns() - t0) / 1e9, cpu = cpu_seconds() - cpu0;
    fetcher_destroy(f);
    cache_close(cache);
    repo_close(repo);
    if (answers.errors) {
        fprintf(stderr, "fetch-jobs: %ld of %ld requests failed\n", answers.errors, n);
        return 1;
    }
    printf("%.3f %.3f %ld\n", seconds, cpu, at_once);
    free(hashes);
    free(refs);
    free(data);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "make") == 0)
        return make(argv[2], atol(argv[3]));
    if (argc == 5 && strcmp(argv[1], "run") == 0)
        return run(argv[2], argv[3], atol(argv[4]));
    fprintf(stderr, "usage: fetch-jobs make DIR N | fetch-jobs run DIR REPO N\n");
    return 2;
}
