/* The fetch engine (see fetch.h).
 *
 * NOTES ON THE DESIGN
 *
 * A job is one chunk being brought in. Its states and who moves it:
 *   QUEUED      in its class queue, waiting for a slot (fetch_start creates
 *               it; a retry timer or a failed verification puts it back)
 *   RETRY_WAIT  waiting for retry_at after a transient error (dispatcher)
 *   TRANSFER    holding a slot: a curl transfer in the multi handle, or a
 *               local read queued for a worker (dispatcher: start_jobs)
 *   VERIFY      bytes in hand, queued for a worker to decode and verify
 *   DONE        verified; waiters completed; the worker writes the cache
 *               file and then unlinks the job
 *   FAILED      deadline passed or the chunk is bad everywhere; waiters
 *               completed with -EIO; the fill is abandoned, then unlinked
 *
 * Invariants:
 *   1. A job is in the table from creation until its cache fill is either
 *      done or abandoned, so a cache entry that is BUSY either has a job in
 *      the table or is in a short local operation of the cache itself.
 *   2. find_job() never returns a FAILED job; at most one other job per hash.
 *   3. Every waiter is completed exactly once: by the worker (DONE), by
 *      fail_job_locked(), by its own deadline (expire_locked), or by
 *      fetcher_shutdown().
 *   4. Callbacks, cache calls and I/O happen with the engine lock released.
 *   5. demand_active counts the jobs of class FETCH_DEMAND that are neither
 *      DONE nor FAILED; replay and background start only while it is 0.
 *   6. No waiter's deadline, deadline of a job that holds no slot, or retry
 *      timer falls before next_due: the dispatcher passes over the jobs
 *      (expire_locked) only once it is due, so a wake costs the jobs that
 *      start, not every live one. Whatever sets such a time lowers it
 *      (note_due).
 */
#include "fetch.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "chunkfmt.h"
#include "util.h"

#define BACKOFF_START_NS (50ull * 1000 * 1000)
#define BACKOFF_MAX_NS (2000ull * 1000 * 1000)
#define BUSY_WAIT_NS (20ull * 1000 * 1000)
#define NO_DEADLINE UINT64_MAX
#define TABLE_SIZE 4096

struct fetch_buf {
    atomic_uint refs;
    char *data;  /* the chunk: inline_data, or inside owned */
    char *owned; /* a raw-stored chunk as fetched, used in place (no copy), or NULL */
    char inline_data[];
};

enum job_state { JOB_QUEUED, JOB_RETRY_WAIT, JOB_TRANSFER, JOB_VERIFY, JOB_DONE, JOB_FAILED };

struct waiter {
    struct waiter *next;
    fetch_done_fn done;
    void *arg;
    struct fetch_ref *ref;
    uint64_t deadline; /* NO_DEADLINE: bounded by the job's own */
    struct fetch_counters *counters;
    bool joined;  /* came to a job another request started */
    bool counted; /* a demand request: in callbacks_pending */
    bool after_write; /* replay and pre-copy: completed once the chunk is in the cache */
    int err;     /* set when it is completed */
};

struct job {
    struct chunk_hash hash;
    uint32_t chunk_size;
    enum fetch_class cls;
    enum job_state state;
    struct cache_pin fill;  /* CACHE_MUST_FILL pin this job owns */
    uint64_t deadline;      /* 0: set when first started */
    uint64_t retry_at;
    uint64_t backoff;
    int verify_attempts;
    int mirror;             /* -1: the repository's current one */
    int tried;              /* mirrors tried since the last backoff */
    bool retry;             /* the next transfer is a retry */
    bool background_slot;   /* its slot counts against the background share */
    int slot_mirror;
    struct waiter *waiters;
    struct fetch_counters *counters; /* of the request that started it */
    struct fetch_buf *buf;  /* the verified chunk, once DONE */
    /* The transfer in hand. */
    CURL *easy;
    char *enc;
    size_t enc_len, enc_cap;
    bool too_big;
    int xfer_mirror;
    uint64_t xfer_deadline; /* the deadline when the transfer started */
    uint64_t xfer_started;
    /* Links: table bucket, class or work queue, failure list, every job.
     * qprev is the one before it in its class queue (NULL at the head and
     * outside the queue): a job leaves the middle of a queue (raised to a
     * higher class, failed at its deadline) without a walk along it. */
    struct job *hnext, *qnext, *qprev, *dnext;
    struct job *anext, *aprev;
};

struct fetcher {
    struct cache *cache;
    struct repo *repo;
    bool local; /* chunks are read by the workers (no URL transport) */
    bool missing_is_final;
    int slots;
    uint64_t timeout_ns;
    atomic_uint_fast64_t requests;
    atomic_uint_fast64_t bytes_transferred;
    atomic_uint_fast64_t verify_failures;
    atomic_uint_fast64_t errors;
    atomic_uint_fast64_t uncached;
    /* last_error and last_error_ns are guarded by error_lock (a leaf lock). */
    pthread_mutex_t error_lock;
    char last_error[256];
    uint64_t last_error_ns;

    /* The engine lock guards everything below; see fetch.h for what it is
     * never held across. */
    pthread_mutex_t lock;
    struct job *table[TABLE_SIZE];
    size_t jobs;
    struct job *all; /* every job in the table: a pass over the live jobs costs them, not the table's size */
    struct job *queue_head[FETCH_CLASSES], *queue_tail[FETCH_CLASSES];
    struct job *work_head, *work_tail;
    pthread_cond_t work_ready;  /* work queue not empty, or stop */
    pthread_cond_t demand_idle; /* demand_active dropped to 0, or stop */
    int demand_active;
    pthread_cond_t drained; /* callbacks_pending dropped to 0 */
    int callbacks_pending;  /* demand waiters whose done() has not returned */
    uint64_t next_due; /* invariant 6; 0: pass at the next wake */
    int in_flight[REPO_MAX_MIRRORS];
    int in_flight_background[REPO_MAX_MIRRORS];
    int transfers;
    bool stop;
    bool shut_down;

