#include "publish.h"

#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "chunkfmt.h"
#include "digests.h"
#include "image.h"
#include "manifest.h"
#include "progress.h"
#include "repo.h"
#include "repo_publish.h"
#include "util.h"

/* Source names land in the manifest: keep them printable and on one line. */
static void describe_source(const char *path, const char *format, char *out, size_t len)
{
    char copy[PATH_MAX];
    snprintf(copy, sizeof(copy), "%s", path);
    snprintf(out, len, "%s %s", basename(copy), format);
    for (char *p = out; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p == 0x7f)
            *p = '?';
}

/* ---- the chunk pipeline ----------------------------------------------------
 *
 * Workers take batches of consecutive chunks from a shared cursor. The
 * cursor jumps over what the image's allocation map says is unallocated:
 * those chunks are zero chunks and are never read. A worker reads the data
 * ranges of its batch with its own image reader, then hashes, compresses and
 * stores each chunk. Chunks land in m->chunks[i] by index, so the manifest is
 * the same whatever order the workers finish in. Chunk files may be written
 * in any order: none is referenced until the manifest is written, after all
 * workers are done and syncfs (publish.h). */

/* Bytes of consecutive chunks a worker takes at once. */
#define BATCH_BYTES (1u << 20)
/* How far ahead of the batch it reads a worker asks for the image to be read
 * into the page cache: the workers read interleaved batches through their
 * own fds, which the kernel's readahead does not take for sequential reads,
 * so a cold image would otherwise be read a batch at a time, with the CPUs
 * waiting. */
#define PREFETCH_AHEAD (8u << 20)

/* The hashes stored (or being stored) by this publish, so that a chunk that
 * repeats in the image is compressed and written once, by one worker, and
 * counted new once, as a sequential publish would. Open addressing. */
struct claim_set {
    struct chunk_hash *slots; /* null hash = empty slot (zero chunks never get here) */
    size_t cap;               /* a power of two */
    size_t count;
};

static int claim_grow(struct claim_set *set)
{
    size_t cap = set->cap ? set->cap * 2 : 1024;
    struct chunk_hash *slots = calloc(cap, sizeof(*slots));
    if (!slots)
        return -ENOMEM;
    for (size_t i = 0; i < set->cap; i++) {
        if (chunk_hash_is_null(&set->slots[i]))
            continue;
        size_t at = chunk_hash_bucket(&set->slots[i]) & (cap - 1);
        while (!chunk_hash_is_null(&slots[at]))
            at = (at + 1) & (cap - 1);
        slots[at] = set->slots[i];
    }
    free(set->slots);
    set->slots = slots;
    set->cap = cap;
    return 0;
}

/* 1 when hash was new and is now claimed, 0 when it was claimed before. */
static int claim(struct claim_set *set, const struct chunk_hash *hash)
{
    if (2 * (set->count + 1) > set->cap && claim_grow(set) < 0)
        return -ENOMEM;
    size_t at = chunk_hash_bucket(hash) & (set->cap - 1);
    while (!chunk_hash_is_null(&set->slots[at])) {
        if (chunk_hash_equal(&set->slots[at], hash))
            return 0;
        at = (at + 1) & (set->cap - 1);
    }
    set->slots[at] = *hash;
    set->count++;
    return 1;
}

struct pipeline {
    /* Set before the workers start, then read-only. */
    struct image *img; /* the cursor's image_next_data; worker 0 also reads through it */
    const char *image_path;
    struct repo *repo;
    struct manifest *m; /* workers write m->chunks[i] of their own batches only */
    /* When signing, the chunk digests of the digests record (digests.h),
     * computed while the bytes are in memory: workers write digests->chunks[i]
     * of their own batches only. NULL for an unsigned publish. */
    struct version_digests *digests;
    int level;
    uint64_t batch_chunks;

    /* The hashes claimed so far, guarded by claims_lock, which is taken once
     * per chunk (apart from the cursor's lock, so that the two do not
     * contend) and held only for the look-up and insertion. */
    pthread_mutex_t claims_lock;
    struct claim_set claims;

