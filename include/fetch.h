/* fetch: the fetch engine, the one owner of repository I/O for chunks.
 *
 * Threads. One dispatcher thread drives libcurl's multi interface for an
 * HTTP repository (connections are reused, HTTP/1.1 keep-alive, HTTP/2 when
 * an https server offers it), runs every timer (request deadlines, retry
 * backoff) and hands out transfer slots. FETCH_WORKERS worker threads read
 * the chunk files of a local repository (the same queue and slots, so the
 * local directory is just another transport), decode and verify every
 * chunk, complete the requests waiting for it, and append it to the cache
 * behind them. Nothing else in imgfs fetches a chunk.
 *
 * Classes. A request is FETCH_DEMAND (a guest or a reader waits for it),
 * FETCH_REPLAY (prefetch list replay) or FETCH_BACKGROUND (pre-copy,
 * background fill). Demand jobs start first and may use every slot of a
 * mirror (FETCH_SLOTS_HTTP per mirror, FETCH_SLOTS_LOCAL for a directory);
 * replay may use half of them and background a quarter, so slots are always
 * left for demand. While any demand job is queued or under way no replay or
 * background transfer starts: one that is already running finishes (at most
 * one chunk's transfer time) and then yields its slot to demand.
 *
 * Single flight. There is at most one job per chunk hash in the whole
 * daemon, whatever VM or base asks; a second request for it joins the job
 * (raising its class if needed). A job owns the cache entry's fill (cache.h
 * CACHE_MUST_FILL) from its start until the chunk is on disk or the job has
 * failed, and it stays findable until then, so a request that arrives while
 * the file is being written is served from the job's memory.
 *
 * Reply first, write behind. When a chunk has been verified, every request
 * waiting for it completes with a reference to the chunk in memory
 * (fetch_ref.data); the chunk is appended to the cache after that, by the worker.
 * Replay and pre-copy requests complete only once it is stored, so
 * that "done" means "on disk" for them.
 *
 * Never hang. fetch_start() never waits on the network: it returns the chunk
 * when it is cached (or already in memory), or arranges for done() to be
 * called exactly once, from an engine thread, at the latest at the
 * request's deadline (with -EIO). Retries and backoff are timers in the
 * dispatcher, never a sleep in the caller. A transient error is retried
 * (with the next mirror at once after a failover, else after a backoff of
 * 50 ms doubling to 2 s) until the deadline of the last request waiting;
 * a chunk that fails verification is fetched again from each mirror once
 * more and then fails. fetch_get() is the blocking form, for threads that
 * may wait (prefetch workers, copy-up, status).
 *
 * Locks. The engine lock guards the job table, the queues, the waiter
 * lists and the slot counts. It is never held across I/O, a cache call or a
 * callback, and is taken after no other imgfs lock that I/O waits for.
 *
 * Contract: thread-safe. The counters are atomics and may be read any time.
 */
#ifndef IMGFS_FETCH_H
#define IMGFS_FETCH_H

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache.h"
#include "hash.h"
#include "repo.h"

/* 8 local slots and workers rather than 4: a worker also stores each chunk
 * it read in the cache behind the reply, and on a cold sequential read from a
 * local directory (2 CPUs) 8 took 0.73 s where 4 took 0.84 s (medians of 6
 * interleaved runs, 256 MiB). */
#define FETCH_WORKERS 8
#define FETCH_SLOTS_HTTP 8  /* transfers in flight per mirror */
#define FETCH_SLOTS_LOCAL 8 /* chunk files read at once from a directory */

/* Per-consumer counters (for example one set per base version). */
struct fetch_counters {
    atomic_uint_fast64_t hits;   /* the chunk was in the cache */
    atomic_uint_fast64_t waits;  /* a fetch of it was under way; the request joined it */
    atomic_uint_fast64_t misses; /* this request started the fetch */
    atomic_uint_fast64_t bytes_fetched; /* decoded bytes brought in */
    atomic_uint_fast64_t verify_failures;
    atomic_uint_fast64_t errors;
};

struct fetch_options {
    double timeout_seconds; /* deadline for one request that needs a fetch */
};

#define FETCH_DEFAULT_TIMEOUT 30.0

enum fetch_class { FETCH_DEMAND, FETCH_REPLAY, FETCH_BACKGROUND, FETCH_CLASSES };