    CURLM *multi; /* used by the dispatcher thread alone (curl_multi_wakeup excepted) */
    /* A curl_multi_wakeup is outstanding: the dispatcher has not yet started
     * the pass that sees what it was for. Further wakeups before then are
     * the same one (a local read would otherwise cost three per chunk). */
    atomic_bool wake_pending;
    pthread_t dispatcher;
    pthread_t workers[FETCH_WORKERS];
    int worker_count;
    bool dispatcher_running;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

uint64_t fetch_deadline(const struct fetcher *f) { return now_ns() + f->timeout_ns; }

/* ---- buffers and refs ---------------------------------------------------------- */

static struct fetch_buf *buf_new(uint32_t len)
{
    struct fetch_buf *b = malloc(sizeof(*b) + len);
    if (b) {
        atomic_init(&b->refs, 1);
        b->data = b->inline_data;
        b->owned = NULL;
    }
    return b;
}

/* A buffer that takes over enc (malloc'd), whose chunk starts at data. */
static struct fetch_buf *buf_adopt(char *enc, const char *data)
{
    struct fetch_buf *b = malloc(sizeof(*b));
    if (b) {
        atomic_init(&b->refs, 1);
        b->data = (char *)data;
        b->owned = enc;
    }
    return b;
}

static void buf_get(struct fetch_buf *b) { atomic_fetch_add(&b->refs, 1); }

static void buf_put(struct fetch_buf *b)
{
    if (b && atomic_fetch_sub(&b->refs, 1) == 1) {
        free(b->owned);
        free(b);
    }
}

void fetch_ref_release(struct fetcher *f, struct fetch_ref *ref)
{
    if (ref->buf)
        buf_put(ref->buf);
    else if (ref->pin.entry)
        cache_release(f->cache, &ref->pin);
    ref->buf = NULL;
    ref->data = NULL;
    ref->pin.entry = NULL;
    ref->pin.fd = -1;
}

int fetch_ref_read(const struct fetch_ref *ref, void *buf, size_t len, uint64_t off)
{
    if (ref->data) {
        memcpy(buf, ref->data + off, len);
        return 0;
    }
    const char *checked = cache_pin_bytes(&ref->pin, off, len);
    if (checked) {
        memcpy(buf, checked, len);
        return 0;
    }
    return read_full_at(ref->pin.fd, buf, len, (off_t)(ref->pin.off + off)) ? -EIO : 0;
}

/* ---- errors ------------------------------------------------------------------ */

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

/* ---- the job table and queues (engine lock held) ------------------------------ */

static struct job **bucket(struct fetcher *f, const struct chunk_hash *hash)
{
    return &f->table[chunk_hash_bucket(hash) % TABLE_SIZE];
}

static struct job *find_job(struct fetcher *f, const struct chunk_hash *hash)
{
    for (struct job *j = *bucket(f, hash); j; j = j->hnext)
        if (j->state != JOB_FAILED && chunk_hash_equal(&j->hash, hash))
            return j;
    return NULL;
}

static void unlink_job(struct fetcher *f, struct job *job)
{
    for (struct job **p = bucket(f, &job->hash); *p; p = &(*p)->hnext) {
        if (*p == job) {
            *p = job->hnext;
            f->jobs--;
            if (job->aprev)
                job->aprev->anext = job->anext;
            else
                f->all = job->anext;
            if (job->anext)
                job->anext->aprev = job->aprev;
            return;
        }
    }
}

/* A deadline or retry time (0 and NO_DEADLINE: none) the dispatcher must
 * look at: invariant 6. */
static void note_due(struct fetcher *f, uint64_t when)
{
    if (when && when < f->next_due)
        f->next_due = when;
}

static void enqueue(struct fetcher *f, struct job *job, bool front)
{
    int c = job->cls;
    job->state = JOB_QUEUED;
    note_due(f, job->deadline); /* holds no slot from here on */
    job->qnext = job->qprev = NULL;
    if (!f->queue_head[c]) {
        f->queue_head[c] = f->queue_tail[c] = job;
    } else if (front) {
        job->qnext = f->queue_head[c];
        f->queue_head[c]->qprev = job;
        f->queue_head[c] = job;
    } else {
        job->qprev = f->queue_tail[c];
        f->queue_tail[c]->qnext = job;
        f->queue_tail[c] = job;
    }
}

/* Takes job out of its class queue; nothing when it is not in it (a new
 * job is JOB_QUEUED before it is queued). */
static void dequeue(struct fetcher *f, struct job *job)
{
    int c = job->cls;
    if (job->qprev)
        job->qprev->qnext = job->qnext;
    else if (f->queue_head[c] == job)
        f->queue_head[c] = job->qnext;
    else
        return;
    if (job->qnext)
        job->qnext->qprev = job->qprev;
    else
        f->queue_tail[c] = job->qprev;
    job->qnext = job->qprev = NULL;
}

static void push_work(struct fetcher *f, struct job *job)
{
    job->qnext = NULL;
    if (f->work_tail)
        f->work_tail->qnext = job;
    else
        f->work_head = job;
    f->work_tail = job;
    pthread_cond_signal(&f->work_ready);
}

static void wake_dispatcher(struct fetcher *f)
{
    if (f->multi && !atomic_exchange(&f->wake_pending, true) && curl_multi_wakeup(f->multi) != CURLM_OK)
        atomic_store(&f->wake_pending, false); /* none is outstanding after all */
}

static void demand_ended(struct fetcher *f, struct job *job)
{
    if (job->cls == FETCH_DEMAND && --f->demand_active == 0)
        pthread_cond_broadcast(&f->demand_idle);
}

/* Raises a job to class cls (a demand request joins a replay job, say). */
static void raise_class(struct fetcher *f, struct job *job, enum fetch_class cls)
{
    if (cls >= job->cls || job->state == JOB_DONE)
        return;
    bool queued = job->state == JOB_QUEUED;
    if (queued)
        dequeue(f, job);
    if (cls == FETCH_DEMAND)
        f->demand_active++;
    job->cls = cls;
    if (queued)
        enqueue(f, job, false);
}

static void release_slot(struct fetcher *f, struct job *job)
{
    f->in_flight[job->slot_mirror]--;
    if (job->background_slot)
        f->in_flight_background[job->slot_mirror]--;
    f->transfers--;
}

/* Completes every waiter with err (adds them to *fired) and marks the job
 * FAILED; the caller cleans it up with finish_failed() after unlocking. */
static void fail_job_locked(struct fetcher *f, struct job *job, int err, struct waiter **fired, struct job **dead)
{
    if (job->state == JOB_QUEUED)
        dequeue(f, job);
    job->state = JOB_FAILED;
    demand_ended(f, job);
    while (job->waiters) {
        struct waiter *w = job->waiters;
        job->waiters = w->next;
        w->err = err;
        w->next = *fired;
        *fired = w;
    }
    job->dnext = *dead;
    *dead = job;
}

/* ---- completing waiters and cleaning up (engine lock not held) ----------------- */

static void complete_waiters(struct fetcher *f, struct waiter *w)
{
    while (w) {
        struct waiter *next = w->next;
        if (w->err) {
            atomic_fetch_add(&f->errors, 1);
            if (w->counters)
                atomic_fetch_add(&w->counters->errors, 1);
        }
        bool counted = w->counted;
        w->done(w->arg, w->err);
        free(w);
        if (counted) {
            pthread_mutex_lock(&f->lock);
            if (--f->callbacks_pending == 0)
                pthread_cond_broadcast(&f->drained);
            pthread_mutex_unlock(&f->lock);
        }
        w = next;
    }
}

void fetcher_drain(struct fetcher *f)
{
    pthread_mutex_lock(&f->lock);
    while (f->callbacks_pending > 0)
        pthread_cond_wait(&f->drained, &f->lock);
    pthread_mutex_unlock(&f->lock);
}

static void free_job(struct job *job)
{
    if (job->easy)
        curl_easy_cleanup(job->easy);
    free(job->enc);
    buf_put(job->buf);
    free(job);
}

static void finish_failed(struct fetcher *f, struct job *dead)
{
    while (dead) {
        struct job *next = dead->dnext;
        cache_abandon(f->cache, &dead->fill); /* invariant 1: before the unlink */
        pthread_mutex_lock(&f->lock);
        unlink_job(f, dead);
        pthread_mutex_unlock(&f->lock);
        free_job(dead);
        dead = next;
    }
}

/* ---- transfer outcomes (engine lock held) ---------------------------------------- */

/* A transfer failed with err. Retries at once on another mirror after a
 * failover, after a backoff otherwise, and fails the job when its deadline
 * leaves no time or the error is final. */
static void transfer_failed(struct fetcher *f, struct job *job, int err, struct waiter **fired, struct job **dead)
{
    uint64_t now = now_ns();
    int mirrors = repo_mirror_count(f->repo);
    job->tried++;
    if (err == -EFBIG || (err == -ENOENT && f->missing_is_final)) {
        /* Too large to be a chunk; or a backend (a local directory) where
         * the file will not appear by waiting. */
        fail_job_locked(f, job, -EIO, fired, dead);
        return;
    }
    if (job->tried < mirrors) {
        /* Another mirror has not been tried since the last backoff. */
        job->mirror = err == -ENOENT ? repo_next_mirror(f->repo, job->xfer_mirror) : repo_pick_mirror(f->repo);
        if (job->mirror == job->xfer_mirror)
            job->mirror = repo_next_mirror(f->repo, job->xfer_mirror);
        job->retry = true;
        enqueue(f, job, true);
        return;
    }
    if (job->deadline && now + 10000000ull >= job->deadline) {
        fail_job_locked(f, job, -EIO, fired, dead);
        return;
    }
    job->tried = 0;
    job->mirror = -1;
    job->retry = true;
    if (!job->backoff)
        job->backoff = BACKOFF_START_NS;
    /* Back off, but keep one last try for the end of the deadline. */
    job->retry_at = now + job->backoff;
    if (job->deadline && job->retry_at + 10000000ull > job->deadline)
        job->retry_at = job->deadline - 10000000ull;
    job->backoff = job->backoff * 2 > BACKOFF_MAX_NS ? BACKOFF_MAX_NS : job->backoff * 2;
    job->state = JOB_RETRY_WAIT;
    note_due(f, job->retry_at);
    note_due(f, job->deadline);
}

/* ---- the dispatcher ----------------------------------------------------------- */

/* Waiters past their deadline fail; jobs past theirs that hold no slot fail;
 * retry timers that are due put their job back in its queue. Returns when
 * the next of these is due (within a second). A pass over every live job:
 * the dispatcher makes one only when next_due says one is due. */
static uint64_t expire_locked(struct fetcher *f, uint64_t now, struct waiter **fired, struct job **dead)
{
    uint64_t next = now + 1000000000ull;
    for (struct job *job = f->all; job; job = job->anext) {
        if (job->state == JOB_FAILED || job->state == JOB_DONE)
            continue;
        for (struct waiter **p = &job->waiters; *p;) {
            struct waiter *w = *p;
            if (w->deadline <= now) {
                *p = w->next;
                w->err = -EIO;
                w->next = *fired;
                *fired = w;
                continue;
            }
            if (w->deadline < next)
                next = w->deadline;
            p = &w->next;
        }
        bool holds_slot = job->state == JOB_TRANSFER || job->state == JOB_VERIFY;
        if (!holds_slot && job->deadline && job->deadline <= now) {
            fail_job_locked(f, job, -EIO, fired, dead);
            continue;
        }
        if (!holds_slot && job->deadline && job->deadline < next)
            next = job->deadline;
        if (job->state == JOB_RETRY_WAIT) {
            if (job->retry_at <= now)
                enqueue(f, job, true);
            else if (job->retry_at < next)
                next = job->retry_at;
        }
    }
    return next;
}

/* The next job allowed to start, by class: demand may use every slot of a
 * mirror, replay half and background a quarter, and neither starts while
 * demand is active. */
static struct job *next_startable(struct fetcher *f, int *mirror)
{
    int current = repo_pick_mirror(f->repo);
    for (int c = 0; c < FETCH_CLASSES; c++) {
        struct job *job = f->queue_head[c];
        if (!job)
            continue;
        if (c != FETCH_DEMAND && f->demand_active > 0)
            return NULL;
        int m = job->mirror >= 0 ? job->mirror : current;
        int share = c == FETCH_DEMAND ? f->slots : c == FETCH_REPLAY ? f->slots / 2 : f->slots / 4;
        if (share < 1)
            share = 1;
        if (f->in_flight[m] >= f->slots)
            return NULL;
        if (c != FETCH_DEMAND && f->in_flight_background[m] >= share)
            return NULL;
        *mirror = m;
        return job;
    }
    return NULL;
}

/* Moves every startable job to TRANSFER; local ones go to the workers,
 * HTTP ones are returned for the dispatcher to add to the multi handle. */
static struct job *start_jobs_locked(struct fetcher *f, uint64_t now)
{
    struct job *http = NULL;
    int mirror;
    struct job *job;
    while ((job = next_startable(f, &mirror)) != NULL) {
        dequeue(f, job);
        job->state = JOB_TRANSFER;
        job->xfer_mirror = mirror;
        job->slot_mirror = mirror;
        job->background_slot = job->cls != FETCH_DEMAND;
        f->in_flight[mirror]++;
        if (job->background_slot)
            f->in_flight_background[mirror]++;
        f->transfers++;
        if (!job->deadline)
            job->deadline = now + f->timeout_ns;
        job->xfer_deadline = job->deadline;
        atomic_fetch_add(&f->requests, 1);
        if (f->local) {
            push_work(f, job);
        } else {
            job->qnext = http;
            http = job;
        }
    }
    return http;
}

static size_t body_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct job *job = userdata;
    size_t n = size * nmemb;
    if (job->enc_len + n > job->enc_cap) {
        job->too_big = true;
        return 0;
    }
    memcpy(job->enc + job->enc_len, ptr, n);
    job->enc_len += n;
    return n;
}

