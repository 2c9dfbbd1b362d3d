/* fetch: makes chunks resident in the cache, pulling them from the
 * repository on a miss.
 *
 * Every chunk is decoded and checked against its hash before it enters the
 * cache; a chunk that fails is fetched once more and then reported as -EIO.
 * Bad bytes are never stored or returned. Transient repository errors are
 * retried with bounded exponential backoff until the per-read deadline
 * (fetch_options.timeout_seconds), then reported as -EIO.
 *
 * Concurrent misses on one chunk fetch it once (see cache.h single flight).
 * When the cache cannot take a chunk (full of chunks in use or pinned), the
 * read is served from a memory file instead of failing.
 *
 * Contract: thread-safe. The counters are updated with atomics and may be
 * read at any time.
 */
#ifndef IMGFS_FETCH_H
#define IMGFS_FETCH_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache.h"
#include "hash.h"
#include "repo.h"

/* Per-consumer counters (for example one set per base version). */
struct fetch_counters {
    atomic_uint_fast64_t hits;   /* the chunk was in the cache */
    atomic_uint_fast64_t waits;  /* another fetch of it was under way; the read waited */
    atomic_uint_fast64_t misses; /* this read fetched it */
    atomic_uint_fast64_t bytes_fetched; /* decoded bytes brought into the cache */
    atomic_uint_fast64_t verify_failures;
    atomic_uint_fast64_t errors;
};

struct fetch_options {
    double timeout_seconds; /* deadline for one read that needs a fetch */
};

#define FETCH_DEFAULT_TIMEOUT 30.0

struct fetcher;

/* Repository-wide totals. */
struct fetch_totals {
    uint64_t requests;
    uint64_t bytes_transferred; /* encoded bytes read from the repository */
    uint64_t verify_failures;
    uint64_t errors;
    uint64_t uncached; /* chunks served from memory because the cache was full */
    char last_error[256];
    double last_error_age; /* seconds since, or -1 when there was none */
};

int fetcher_create(struct cache *cache, struct repo *repo, const struct fetch_options *opts,
                   struct fetcher **out);
void fetcher_destroy(struct fetcher *f);

/* Pins the chunk, fetching it if needed. Returns 0 with pin->fd readable, or
 * -EIO. counters may be NULL. */
int fetch_acquire(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size,
                  struct fetch_counters *counters, struct cache_pin *pin);
/* The same, telling whether this caller did not have to fetch it (it was
 * cached, or another fetch of it was under way). */
int fetch_acquire_ex(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size,
                     struct fetch_counters *counters, struct cache_pin *pin, bool *hit);
void fetch_release(struct fetcher *f, struct cache_pin *pin);

/* Background work (replay, pre-copy, fill) goes behind guest reads: it
 * fetches with fetch_acquire_background(), which does not count as demand,
 * and calls fetch_yield_to_demand() before each chunk, which returns once no
 * demand fetch is under way (or *stop is set). *hit is true when the chunk
 * needed no fetch by this caller. */
int fetch_acquire_background(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size,
                             struct cache_pin *pin, bool *hit);
void fetch_yield_to_demand(struct fetcher *f, const atomic_bool *stop);

void fetcher_get_totals(struct fetcher *f, struct fetch_totals *out);

#endif