    /* Everything below is guarded by lock, which is held across the
     * allocation look-ups of the cursor (lseek) but never across reading,
     * compressing or writing a chunk. */
    pthread_mutex_t lock;
    pthread_cond_t ended;   /* a worker ended (progress is polled, not signalled) */
    uint64_t next_chunk;    /* the cursor: chunks before it are handed out */
    uint64_t done_bytes;    /* of the disk, for the progress bar */
    unsigned running;       /* workers not yet ended */
    struct publish_result totals;
    int rc; /* the first error, which stops every worker */
    char err[512];
};

static void fail_locked(struct pipeline *p, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail_locked(struct pipeline *p, int rc, const char *fmt, ...)
{
    if (p->rc)
        return;
    p->rc = rc;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof(p->err), fmt, ap);
    va_end(ap);
}

/* The end, in disk bytes, of the chunks before index `to`. */
static uint64_t chunks_end(const struct manifest *m, uint64_t to)
{
    return to == m->chunk_count ? m->size : to * m->chunk_size;
}

/* Counts the chunks [from, to) as zero chunks that were never read. */
static void skip_zero_locked(struct pipeline *p, uint64_t from, uint64_t to)
{
    if (from >= to)
        return;
    uint64_t bytes = chunks_end(p->m, to) - from * p->m->chunk_size;
    p->totals.chunks_zero += to - from;
    p->done_bytes += bytes;
}

/* Hands out the next batch that holds data: false when none is left. */
static bool take_batch_locked(struct pipeline *p, uint64_t *first, uint64_t *count)
{
    const struct manifest *m = p->m;
    if (p->rc || p->next_chunk >= m->chunk_count)
        return false;
    uint64_t start, end;
    if (image_next_data(p->img, p->next_chunk * m->chunk_size, &start, &end) != 0) {
        skip_zero_locked(p, p->next_chunk, m->chunk_count);
        p->next_chunk = m->chunk_count;
        return false;
    }
    skip_zero_locked(p, p->next_chunk, start / m->chunk_size);
    *first = start / m->chunk_size;
    *count = m->chunk_count - *first < p->batch_chunks ? m->chunk_count - *first : p->batch_chunks;
    p->next_chunk = *first + *count;
    return true;
}

/* What one worker owns. */
struct worker {
    struct pipeline *p;
    pthread_t thread;
    struct image *reader; /* owned, except for worker 0's (p->img) */
    struct chunkfmt_encoder *encoder;
    char *buf;            /* batch_chunks * chunk_size */
    char *enc;
    size_t enc_cap;
};

/* Reads the data ranges of chunks [first, first + count) into w->buf and
 * zeros the rest, which is not read (a dense batch is not zeroed first). */
static int read_batch(struct worker *w, uint64_t first, uint64_t count, uint64_t *bytes_read)
{
    const struct manifest *m = w->p->m;
    uint64_t from = first * m->chunk_size;
    uint64_t to = chunks_end(m, first + count);
    image_prefetch(w->reader, from + PREFETCH_AHEAD, to - from);
    uint64_t start, end, at = from;
    for (; at < to && image_next_data(w->reader, at, &start, &end) == 0 && start < to; at = end) {
        if (end > to)
            end = to;
        memset(w->buf + (at - from), 0, (size_t)(start - at));
        int rc = image_read(w->reader, w->buf + (start - from), (size_t)(end - start), start);
        if (rc) {
            pthread_mutex_lock(&w->p->lock);
            fail_locked(w->p, rc, "cannot read %s at offset %" PRIu64 " (truncated or damaged image?): %s",
                        w->p->image_path, start, strerror(-rc));
            pthread_mutex_unlock(&w->p->lock);
            return rc;
        }
        *bytes_read += end - start;
    }
    if (at < from + count * m->chunk_size) /* a hole at the end, and the tail of a partial last chunk */
        memset(w->buf + (at - from), 0, (size_t)(from + count * m->chunk_size - at));
    return 0;
}

/* Where one worker's time goes, in nanoseconds of the monotonic clock (a
 * wait for a CPU or for the disk counts in the stage it happens in). Kept on
 * the worker's stack: the workers' structs share cache lines. */