/* Sets up and adds one HTTP transfer (dispatcher thread, no lock: while a
 * job is in TRANSFER only the dispatcher touches its transfer fields). */
static int http_start(struct fetcher *f, struct job *job)
{
    char rel[64];
    repo_chunk_relpath(&job->hash, rel, sizeof(rel));
    job->enc_cap = (size_t)job->chunk_size + CHUNKFMT_MAX_OVERHEAD;
    if (!job->enc && !(job->enc = malloc(job->enc_cap)))
        return -ENOMEM;
    job->enc_len = 0;
    job->too_big = false;
    if (!job->easy && !(job->easy = curl_easy_init()))
        return -ENOMEM;
    curl_easy_reset(job->easy);
    int rc = repo_http_prepare(f->repo, job->xfer_mirror, rel, job->easy);
    if (rc)
        return rc;
    uint64_t now = now_ns();
    long ms = job->xfer_deadline > now ? (long)((job->xfer_deadline - now) / 1000000) : 1;
    curl_easy_setopt(job->easy, CURLOPT_TIMEOUT_MS, ms > 0 ? ms : 1L);
    curl_easy_setopt(job->easy, CURLOPT_WRITEFUNCTION, body_write);
    curl_easy_setopt(job->easy, CURLOPT_WRITEDATA, job);
    curl_easy_setopt(job->easy, CURLOPT_PRIVATE, job);
    repo_note_request(f->repo, job->xfer_mirror, job->retry);
    job->xfer_started = now;
    return curl_multi_add_handle(f->multi, job->easy) == CURLM_OK ? 0 : -ENOMEM;
}

