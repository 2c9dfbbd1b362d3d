#include "fetch.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chunkfmt.h"
#include "util.h"

#define BACKOFF_START_NS (50ull * 1000 * 1000)
#define BACKOFF_MAX_NS (2000ull * 1000 * 1000)

struct fetcher {
    struct cache *cache;
    struct repo *repo;
    struct fetch_options opts;
    atomic_uint_fast64_t requests;
    atomic_uint_fast64_t bytes_transferred;
    atomic_uint_fast64_t verify_failures;
    atomic_uint_fast64_t errors;
    atomic_uint_fast64_t uncached; /* chunks served from memory: cache full */
    /* last_error and last_error_ns are guarded by error_lock. */
    pthread_mutex_t error_lock;
    char last_error[256];
    uint64_t last_error_ns;
    /* demand_fetching (guest reads fetching now) is guarded by demand_lock;
     * demand_idle is signalled when it drops to zero. */
    pthread_mutex_t demand_lock;
    pthread_cond_t demand_idle;
    int demand_fetching;
};

int fetcher_create(struct cache *cache, struct repo *repo, const struct fetch_options *opts,
                   struct fetcher **out)
{
    struct fetcher *f = calloc(1, sizeof(*f));
    if (!f)
        return -ENOMEM;
    f->cache = cache;
    f->repo = repo;
    f->opts = *opts;
    if (f->opts.timeout_seconds <= 0)
        f->opts.timeout_seconds = FETCH_DEFAULT_TIMEOUT;
    pthread_mutex_init(&f->error_lock, NULL);
    pthread_mutex_init(&f->demand_lock, NULL);
    cond_init_monotonic(&f->demand_idle);
    *out = f;
    return 0;
}

void fetcher_destroy(struct fetcher *f)
{
    if (!f)
        return;
    pthread_mutex_destroy(&f->error_lock);
    pthread_mutex_destroy(&f->demand_lock);
    pthread_cond_destroy(&f->demand_idle);
    free(f);
}