struct stage_times {
    uint64_t read, hash, compress, store;
};

/* Hashes one chunk and stores it unless it is zero, already in the
 * repository, or claimed by another chunk of this publish. */
static int store_chunk(struct worker *w, uint64_t index, const char *data, struct publish_result *counts,
                       struct stage_times *times)
{
    struct pipeline *p = w->p;
    const uint32_t cs = p->m->chunk_size;
    uint64_t started = now_ns();
    if (buffer_is_zero(data, cs)) {
        counts->chunks_zero++;
        times->hash += now_ns() - started;
        return 0;
    }
    struct chunk_hash hash;
    chunk_hash_compute(data, cs, &hash);
    p->m->chunks[index] = hash;
    if (p->digests) {
        int rc = sign_digest_compute_alg(p->digests->chunk_alg, data, cs, &p->digests->chunks[index]);
        if (rc) {
            pthread_mutex_lock(&p->lock);
            fail_locked(p, rc, "cannot compute a chunk digest: %s", strerror(-rc));
            pthread_mutex_unlock(&p->lock);
            return rc;
        }
    }
    uint64_t hashed = now_ns();
    times->hash += hashed - started;
    pthread_mutex_lock(&p->claims_lock);
    int claimed = claim(&p->claims, &hash);
    pthread_mutex_unlock(&p->claims_lock);
    if (claimed < 0) {
        pthread_mutex_lock(&p->lock);
        fail_locked(p, claimed, "out of memory");
        pthread_mutex_unlock(&p->lock);
        return claimed;
    }
    bool reused = !claimed || repo_has_chunk(p->repo, &hash);
    uint64_t looked_up = now_ns();
    times->store += looked_up - hashed;
    if (reused) {
        counts->chunks_reused++;
        return 0;
    }
    long n = chunkfmt_encode_with(w->encoder, data, cs, w->enc, w->enc_cap);
    uint64_t compressed = now_ns();
    times->compress += compressed - looked_up;
    int rc = n < 0 ? (int)n : repo_put_chunk(p->repo, &hash, w->enc, (size_t)n);
    times->store += now_ns() - compressed;
    if (rc) {
        pthread_mutex_lock(&p->lock);
        fail_locked(p, rc, "cannot store a chunk in the repository: %s", strerror(-rc));
        pthread_mutex_unlock(&p->lock);
        return rc;
    }
    counts->chunks_new++;
    counts->bytes_stored += (uint64_t)n;
    return 0;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct pipeline *p = w->p;
    uint64_t first, count;
    struct stage_times times = {0};
    pthread_mutex_lock(&p->lock);
    while (take_batch_locked(p, &first, &count)) {
        pthread_mutex_unlock(&p->lock);
        struct publish_result counts = {0};
        uint64_t started = now_ns();
        int rc = read_batch(w, first, count, &counts.bytes_read);
        times.read += now_ns() - started;
        for (uint64_t k = 0; !rc && k < count; k++)
            rc = store_chunk(w, first + k, w->buf + k * p->m->chunk_size, &counts, &times);
        pthread_mutex_lock(&p->lock);
        if (rc)
            break;
        p->totals.bytes_read += counts.bytes_read;
        p->totals.chunks_zero += counts.chunks_zero;
        p->totals.chunks_reused += counts.chunks_reused;
        p->totals.chunks_new += counts.chunks_new;
        p->totals.bytes_stored += counts.bytes_stored;
        p->done_bytes += chunks_end(p->m, first + count) - first * p->m->chunk_size;
    }
    pthread_mutex_unlock(&p->lock);
    struct rusage used;
    double cpu = getrusage(RUSAGE_THREAD, &used) == 0
                     ? (double)used.ru_utime.tv_sec + (double)used.ru_utime.tv_usec / 1e6 +
                           (double)used.ru_stime.tv_sec + (double)used.ru_stime.tv_usec / 1e6
                     : 0;
    pthread_mutex_lock(&p->lock);
    p->totals.read_seconds += (double)times.read / 1e9;
    p->totals.hash_seconds += (double)times.hash / 1e9;
    p->totals.compress_seconds += (double)times.compress / 1e9;
    p->totals.store_seconds += (double)times.store / 1e9;
    p->totals.worker_cpu_seconds += cpu;
    p->running--;
    pthread_cond_broadcast(&p->ended);
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

static void worker_free(struct worker *w)
{
    if (w->reader != w->p->img)
        image_close(w->reader);
    chunkfmt_encoder_free(w->encoder);
    free(w->buf);
    free(w->enc);
}

static int worker_init(struct worker *w, struct pipeline *p, bool first, char *err, size_t errlen)
{
    memset(w, 0, sizeof(*w));
    w->p = p;
    w->reader = p->img;
    if (!first) {
        int rc = image_reopen(p->img, &w->reader, err, errlen);
        if (rc)
            return rc;
    }
    w->enc_cap = chunkfmt_bound(p->m->chunk_size);
    w->encoder = chunkfmt_encoder_new(p->level);
    w->buf = malloc(p->batch_chunks * p->m->chunk_size);
    w->enc = malloc(w->enc_cap);
    if (!w->encoder || !w->buf || !w->enc) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    return 0;
}

/* One more than the CPUs: a worker blocked on a read, a write or the lock
 * leaves its CPU to the extra one (on 2 CPUs under load, 3 workers took
 * 0.74-0.91x of 2 workers' time in 6 of 8 rounds; bench/RESULTS.md). */
static unsigned default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 2 : n >= PUBLISH_MAX_THREADS ? PUBLISH_MAX_THREADS : (unsigned)n + 1;
}