/* One HTTP transfer ended (dispatcher thread). */
static void http_done(struct fetcher *f, struct job *job, CURLcode result)
{
    curl_multi_remove_handle(f->multi, job->easy);
    long status = 0;
    curl_easy_getinfo(job->easy, CURLINFO_RESPONSE_CODE, &status);
    int err = 0;
    char what[160] = "";
    if (result == CURLE_OK && status == 200) {
        repo_note_success(f->repo, job->xfer_mirror, job->enc_len, now_ns() - job->xfer_started);
    } else if (result == CURLE_OK && (status == 404 || status == 410)) {
        err = -ENOENT;
        snprintf(what, sizeof(what), "missing from the repository");
    } else {
        if (job->too_big)
            err = -EFBIG, snprintf(what, sizeof(what), "stored chunk is larger than any valid chunk");
        else if (result == CURLE_OK)
            err = -EIO, snprintf(what, sizeof(what), "HTTP status %ld", status);
        else
            err = result == CURLE_OPERATION_TIMEDOUT ? -ETIMEDOUT : -EIO,
            snprintf(what, sizeof(what), "%s", curl_easy_strerror(result));
        repo_note_failure(f->repo, job->xfer_mirror, what);
    }
    if (err) {
        if (err == -EFBIG)
            atomic_fetch_add(&f->verify_failures, 1);
        note_error(f, &job->hash, what);
    }
    struct waiter *fired = NULL;
    struct job *dead = NULL;
    pthread_mutex_lock(&f->lock);
    release_slot(f, job);
    if (err) {
        transfer_failed(f, job, err, &fired, &dead);
    } else {
        job->state = JOB_VERIFY;
        push_work(f, job);
    }
    pthread_mutex_unlock(&f->lock);
    complete_waiters(f, fired);
    finish_failed(f, dead);
}