static void note_error(struct fetcher *f, const struct chunk_hash *hash, const char *what)
{
    char hex[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(hash, hex);
    pthread_mutex_lock(&f->error_lock);
    snprintf(f->last_error, sizeof(f->last_error), "chunk %s: %s", hex, what);
    f->last_error_ns = now_ns();
    pthread_mutex_unlock(&f->error_lock);
    log_warn("fetch of chunk %s failed: %s", hex, what);
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* A pin on a memory file holding data, for a chunk the cache cannot take. */
static int transient_pin(const char *data, size_t len, struct cache_pin *pin)
{
    int fd = memfd_create("imgfs-chunk", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = write_full_at(fd, data, len, 0);
    if (rc) {
        close(fd);
        return rc;
    }
    pin->entry = NULL;
    pin->fd = fd;
    return 0;
}

/* Fetches, decodes and verifies one chunk into data. */
static int fetch_into(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size, char *data,
                      uint64_t deadline_ns, struct fetch_counters *counters)
{
    uint64_t backoff = BACKOFF_START_NS;
    int verify_attempts = 0;
    for (;;) {
        char *enc = NULL;
        size_t enc_len = 0;
        atomic_fetch_add(&f->requests, 1);
        int mirror;
        int rc = repo_get_chunk(f->repo, hash, chunk_size, deadline_ns, &enc, &enc_len, &mirror);
        if (rc == 0) {
            atomic_fetch_add(&f->bytes_transferred, enc_len);
            rc = chunkfmt_decode(enc, enc_len, data, chunk_size, hash);
            free(enc);
            bool named_right = rc == 0;
            if (rc == 0)
                rc = repo_verify_chunk(f->repo, hash, data, chunk_size); /* the signed digest */
            if (rc == 0)
                return 0;
            atomic_fetch_add(&f->verify_failures, 1);
            if (counters)
                atomic_fetch_add(&counters->verify_failures, 1);
            note_error(f, hash, named_right ? "failed verification against its signed digest"
                                            : "failed verification against its hash");
            repo_report_bad(f->repo, mirror); /* the next attempt goes elsewhere */
            if (++verify_attempts > repo_mirror_count(f->repo)) /* each mirror, plus one retry */
                return -EIO;
            continue; /* fetch it again: a transfer or a mirror may be damaged */
        }
        if (rc == -EFBIG) {
            atomic_fetch_add(&f->verify_failures, 1);
            if (counters)
                atomic_fetch_add(&counters->verify_failures, 1);
            note_error(f, hash, "stored chunk is larger than any valid chunk");
            return -EIO;
        }
        note_error(f, hash, rc == -ENOENT ? "missing from the repository" : strerror(-rc));
        if (rc == -ENOENT && repo_is_local(f->repo))
            return -EIO; /* a local directory will not grow the file by waiting */
        uint64_t now = now_ns();
        if (now + 10000000ull >= deadline_ns)
            return -EIO;
        /* Back off, but keep one last try for the end of the deadline. */
        sleep_ns(now + backoff < deadline_ns ? backoff : deadline_ns - now - 10000000ull);
        backoff = backoff * 2 > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : backoff * 2;
    }
}

int fetch_acquire(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size,
                  struct fetch_counters *counters, struct cache_pin *pin)
{
    return fetch_acquire_ex(f, hash, chunk_size, counters, pin, NULL);
}

static void count_demand(struct fetcher *f, int delta)
{
    pthread_mutex_lock(&f->demand_lock);
    f->demand_fetching += delta;
    if (f->demand_fetching == 0)
        pthread_cond_broadcast(&f->demand_idle);
    pthread_mutex_unlock(&f->demand_lock);
}

static int acquire(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size,
                   struct fetch_counters *counters, struct cache_pin *pin, bool *hit, bool demand)
{
    uint64_t deadline = now_ns() + (uint64_t)(f->opts.timeout_seconds * 1e9);
    int rc = cache_acquire(f->cache, hash, chunk_size, deadline, pin);
    if (hit)
        *hit = rc == CACHE_HIT;
    if (rc == CACHE_HIT) {
        if (counters)
            atomic_fetch_add(pin->waited ? &counters->waits : &counters->hits, 1);
        return 0;
    }
    if (rc < 0) {
        note_error(f, hash, rc == -ETIMEDOUT ? "timed out waiting for another fetch" : strerror(-rc));
        goto failed;
    }
    if (counters)
        atomic_fetch_add(&counters->misses, 1);
    char *data = malloc(chunk_size);
    if (!data) {
        cache_abandon(f->cache, pin);
        goto failed;
    }
    if (demand)
        count_demand(f, 1);
    rc = fetch_into(f, hash, chunk_size, data, deadline, counters);
    if (demand)
        count_demand(f, -1);
    if (rc == 0) {
        rc = cache_fill(f->cache, pin, data, chunk_size);
        if (rc == -ENOSPC || rc == -EDQUOT) {
            /* The cache is full of chunks in use or pinned: serve this one
             * from memory rather than fail the read. */
            rc = transient_pin(data, chunk_size, pin);
            if (!rc)
                atomic_fetch_add(&f->uncached, 1);
        }
        if (rc)
            note_error(f, hash, "cannot store it in the cache");
    } else {
        cache_abandon(f->cache, pin);
    }
    free(data);
    if (rc)
        goto failed;
    if (counters)
        atomic_fetch_add(&counters->bytes_fetched, chunk_size);
    return 0;
failed:
    atomic_fetch_add(&f->errors, 1);
    if (counters)
        atomic_fetch_add(&counters->errors, 1);
    return -EIO;
}

int fetch_acquire_ex(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size,
                     struct fetch_counters *counters, struct cache_pin *pin, bool *hit)
{
    return acquire(f, hash, chunk_size, counters, pin, hit, true);
}

int fetch_acquire_background(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size,
                             struct cache_pin *pin, bool *hit)
{
    return acquire(f, hash, chunk_size, NULL, pin, hit, false);
}

void fetch_yield_to_demand(struct fetcher *f, const atomic_bool *stop)
{
    pthread_mutex_lock(&f->demand_lock);
    while (f->demand_fetching > 0 && !atomic_load(stop)) {
        /* Bounded waits, so that a stop is seen within 100 ms. */
        cond_wait_until(&f->demand_idle, &f->demand_lock, now_ns() + 100 * 1000 * 1000);
    }
    pthread_mutex_unlock(&f->demand_lock);
}

void fetch_release(struct fetcher *f, struct cache_pin *pin)
{
    if (!pin->entry && pin->fd >= 0) {
        close(pin->fd); /* a transient pin owns its memory file */
        pin->fd = -1;
        return;
    }
    cache_release(f->cache, pin);
}

void fetcher_get_totals(struct fetcher *f, struct fetch_totals *out)
{
    out->requests = atomic_load(&f->requests);
    out->bytes_transferred = atomic_load(&f->bytes_transferred);
    out->verify_failures = atomic_load(&f->verify_failures);
    out->errors = atomic_load(&f->errors);
    out->uncached = atomic_load(&f->uncached);
    pthread_mutex_lock(&f->error_lock);
    snprintf(out->last_error, sizeof(out->last_error), "%s", f->last_error);
    out->last_error_age = f->last_error_ns ? (double)(now_ns() - f->last_error_ns) / 1e9 : -1;
    pthread_mutex_unlock(&f->error_lock);
}