struct fetcher;
struct fetch_buf; /* a verified chunk in memory, shared by reference */

/* What a request got: a pinned chunk in a cache pack, or the chunk in memory. */
struct fetch_ref {
    struct cache_pin pin;  /* when data is NULL: cache_pin_bytes(), else pin.fd at pin.off */
    struct fetch_buf *buf; /* owner of data */
    const char *data;      /* the whole chunk, or NULL */
    bool hit;              /* this request started no transfer */
};

/* Repository-wide totals. */
struct fetch_totals {
    uint64_t requests;
    uint64_t bytes_transferred; /* encoded bytes read from the repository */
    uint64_t verify_failures;
    uint64_t errors;
    uint64_t uncached; /* chunks served from memory because the cache was full */
    uint64_t in_flight; /* transfers under way now */
    uint64_t queued;    /* jobs waiting for a slot or a retry */
    char last_error[256];
    double last_error_age; /* seconds since, or -1 when there was none */
};

int fetcher_create(struct cache *cache, struct repo *repo, const struct fetch_options *opts,
                   struct fetcher **out);
/* Waits until no demand request is waiting any more (each ends by its
 * deadline at the latest); replay and background may go on. */
void fetcher_drain(struct fetcher *f);
/* Fails every request still waiting (done() runs with -EIO) and stops the
 * threads. Call before what the callbacks use goes away (the FUSE session). */
void fetcher_shutdown(struct fetcher *f);
void fetcher_destroy(struct fetcher *f);

/* now + the request timeout: the deadline for a request made now. */
uint64_t fetch_deadline(const struct fetcher *f);

typedef void (*fetch_done_fn)(void *arg, int err);
#define FETCH_PENDING 1

/* Asks for one chunk. Returns 0 with *ref filled (cached, or in memory
 * already), FETCH_PENDING when done(arg, err) will be called exactly once
 * later from an engine thread (with *ref filled when err is 0), or an
 * error. *ref must stay valid until then. counters may be NULL. An error
 * is -EIO, or -ENOMEM when the daemon had no memory for the request or to
 * check the chunk (nothing is lost: the chunk stays cached, a job is
 * abandoned whole), so that a reader or writer can answer ENOMEM as a
 * local file would. */
int fetch_start(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size, enum fetch_class cls,
                uint64_t deadline_ns, struct fetch_counters *counters, struct fetch_ref *ref, fetch_done_fn done,
                void *arg);
/* The same for a reader that uses only [want_off, want_off + want_len) of
 * the chunk: a cached chunk is then checked only where it is read (cache.h).
 * A ref from a cache hit must not be read outside that range. */
int fetch_start_range(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size, uint32_t want_off,
                      uint32_t want_len, enum fetch_class cls, uint64_t deadline_ns, struct fetch_counters *counters,
                      struct fetch_ref *ref, fetch_done_fn done, void *arg);
/* The same, waiting for the answer. Returns 0, -ENOMEM or -EIO. */
int fetch_get(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size, enum fetch_class cls,
              struct fetch_counters *counters, struct fetch_ref *ref);
/* Notes the error err of one of the requests of a read or write in *all
 * (0 until one fails): -EIO, whatever came before or after, else -ENOMEM. */
static inline void fetch_note_error(atomic_int *all, int err)
{
    int none = 0;
    if (err != -ENOMEM)
        atomic_store(all, -EIO);
    else
        atomic_compare_exchange_strong(all, &none, -ENOMEM);
}

/* Readahead: brings a chunk into the cache in the demand class, with nobody
 * waiting for it; does nothing when it is under way. A cached chunk is only
 * read ahead into the page cache (cache_prefetch), not checked: its reader
 * checks it, from memory by then, and the caller (a FUSE worker whose reply
 * waits) reads nothing itself. */
void fetch_ahead(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size,
                 struct fetch_counters *counters);

void fetch_ref_release(struct fetcher *f, struct fetch_ref *ref);
/* Copies len bytes at off of the chunk a ref holds. */
int fetch_ref_read(const struct fetch_ref *ref, void *buf, size_t len, uint64_t off);

/* Background work (replay, pre-copy, fill) calls this before each chunk: it
 * returns once no demand job is queued or under way (or *stop is set). */
void fetch_yield_to_demand(struct fetcher *f, const atomic_bool *stop);

void fetcher_get_totals(struct fetcher *f, struct fetch_totals *out);

#endif