/* Reads, hashes and stores every chunk of img into m->chunks (and digests
 * them into digests->chunks unless it is NULL), on threads workers; returns
 * when all of them have ended. */
static int store_chunks(struct image *img, const struct publish_options *opts, struct repo *repo,
                        struct manifest *m, struct version_digests *digests, struct publish_result *res,
                        char *err, size_t errlen)
{
    unsigned threads = opts->threads ? opts->threads : default_threads();
    if (threads > PUBLISH_MAX_THREADS)
        threads = PUBLISH_MAX_THREADS;
    struct pipeline p = {
        .img = img,
        .image_path = opts->image_path,
        .repo = repo,
        .m = m,
        .digests = digests,
        .level = opts->zstd_level,
        .batch_chunks = BATCH_BYTES > m->chunk_size ? BATCH_BYTES / m->chunk_size : 1,
    };
    pthread_mutex_init(&p.lock, NULL);
    pthread_mutex_init(&p.claims_lock, NULL);
    cond_init_monotonic(&p.ended);
    struct worker *workers = calloc(threads, sizeof(*workers));
    int rc = workers ? 0 : -ENOMEM;
    if (rc)
        snprintf(err, errlen, "out of memory");
    unsigned started = 0;
    for (; !rc && started < threads; started++) {
        rc = worker_init(&workers[started], &p, started == 0, err, errlen);
        if (rc) {
            worker_free(&workers[started]);
            break;
        }
        pthread_mutex_lock(&p.lock);
        p.running++;
        pthread_mutex_unlock(&p.lock);
        rc = -pthread_create(&workers[started].thread, NULL, worker_main, &workers[started]);
        if (rc) {
            pthread_mutex_lock(&p.lock);
            p.running--;
            pthread_mutex_unlock(&p.lock);
            worker_free(&workers[started]);
            snprintf(err, errlen, "cannot start a publish thread: %s", strerror(-rc));
            break;
        }
    }
    if (rc) { /* stop the workers that did start */
        pthread_mutex_lock(&p.lock);
        fail_locked(&p, rc, "%s", err);
        pthread_mutex_unlock(&p.lock);
    }

    struct progress bar;
    progress_start(&bar, "publishing", m->size);
    pthread_mutex_lock(&p.lock);
    while (p.running > 0) {
        /* Ten updates a second; waking for every batch cost a context
         * switch per MiB on a machine whose CPUs the workers fill. */
        cond_wait_until(&p.ended, &p.lock, now_ns() + 100000000ull);
        uint64_t done = p.done_bytes;
        pthread_mutex_unlock(&p.lock);
        progress_update(&bar, done);
        pthread_mutex_lock(&p.lock);
    }
    pthread_mutex_unlock(&p.lock);
    for (unsigned i = 0; i < started; i++) {
        pthread_join(workers[i].thread, NULL);
        worker_free(&workers[i]);
    }
    free(workers);
    if (!p.rc) {
        progress_update(&bar, p.done_bytes);
        progress_finish(&bar);
    } else if (!rc) {
        snprintf(err, errlen, "%s", p.err);
    }
    rc = p.rc;
    res->bytes_read = p.totals.bytes_read;
    res->bytes_unallocated = m->size - p.totals.bytes_read;
    res->chunks_zero = p.totals.chunks_zero;
    res->chunks_reused = p.totals.chunks_reused;
    res->chunks_new = p.totals.chunks_new;
    res->bytes_stored = p.totals.bytes_stored;
    res->threads = threads;
    res->read_seconds = p.totals.read_seconds;
    res->hash_seconds = p.totals.hash_seconds;
    res->compress_seconds = p.totals.compress_seconds;
    res->store_seconds = p.totals.store_seconds;
    res->worker_cpu_seconds = p.totals.worker_cpu_seconds;
    free(p.claims.slots);
    pthread_cond_destroy(&p.ended);
    pthread_mutex_destroy(&p.lock);
    pthread_mutex_destroy(&p.claims_lock);
    return rc;
}