static void *dispatch_main(void *arg)
{
    struct fetcher *f = arg;
    for (;;) {
        struct waiter *fired = NULL;
        struct job *dead = NULL;
        /* Cleared before this pass looks at the state: a change made after
         * this point wakes the poll below again. */
        atomic_store(&f->wake_pending, false);
        pthread_mutex_lock(&f->lock);
        if (f->stop) {
            pthread_mutex_unlock(&f->lock);
            break;
        }
        uint64_t now = now_ns();
        if (now >= f->next_due)
            f->next_due = expire_locked(f, now, &fired, &dead);
        uint64_t next = f->next_due;
        struct job *http = start_jobs_locked(f, now);
        pthread_mutex_unlock(&f->lock);
        complete_waiters(f, fired);
        finish_failed(f, dead);
        while (http) {
            struct job *job = http;
            http = job->qnext;
            if (http_start(f, job) != 0) {
                note_error(f, &job->hash, "cannot set up the transfer");
                fired = NULL, dead = NULL;
                pthread_mutex_lock(&f->lock);
                release_slot(f, job);
                transfer_failed(f, job, -EIO, &fired, &dead);
                pthread_mutex_unlock(&f->lock);
                complete_waiters(f, fired);
                finish_failed(f, dead);
            }
        }
        int running;
        curl_multi_perform(f->multi, &running);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(f->multi, &left)) != NULL) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            struct job *job = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&job);
            http_done(f, job, msg->data.result);
        }
        now = now_ns();
        long ms = next > now ? (long)((next - now) / 1000000) + 1 : 0;
        curl_multi_poll(f->multi, NULL, 0, (int)(ms > 1000 ? 1000 : ms), NULL);
    }
    return NULL;
}

/* ---- workers: local reads, verification, completion, write-behind -------------- */

static void verify_and_complete(struct fetcher *f, struct job *job)
{
    /* A chunk stored raw (incompressible data, most of a disk) is checked
     * and served where it was read into: one copy less per chunk. */
    const char *raw = chunkfmt_raw_payload(job->enc, job->enc_len, job->chunk_size);
    struct fetch_buf *buf = raw ? buf_adopt(job->enc, raw) : buf_new(job->chunk_size);
    const char *why = "";
    int rc = !buf ? -ENOMEM
             : raw ? repo_check_chunk(f->repo, &job->hash, raw, job->chunk_size, &why)
                   : repo_decode_chunk(f->repo, &job->hash, job->enc, job->enc_len, buf->data, job->chunk_size, &why);
    if (raw && buf)
        job->enc = NULL; /* buf owns it now, and frees it with itself on failure too */
    atomic_fetch_add(&f->bytes_transferred, job->enc_len);
    struct waiter *fired = NULL;
    struct job *dead = NULL;
    if (rc) {
        buf_put(buf);
        if (rc != -ENOMEM) {
            atomic_fetch_add(&f->verify_failures, 1);
            if (job->counters)
                atomic_fetch_add(&job->counters->verify_failures, 1);
            note_error(f, &job->hash, why);
            repo_report_bad(f->repo, job->xfer_mirror); /* the next attempt goes elsewhere */
        }
        pthread_mutex_lock(&f->lock);
        /* Each mirror once more, then it is bad everywhere. */
        if (rc == -ENOMEM || ++job->verify_attempts > repo_mirror_count(f->repo)) {
            fail_job_locked(f, job, rc == -ENOMEM ? -ENOMEM : -EIO, &fired, &dead);
        } else {
            job->mirror = -1;
            job->retry = true;
            enqueue(f, job, true);
        }
        pthread_mutex_unlock(&f->lock);
        wake_dispatcher(f);
        complete_waiters(f, fired);
        finish_failed(f, dead);
        return;
    }
    free(job->enc);
    job->enc = NULL;
    struct waiter *later = NULL;
    pthread_mutex_lock(&f->lock);
    job->state = JOB_DONE;
    job->buf = buf;
    demand_ended(f, job);
    while (job->waiters) {
        struct waiter *w = job->waiters;
        job->waiters = w->next;
        buf_get(buf);
        w->ref->buf = buf;
        w->ref->data = buf->data;
        w->ref->hit = w->joined;
        w->err = 0;
        struct waiter **list = w->after_write ? &later : &fired;
        w->next = *list;
        *list = w;
    }
    pthread_mutex_unlock(&f->lock);
    wake_dispatcher(f); /* demand may have ended: background can go */
    if (job->counters)
        atomic_fetch_add(&job->counters->bytes_fetched, job->chunk_size);
    complete_waiters(f, fired);
    /* Write behind: the entry stays BUSY (and this job findable) until the
     * file is in place. */
    rc = cache_fill(f->cache, &job->fill, buf->data, job->chunk_size);
    if (rc == 0)
        cache_release(f->cache, &job->fill);
    else if (rc == -ENOSPC || rc == -EDQUOT)
        atomic_fetch_add(&f->uncached, 1); /* full of chunks in use: served from memory only */
    else
        note_error(f, &job->hash, "cannot store it in the cache");
    /* Pre-copy and replay count a chunk as done once it is on disk. */
    complete_waiters(f, later);
    pthread_mutex_lock(&f->lock);
    unlink_job(f, job);
    pthread_mutex_unlock(&f->lock);
    free_job(job);
}

