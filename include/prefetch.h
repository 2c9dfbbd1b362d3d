/* prefetch: background work that brings chunks into the cache ahead of the
 * guest: replay of recorded prefetch lists, and pre-copy of whole versions
 * or lists, which also pins what it fetched.
 *
 * A job walks a list of chunk indices of one base version in order with a
 * few worker threads, skipping chunks that are cached already. Every job
 * stands aside while a guest read is fetching (fetch_yield_to_demand, and
 * the fetch engine's classes: replay, then pre-copy and fill), and
 * replay stays at most `ahead` bytes of list ahead of the furthest list
 * chunk the guest has read, so it does not run far past a guest that has
 * stopped or taken another path. Replay marks
 * the chunks it brought in, so that a guest read of one counts as a prefetch
 * hit. Pre-copy is rate-limited and records its pin set in
 * CACHE/pins/KEY (one chunk hash per line, written before the fetching
 * starts), so that pins survive restarts and a rerun resumes where it
 * stopped. Jobs never hold a lock across repository I/O; guest reads are
 * demand requests of the fetch engine and never queue behind jobs.
 *
 * Contract: thread-safe. prefetcher_destroy() stops and joins every job.
 */
#ifndef IMGFS_PREFETCH_H
#define IMGFS_PREFETCH_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache.h"
#include "fetch.h"
#include "list.h"
#include "manifest.h"
#include "repo.h"

/* Per base version, owned by the mount tree. */
struct prefetch_marks {
    _Atomic uint8_t *brought; /* per chunk: 1 if replay fetched it and no guest read it yet;
                                 set once, before replay_active */
    atomic_bool replay_started; /* claimed by the one replay of this version */
    atomic_bool replay_active;  /* published after brought is set */
    atomic_bool background_started;
    _Atomic uint32_t *list_pos; /* per chunk: 1 + its position in the replayed list, 0 if absent;
                                   allocated with brought, filled when the list is loaded */
    atomic_uint_fast64_t guest_pos; /* 1 + the furthest list position a guest read reached */
    atomic_uint_fast64_t list_total;
    atomic_uint_fast64_t list_done;
    atomic_uint_fast64_t hits;   /* guest reads served by a chunk that replay brought */
    atomic_uint_fast64_t misses; /* guest reads that had to fetch while a list was known */
    atomic_uint_fast64_t bytes_prefetched; /* fetched by replay, pre-copy and background fill */
};

/* The readahead state of one file (a base version or VM disk node). It is
 * per file, not per base: 16 VMs booting one base at once read the same
 * chunks in an interleaved order that, counted together, looks sequential
 * and would fetch chunks none of them reads. */
struct prefetch_stream {
    atomic_uint_fast64_t seq_next;    /* 1 + the last chunk of the latest read */
    atomic_uint_fast64_t ahead_until; /* chunks below this were asked for */
    atomic_uint_fast64_t seq_run;     /* chunks read in order so far */
};

struct job_status {
    char state[16]; /* "running", "done", "failed", "stopped" */
    uint64_t done;  /* chunks handled */
    uint64_t total;
    uint64_t bytes_fetched;
    char error[160];
};

struct prefetcher;

int prefetcher_create(struct cache *cache, struct fetcher *fetcher, const char *pin_dir, struct prefetcher **out);
void prefetcher_destroy(struct prefetcher *pf);

/* Starts replaying list list_name of the version of manifest m from repo,
 * in the background (once per version and mount), keeping at most ahead
 * bytes (0: no bound) in front of the guest. A missing list is not an
 * error; a list for another version is refused and logged. */
int prefetch_replay(struct prefetcher *pf, struct repo *repo, const struct manifest *m, const char *list_name,
                    uint64_t ahead, struct prefetch_marks *marks);

/* Starts fetching every chunk of m not cached yet, at rate bytes per
 * second, one at a time (once per version and mount); nothing is pinned. */
int prefetch_background(struct prefetcher *pf, const struct manifest *m, uint64_t rate, struct prefetch_marks *marks);

/* Sequential readahead, called by the read path with the base chunks
 * first..last that a read of one file covers (zero chunks too: a hole does
 * not end a run). Once reads of the file have gone PREFETCH_READAHEAD bytes
 * in order, the next PREFETCH_READAHEAD bytes of chunks are fetched into the
 * cache (fetch_ahead: demand class, nobody waiting). In order means each
 * read starts where the furthest one so far ended, or within its own length
 * after it, or behind it by at most the window (neighbouring requests
 * that the FUSE threads hand over swapped). Scattered and short reads (a
 * boot) fetch only what they read. VM disks read in order reach their base
 * the same way. */
#define PREFETCH_READAHEAD (4u << 20)
void prefetch_readahead(struct fetcher *f, const struct manifest *m, struct prefetch_stream *stream,
                        struct fetch_counters *counters, uint64_t first, uint64_t last);

/* Called by the read path for each base chunk a guest read. */
void prefetch_note_read(struct prefetch_marks *marks, uint64_t index, bool was_hit);

/* Starts pre-copying list (NULL: every chunk of m) under key, pinning it;
 * rate in bytes per second, 0 for unlimited. A job already running under
 * key is left alone. */
int prefetch_precopy(struct prefetcher *pf, const char *key, const struct manifest *m,
                     const struct chunk_list *list, uint64_t rate, struct prefetch_marks *marks, char *err,
                     size_t errlen);
int prefetch_status(struct prefetcher *pf, const char *key, struct job_status *out);
/* Stops the pre-copy job under key at its next chunk, keeping the pin set:
 * a later prefetch_precopy() resumes it (the end of a maintenance window).
 * -ENOENT if there is no such job. */
int prefetch_stop(struct prefetcher *pf, const char *key);
/* Releases a pin set (and stops its job). -ENOENT if there is none. */
int prefetch_unpin(struct prefetcher *pf, const char *key);

/* Pinned sets found in the pin directory at start-up are held again. */
int prefetch_load_pins(struct prefetcher *pf);

/* A recording of the base chunks a VM read, in order of first access. */
struct chunk_trace {
    pthread_mutex_t lock; /* guards everything below */
    uint8_t *seen;        /* per chunk of the base */
    uint64_t chunk_count;
    uint64_t *order;
    uint64_t count;
    uint64_t cap;
};

struct chunk_trace *trace_new(uint64_t chunk_count);
void trace_note(struct chunk_trace *t, uint64_t index);
/* Turns the recording into a list for manifest m and frees the trace. */
int trace_finish(struct chunk_trace *t, const struct manifest *m, struct chunk_list **out);
void trace_free(struct chunk_trace *t);

#endif