/* ---- making the version visible --------------------------------------------- */

/* Records version as the latest of name in the index, which is rewritten. */
static int set_latest(struct repo *repo, const char *name, uint64_t version, char *err, size_t errlen)
{
    struct repo_index index;
    int rc = repo_read_index(repo, &index, err, errlen);
    if (rc)
        return rc;
    struct repo_index_entry *entry = (struct repo_index_entry *)repo_index_find(&index, name);
    if (!entry) {
        struct repo_index_entry *grown = realloc(index.entries, (index.count + 1) * sizeof(*grown));
        if (!grown) {
            repo_index_free(&index);
            snprintf(err, errlen, "out of memory");
            return -ENOMEM;
        }
        index.entries = grown;
        entry = &index.entries[index.count++];
        snprintf(entry->name, sizeof(entry->name), "%s", name);
    }
    entry->latest = version;
    rc = repo_write_index(repo, &index);
    repo_index_free(&index);
    if (rc == -EPERM)
        snprintf(err, errlen, "the repository is signed: publish with --key KEYFILE");
    else if (rc)
        snprintf(err, errlen, "cannot write the repository index: %s", strerror(-rc));
    return rc;
}

static int next_version(struct repo *repo, const char *name, uint64_t *version, char *err, size_t errlen)
{
    struct repo_index index;
    int rc = repo_read_index(repo, &index, err, errlen);
    if (rc)
        return rc;
    const struct repo_index_entry *found = repo_index_find(&index, name);
    *version = found ? found->latest + 1 : 1;
    repo_index_free(&index);
    return 0;
}

/* Writes the manifest of m (its version already set) atomically. */
static int write_manifest(struct repo *repo, const struct manifest *m, char *err, size_t errlen)
{
    int rc = repo_put_manifest(repo, m);
    if (rc)
        snprintf(err, errlen, "cannot write the manifest: %s", strerror(-rc));
    return rc;
}

/* Steps 2-4 of publish.h: makes the stored chunks durable, then gives m the
 * next version number, writes its manifest and points the index at it. The
 * index write of a signed publish takes m's chunk digests from digests. */