static void local_read(struct fetcher *f, struct job *job)
{
    char *enc = NULL;
    size_t len = 0;
    int mirror;
    int rc = repo_get_chunk(f->repo, &job->hash, job->chunk_size, 0, &enc, &len, &mirror);
    if (rc)
        note_error(f, &job->hash, rc == -ENOENT ? "missing from the repository" : rc == -EFBIG ?
                   "stored chunk is larger than any valid chunk" : strerror(-rc));
    if (rc == -EFBIG)
        atomic_fetch_add(&f->verify_failures, 1);
    struct waiter *fired = NULL;
    struct job *dead = NULL;
    pthread_mutex_lock(&f->lock);
    release_slot(f, job);
    if (rc) {
        transfer_failed(f, job, rc, &fired, &dead);
    } else {
        free(job->enc);
        job->enc = enc;
        job->enc_len = len;
        job->state = JOB_VERIFY;
    }
    pthread_mutex_unlock(&f->lock);
    wake_dispatcher(f);
    complete_waiters(f, fired);
    finish_failed(f, dead);
    if (!rc)
        verify_and_complete(f, job);
}

static void *worker_main(void *arg)
{
    struct fetcher *f = arg;
    pthread_mutex_lock(&f->lock);
    for (;;) {
        while (!f->work_head && !f->stop)
            pthread_cond_wait(&f->work_ready, &f->lock);
        if (f->stop)
            break;
        struct job *job = f->work_head;
        f->work_head = job->qnext;
        if (!f->work_head)
            f->work_tail = NULL;
        job->qnext = NULL;
        bool transfer = job->state == JOB_TRANSFER;
        pthread_mutex_unlock(&f->lock);
        if (transfer)
            local_read(f, job);
        else
            verify_and_complete(f, job);
        pthread_mutex_lock(&f->lock);
    }
    pthread_mutex_unlock(&f->lock);
    return NULL;
}

/* ---- requests ------------------------------------------------------------------ */

static struct job *new_job(const struct chunk_hash *hash, uint32_t chunk_size, enum fetch_class cls,
                           const struct cache_pin *fill, struct fetch_counters *counters)
{
    struct job *job = calloc(1, sizeof(*job));
    if (!job)
        return NULL;
    job->hash = *hash;
    job->chunk_size = chunk_size;
    job->cls = cls;
    job->fill = *fill;
    job->mirror = -1;
    job->counters = counters;
    return job;
}

/* Adds a new job for a fill this caller owns (engine lock held). */
static void add_job_locked(struct fetcher *f, struct job *job)
{
    struct job **b = bucket(f, &job->hash);
    job->hnext = *b;
    *b = job;
    f->jobs++;
    job->aprev = NULL;
    job->anext = f->all;
    if (f->all)
        f->all->aprev = job;
    f->all = job;
    if (job->cls == FETCH_DEMAND)
        f->demand_active++;
    enqueue(f, job, false);
}

static int start_threads_locked(struct fetcher *f);

/* The common path of fetch_start and fetch_ahead. w is NULL for readahead. */
static int request(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size, uint32_t want_off,
                   uint32_t want_len, enum fetch_class cls, uint64_t deadline_ns, struct fetch_counters *counters,
                   struct fetch_ref *ref, const struct waiter *tmpl)
{
    struct waiter *w = NULL; /* a copy of tmpl, made only when a request must wait */
    uint64_t wait_until = now_ns(); /* first look without waiting */
    for (;;) {
        struct cache_pin pin;
        int rc = cache_acquire(f->cache, hash, chunk_size, want_off, want_len, wait_until, &pin);
        if (rc == CACHE_HIT) {
            if (ref) {
                ref->pin = pin;
                ref->hit = true;
                if (counters)
                    atomic_fetch_add(pin.waited ? &counters->waits : &counters->hits, 1);
            } else {
                cache_release(f->cache, &pin);
            }
            return 0;
        }
        if (rc < 0 && rc != -ETIMEDOUT) {
            note_error(f, hash, strerror(-rc));
            return rc == -ENOMEM ? -ENOMEM : -EIO; /* the cache kept the chunk */
        }
        pthread_mutex_lock(&f->lock);
        if (f->stop || start_threads_locked(f) != 0) {
            pthread_mutex_unlock(&f->lock);
            if (rc == CACHE_MUST_FILL)
                cache_abandon(f->cache, &pin);
            return -EIO;
        }
        struct job *job = find_job(f, hash);
        if (job && job->state == JOB_DONE) {
            /* Verified and being written: serve it from memory. */
            struct fetch_buf *buf = job->buf;
            if (ref)
                buf_get(buf);
            pthread_mutex_unlock(&f->lock);
            if (rc == CACHE_MUST_FILL) /* its write failed; nothing to fill now */
                cache_abandon(f->cache, &pin);
            if (ref) {
                ref->buf = buf;
                ref->data = buf->data;
                ref->hit = true;
                if (counters)
                    atomic_fetch_add(&counters->waits, 1);
            }
            return 0;
        }
        if ((job || rc == CACHE_MUST_FILL) && tmpl && !(w = malloc(sizeof(*w)))) {
            pthread_mutex_unlock(&f->lock);
            if (rc == CACHE_MUST_FILL)
                cache_abandon(f->cache, &pin);
            return -ENOMEM;
        }
        if (w)
            *w = *tmpl;
        if (job) {
            if (w) {
                w->counted = cls == FETCH_DEMAND;
                w->after_write = cls != FETCH_DEMAND;
                f->callbacks_pending += w->counted;
                w->joined = true;
                w->next = job->waiters;
                job->waiters = w;
                note_due(f, w->deadline);
                if (deadline_ns != NO_DEADLINE && job->deadline && deadline_ns > job->deadline)
                    job->deadline = deadline_ns;
                else if (deadline_ns != NO_DEADLINE && !job->deadline && cls == FETCH_DEMAND)
                    job->deadline = deadline_ns;
                raise_class(f, job, cls);
                if (job->state == JOB_QUEUED || job->state == JOB_RETRY_WAIT)
                    note_due(f, job->deadline);
            }
            pthread_mutex_unlock(&f->lock);
            wake_dispatcher(f);
            if (rc == CACHE_MUST_FILL) /* cannot happen (invariant 1); harmless */
                cache_abandon(f->cache, &pin);
            if (w && counters)
                atomic_fetch_add(&counters->waits, 1);
            return w ? FETCH_PENDING : 0;
        }
        if (rc == CACHE_MUST_FILL) {
            job = new_job(hash, chunk_size, cls, &pin, counters);
            if (!job) {
                pthread_mutex_unlock(&f->lock);
                cache_abandon(f->cache, &pin);
                free(w);
                return -ENOMEM;
            }
            job->deadline = deadline_ns != NO_DEADLINE ? deadline_ns : 0;
            if (w) {
                w->counted = cls == FETCH_DEMAND;
                w->after_write = cls != FETCH_DEMAND;
                f->callbacks_pending += w->counted;
                w->next = NULL;
                job->waiters = w;
                note_due(f, w->deadline);
            }
            add_job_locked(f, job);
            pthread_mutex_unlock(&f->lock);
            wake_dispatcher(f);
            if (w && counters)
                atomic_fetch_add(&counters->misses, 1);
            return w ? FETCH_PENDING : 0;
        }
        pthread_mutex_unlock(&f->lock);
        /* BUSY with no job: the cache itself is verifying or evicting the
         * file (local work only). Look again shortly. */
        if (!tmpl)
            return 0;
        uint64_t now = now_ns();
        if (deadline_ns != NO_DEADLINE && now >= deadline_ns)
            return -EIO;
        wait_until = now + BUSY_WAIT_NS;
    }
}

int fetch_start_range(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size, uint32_t want_off,
                      uint32_t want_len, enum fetch_class cls, uint64_t deadline_ns, struct fetch_counters *counters,
                      struct fetch_ref *ref, fetch_done_fn done, void *arg)
{
    memset(ref, 0, sizeof(*ref));
    ref->pin.fd = -1;
    struct waiter tmpl = {.done = done, .arg = arg, .ref = ref, .deadline = deadline_ns, .counters = counters};
    int rc = request(f, hash, chunk_size, want_off, want_len, cls, deadline_ns, counters, ref, &tmpl);
    if (rc < 0) {
        atomic_fetch_add(&f->errors, 1);
        if (counters)
            atomic_fetch_add(&counters->errors, 1);
    }
    return rc;
}

int fetch_start(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size, enum fetch_class cls,
                uint64_t deadline_ns, struct fetch_counters *counters, struct fetch_ref *ref, fetch_done_fn done,
                void *arg)
{
    return fetch_start_range(f, hash, chunk_size, 0, 0, cls, deadline_ns, counters, ref, done, arg);
}

void fetch_ahead(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size,
                 struct fetch_counters *counters)
{
    if (cache_prefetch(f->cache, hash) == 0)
        return;
    request(f, hash, chunk_size, 0, 0, FETCH_DEMAND, fetch_deadline(f), counters, NULL, NULL);
}

struct sync_wait {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
    int err;
};