static int commit_version(struct repo *repo, struct manifest *m, struct version_digests *digests,
                          double *sync_seconds, char *err, size_t errlen)
{
    uint64_t started = now_ns();
    int rc = repo_sync(repo);
    *sync_seconds = (double)(now_ns() - started) / 1e9;
    if (rc) {
        snprintf(err, errlen, "cannot flush the repository to disk: %s", strerror(-rc));
        return rc;
    }
    /* The version number is taken under the lock so that two publishers of
     * one name get distinct versions; chunk storage needs no lock. */
    rc = repo_lock_publish(repo);
    if (rc) {
        snprintf(err, errlen, "cannot lock the repository for publishing: %s", strerror(-rc));
        return rc;
    }
    rc = next_version(repo, m->name, &m->version, err, errlen);
    if (!rc && digests) {
        snprintf(digests->name, sizeof(digests->name), "%s", m->name);
        digests->version = m->version;
        repo_set_fresh_digests(repo, digests);
    }
    if (!rc)
        rc = write_manifest(repo, m, err, errlen);
    if (!rc)
        rc = set_latest(repo, m->name, m->version, err, errlen);
    repo_set_fresh_digests(repo, NULL);
    repo_unlock_publish(repo);
    return rc;
}

int publish_image(const struct publish_options *opts, struct publish_result *res, char *err, size_t errlen)
{
    memset(res, 0, sizeof(*res));
    if (!name_is_valid(opts->name)) {
        snprintf(err, errlen,
                 "invalid base name '%s': use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'",
                 opts->name);
        return -EINVAL;
    }
    if (!manifest_chunk_size_valid(opts->chunk_size)) {
        snprintf(err, errlen, "chunk size must be a power of two between 4K and 16M");
        return -EINVAL;
    }
    if (opts->threads > PUBLISH_MAX_THREADS) {
        snprintf(err, errlen, "at most %d publish threads", PUBLISH_MAX_THREADS);
        return -EINVAL;
    }
    struct image *img;
    int rc = image_open(opts->image_path, &img, err, errlen);
    if (rc)
        return rc;
    uint64_t size = image_size(img);
    if (size == 0 || size > MANIFEST_MAX_DISK_SIZE) {
        snprintf(err, errlen, "image %s has an unsupported virtual size (%" PRIu64 " bytes)", opts->image_path,
                 size);
        image_close(img);
        return -EINVAL;
    }
    /* Refused before the manifest is allocated. */
    if ((size + opts->chunk_size - 1) / opts->chunk_size > MANIFEST_MAX_CHUNKS) {
        snprintf(err, errlen,
                 "image %s claims %" PRIu64 " bytes, more than %llu chunks of %" PRIu32
                 " bytes (a manifest holds at most 1 TiB at 128K chunks, 128 TiB with --chunk-size 16M)",
                 opts->image_path, size, MANIFEST_MAX_CHUNKS, opts->chunk_size);
        image_close(img);
        return -EFBIG;
    }
    struct repo *repo;
    rc = repo_open_for_publish(opts->repo_path, &repo, err, errlen);
    if (rc) {
        image_close(img);
        return rc;
    }
    repo_set_signers(repo, opts->keys, opts->key_count);
    /* Shared with other publishers, exclusive of gc, until the index names
     * the new version (repo.h). */
    rc = repo_lock_chunks(repo, false, true);
    if (rc) {
        snprintf(err, errlen, "cannot lock the repository's chunks: %s", strerror(-rc));
        repo_close(repo);
        image_close(img);
        return rc;
    }
    uint64_t chunk_count = (size + opts->chunk_size - 1) / opts->chunk_size;
    struct manifest *m = manifest_new(chunk_count);
    /* Signed: the digests record's chunk digests come from the workers. */
    struct version_digests *digests = opts->key_count ? digests_new(chunk_count) : NULL;
    if (!m || (opts->key_count && !digests)) {
        snprintf(err, errlen, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    snprintf(m->name, sizeof(m->name), "%s", opts->name);
    m->size = size;
    m->chunk_size = opts->chunk_size;
    m->created = opts->created ? opts->created : (uint64_t)time(NULL);
    describe_source(opts->image_path, image_format(img), m->source, sizeof(m->source));
    res->size = size;
    snprintf(res->format, sizeof(res->format), "%s", image_format(img));

    rc = store_chunks(img, opts, repo, m, digests, res, err, errlen);
    if (!rc)
        rc = commit_version(repo, m, digests, &res->sync_seconds, err, errlen);
    if (!rc)
        res->version = m->version;
out:
    digests_free(digests);
    manifest_free(m);
    repo_close(repo);
    image_close(img);
    return rc;
}