static void sync_done(void *arg, int err)
{
    struct sync_wait *s = arg;
    pthread_mutex_lock(&s->lock);
    s->done = true;
    s->err = err;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

int fetch_get(struct fetcher *f, const struct chunk_hash *hash, uint32_t chunk_size, enum fetch_class cls,
              struct fetch_counters *counters, struct fetch_ref *ref)
{
    struct sync_wait s = {.done = false};
    pthread_mutex_init(&s.lock, NULL);
    pthread_cond_init(&s.cond, NULL);
    /* Demand waits for its deadline; other classes are bounded by their
     * job's deadline, which starts when the transfer does. */
    uint64_t deadline = cls == FETCH_DEMAND ? fetch_deadline(f) : NO_DEADLINE;
    int rc = fetch_start(f, hash, chunk_size, cls, deadline, counters, ref, sync_done, &s);
    if (rc == FETCH_PENDING) {
        pthread_mutex_lock(&s.lock);
        while (!s.done)
            pthread_cond_wait(&s.cond, &s.lock);
        pthread_mutex_unlock(&s.lock);
        rc = s.err;
    }
    pthread_mutex_destroy(&s.lock);
    pthread_cond_destroy(&s.cond);
    return rc == -ENOMEM ? -ENOMEM : rc < 0 ? -EIO : 0;
}

void fetch_yield_to_demand(struct fetcher *f, const atomic_bool *stop)
{
    pthread_mutex_lock(&f->lock);
    while (f->demand_active > 0 && !f->stop && !atomic_load(stop)) {
        /* Bounded waits, so that a stop is seen within 100 ms. */
        cond_wait_until(&f->demand_idle, &f->lock, now_ns() + 100 * 1000 * 1000);
    }
    pthread_mutex_unlock(&f->lock);
}

/* ---- life cycle --------------------------------------------------------------- */

int fetcher_create(struct cache *cache, struct repo *repo, const struct fetch_options *opts,
                   struct fetcher **out)
{
    pthread_once(&curl_once, curl_init_once);
    struct fetcher *f = calloc(1, sizeof(*f));
    if (!f)
        return -ENOMEM;
    f->cache = cache;
    f->repo = repo;
    f->local = !repo_has_url_chunks(repo);
    f->missing_is_final = repo_missing_is_final(repo);
    f->slots = f->local ? FETCH_SLOTS_LOCAL : FETCH_SLOTS_HTTP;
    double timeout = opts->timeout_seconds > 0 ? opts->timeout_seconds : FETCH_DEFAULT_TIMEOUT;
    f->timeout_ns = (uint64_t)(timeout * 1e9);
    pthread_mutex_init(&f->error_lock, NULL);
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->work_ready, NULL);
    cond_init_monotonic(&f->demand_idle);
    pthread_cond_init(&f->drained, NULL);
    f->multi = curl_multi_init();
    if (!f->multi) {
        fetcher_destroy(f);
        return -ENOMEM;
    }
    /* Connections are kept and reused; at most one per slot per mirror, and
     * streams share one connection where HTTP/2 offers it. */
    curl_multi_setopt(f->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)f->slots);
    curl_multi_setopt(f->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    *out = f;
    return 0;
}

/* Starts the threads on first use (engine lock held), not at creation: the
 * daemon forks into the background after setting up, and threads do not
 * cross a fork. */
static int start_threads_locked(struct fetcher *f)
{
    if (f->dispatcher_running)
        return 0;
    if (pthread_create(&f->dispatcher, NULL, dispatch_main, f) != 0)
        return -EAGAIN;
    f->dispatcher_running = true;
    for (int i = 0; i < FETCH_WORKERS; i++) {
        if (pthread_create(&f->workers[i], NULL, worker_main, f) != 0)
            break;
        f->worker_count++;
    }
    return f->worker_count > 0 ? 0 : -EAGAIN;
}

void fetcher_shutdown(struct fetcher *f)
{
    if (!f || f->shut_down)
        return;
    pthread_mutex_lock(&f->lock);
    f->stop = true;
    pthread_cond_broadcast(&f->work_ready);
    pthread_cond_broadcast(&f->demand_idle);
    pthread_mutex_unlock(&f->lock);
    wake_dispatcher(f);
    if (f->dispatcher_running)
        pthread_join(f->dispatcher, NULL);
    for (int i = 0; i < f->worker_count; i++)
        pthread_join(f->workers[i], NULL);
    f->dispatcher_running = false;
    f->worker_count = 0;
    /* Only this thread is left: every job still here fails. */
    struct waiter *fired = NULL;
    struct job *dead = NULL;
    pthread_mutex_lock(&f->lock);
    for (struct job *job = f->all; job; job = job->anext) {
        if (job->state == JOB_FAILED || job->state == JOB_DONE)
            continue;
        if (job->state == JOB_TRANSFER && job->easy)
            curl_multi_remove_handle(f->multi, job->easy);
        fail_job_locked(f, job, -EIO, &fired, &dead);
    }
    f->work_head = f->work_tail = NULL;
    pthread_mutex_unlock(&f->lock);
    complete_waiters(f, fired);
    finish_failed(f, dead);
    f->shut_down = true;
}

void fetcher_destroy(struct fetcher *f)
{
    if (!f)
        return;
    fetcher_shutdown(f);
    if (f->multi)
        curl_multi_cleanup(f->multi);
    pthread_mutex_destroy(&f->error_lock);
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->work_ready);
    pthread_cond_destroy(&f->demand_idle);
    pthread_cond_destroy(&f->drained);
    free(f);
}

void fetcher_get_totals(struct fetcher *f, struct fetch_totals *out)
{
    out->requests = atomic_load(&f->requests);
    out->bytes_transferred = atomic_load(&f->bytes_transferred);
    out->verify_failures = atomic_load(&f->verify_failures);
    out->errors = atomic_load(&f->errors);
    out->uncached = atomic_load(&f->uncached);
    pthread_mutex_lock(&f->lock);
    out->in_flight = (uint64_t)f->transfers;
    out->queued = f->jobs > (size_t)f->transfers ? f->jobs - (size_t)f->transfers : 0;
    pthread_mutex_unlock(&f->lock);
    pthread_mutex_lock(&f->error_lock);
    snprintf(out->last_error, sizeof(out->last_error), "%s", f->last_error);
    out->last_error_age = f->last_error_ns ? (double)(now_ns() - f->last_error_ns) / 1e9 : -1;
    pthread_mutex_unlock(&f->error_lock);
}
