#include "prefetch.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "repo.h"
#include "util.h"

#define REPLAY_WORKERS 2

struct job {
    char key[160];                /* pin set name, "" for a replay */
    /* A replay loads its list in its first worker, so that opening a VM
     * never waits for the repository. load_lock guards loaded, indices and
     * count until loaded is set; they are read-only afterwards. */
    pthread_mutex_t load_lock;
    pthread_cond_t load_done;
    bool loaded;
    struct repo *repo;
    char list_name[65];
    const struct manifest *m;     /* owned by the tree, outlives the job */
    uint64_t *indices;            /* owned */
    uint64_t count;
    uint64_t rate;                /* bytes/s, 0 = unlimited */
    uint64_t ahead_chunks;        /* replay: bound on the lead over the guest, 0 = none */
    struct prefetch_marks *marks; /* replay only */
    atomic_uint_fast64_t *account; /* where fetched bytes are added up, or NULL */
    atomic_uint_fast64_t next;    /* next position to hand out */
    atomic_uint_fast64_t done;
    atomic_uint_fast64_t bytes;
    atomic_bool stop;
    atomic_bool failed;
    uint64_t started_ns;
    int workers;
    pthread_t threads[REPLAY_WORKERS];
    atomic_int running; /* workers not finished yet */
    /* error is guarded by the prefetcher's lock. */
    char error[160];
    struct job *next_job;
};

struct prefetcher {
    struct cache *cache;
    struct fetcher *fetcher;
    char pin_dir[PATH_MAX - 200];
    pthread_mutex_t lock; /* guards jobs and every job's error */
    struct job *jobs;
};

static void sleep_until(uint64_t when_ns)
{
    uint64_t now = now_ns();
    if (when_ns <= now)
        return;
    struct timespec ts = {(time_t)((when_ns - now) / 1000000000ull), (long)((when_ns - now) % 1000000000ull)};
    nanosleep(&ts, NULL);
}

static void *job_worker(void *arg);

static struct job *find_job_locked(struct prefetcher *pf, const char *key)
{
    for (struct job *j = pf->jobs; j; j = j->next_job)
        if (j->key[0] && strcmp(j->key, key) == 0)
            return j;
    return NULL;
}

/* Fetches, parses and checks a replay's list (first worker only). */
static void load_list(struct prefetcher *pf, struct job *j)
{
    char err[512] = "";
    struct chunk_list *list = NULL;
    int rc = repo_read_list(j->repo, j->m, j->list_name, &list, err, sizeof(err));
    if (!rc) {
        free(j->indices);
        j->indices = list->chunks;
        j->count = list->count;
        list->chunks = NULL;
        for (uint64_t pos = j->count; pos-- > 0;) /* the first occurrence wins */
            atomic_store(&j->marks->list_pos[j->indices[pos]], (uint32_t)(pos + 1));
        atomic_store(&j->marks->list_total, j->count);
        log_info("replaying prefetch list %s of %s@%" PRIu64 " (%" PRIu64 " chunks)", j->list_name, j->m->name,
                 j->m->version, j->count);
    } else if (rc != -ENOENT) {
        log_warn("prefetch list %s of %s@%" PRIu64 " not used: %s", j->list_name, j->m->name, j->m->version,
                 err[0] ? err : strerror(-rc));
        pthread_mutex_lock(&pf->lock);
        format_cut(j->error, sizeof(j->error), "%s", err[0] ? err : strerror(-rc));
        pthread_mutex_unlock(&pf->lock);
    }
    list_free(list);
}

/* Replay: waits until list position pos is within the allowed lead over
 * the guest (or the job is stopped). */
static void wait_for_guest(struct job *j, uint64_t pos)
{
    if (!j->marks || !j->ahead_chunks)
        return;
    while (!atomic_load(&j->stop) && pos >= atomic_load(&j->marks->guest_pos) + j->ahead_chunks)
        sleep_until(now_ns() + 5 * 1000 * 1000);
}

static void *job_worker_main(struct prefetcher *pf, struct job *j)
{
    const struct manifest *m = j->m;
    pthread_mutex_lock(&j->load_lock);
    if (!j->loaded && j->repo)
        load_list(pf, j);
    j->loaded = true;
    pthread_cond_broadcast(&j->load_done);
    pthread_mutex_unlock(&j->load_lock);
    for (;;) {
        if (atomic_load(&j->stop))
            break;
        uint64_t pos = atomic_fetch_add(&j->next, 1);
        if (pos >= j->count)
            break;
        uint64_t index = j->indices[pos];
        const struct chunk_hash *hash = &m->chunks[index];
        if (!chunk_hash_is_null(hash) && !cache_contains(pf->cache, hash)) {
            struct fetch_ref ref;
            wait_for_guest(j, pos);
            fetch_yield_to_demand(pf->fetcher, &j->stop);
            if (atomic_load(&j->stop))
                break;
            /* Marked before the fetch, so that a guest read that waits for
             * this transfer still counts as served by the prefetch. */
            if (j->marks)
                atomic_store(&j->marks->brought[index], 1);
            enum fetch_class cls = j->marks ? FETCH_REPLAY : FETCH_BACKGROUND;
            if (fetch_get(pf->fetcher, hash, m->chunk_size, cls, NULL, &ref) != 0) {
                atomic_store(&j->failed, true);
                pthread_mutex_lock(&pf->lock);
                snprintf(j->error, sizeof(j->error), "chunk %" PRIu64 " of %s@%" PRIu64 " could not be fetched",
                         index, m->name, m->version);
                pthread_mutex_unlock(&pf->lock);
            } else {
                bool hit = ref.hit;
                fetch_ref_release(pf->fetcher, &ref);
                if (hit && j->marks) /* somebody else brought it */
                    atomic_store(&j->marks->brought[index], 0);
                if (!hit) {
                    uint64_t bytes = atomic_fetch_add(&j->bytes, m->chunk_size) + m->chunk_size;
                    if (j->account)
                        atomic_fetch_add(j->account, m->chunk_size);
                    if (j->rate) /* pace to the rate since the job started */
                        sleep_until(j->started_ns + (uint64_t)((double)bytes / (double)j->rate * 1e9));
                }
            }
        }
        atomic_fetch_add(&j->done, 1);
        if (j->marks)
            atomic_fetch_add(&j->marks->list_done, 1);
    }
    atomic_fetch_sub(&j->running, 1);
    return NULL;
}

struct worker_arg {
    struct prefetcher *pf;
    struct job *job;
};

static void *job_worker(void *arg)
{
    struct worker_arg a = *(struct worker_arg *)arg;
    free(arg);
    return job_worker_main(a.pf, a.job);
}

/* Starts a job's workers and links it in; takes ownership of j. */
static int start_job(struct prefetcher *pf, struct job *j)
{
    j->started_ns = now_ns();
    pthread_mutex_lock(&pf->lock);
    j->next_job = pf->jobs;
    pf->jobs = j;
    for (int i = 0; i < j->workers; i++) {
        struct worker_arg *a = malloc(sizeof(*a));
        if (!a)
            break;
        *a = (struct worker_arg){pf, j};
        atomic_fetch_add(&j->running, 1);
        if (pthread_create(&j->threads[i], NULL, job_worker, a) != 0) {
            atomic_fetch_sub(&j->running, 1);
            free(a);
            j->workers = i;
            break;
        }
    }
    pthread_mutex_unlock(&pf->lock);
    return j->workers > 0 ? 0 : -EAGAIN;
}

static void free_job(struct job *j)
{
    pthread_mutex_destroy(&j->load_lock);
    pthread_cond_destroy(&j->load_done);
    free(j->indices);
    free(j);
}

static struct job *new_job(const struct manifest *m, const struct chunk_list *list, int workers)
{
    struct job *j = calloc(1, sizeof(*j));
    uint64_t count = list ? list->count : m->chunk_count;
    if (!j || !(j->indices = malloc((count ? count : 1) * sizeof(*j->indices)))) {
        free(j);
        return NULL;
    }
    for (uint64_t i = 0; i < count; i++)
        j->indices[i] = list ? list->chunks[i] : i;
    j->count = count;
    j->m = m;
    j->workers = workers;
    pthread_mutex_init(&j->load_lock, NULL);
    pthread_cond_init(&j->load_done, NULL);
    return j;
}

int prefetcher_create(struct cache *cache, struct fetcher *fetcher, const char *pin_dir, struct prefetcher **out)
{
    struct prefetcher *pf = calloc(1, sizeof(*pf));
    if (!pf)
        return -ENOMEM;
    pf->cache = cache;
    pf->fetcher = fetcher;
    snprintf(pf->pin_dir, sizeof(pf->pin_dir), "%s", pin_dir);
    pthread_mutex_init(&pf->lock, NULL);
    int rc = mkdir_p(pin_dir);
    if (rc) {
        free(pf);
        return rc;
    }
    *out = pf;
    return 0;
}

void prefetcher_destroy(struct prefetcher *pf)
{
    if (!pf)
        return;
    for (struct job *j = pf->jobs; j; j = j->next_job)
        atomic_store(&j->stop, true);
    struct job *j = pf->jobs;
    while (j) {
        struct job *next = j->next_job;
        for (int i = 0; i < j->workers; i++)
            pthread_join(j->threads[i], NULL);
        free_job(j);
        j = next;
    }
    pthread_mutex_destroy(&pf->lock);
    free(pf);
}

int prefetch_replay(struct prefetcher *pf, struct repo *repo, const struct manifest *m, const char *list_name,
                    uint64_t ahead, struct prefetch_marks *marks)
{
    bool expected = false;
    if (!atomic_compare_exchange_strong(&marks->replay_started, &expected, true))
        return 0; /* one replay per version and mount */
    struct chunk_list none = {0};
    struct job *j = new_job(m, &none, REPLAY_WORKERS);
    size_t slots = m->chunk_count ? m->chunk_count : 1;
    _Atomic uint8_t *brought = calloc(slots, sizeof(*brought));
    _Atomic uint32_t *list_pos = calloc(slots, sizeof(*list_pos));
    if (!j || !brought || !list_pos) {
        free(brought);
        free(list_pos);
        if (j)
            free_job(j);
        return -ENOMEM;
    }
    marks->brought = brought;
    marks->list_pos = list_pos;
    j->ahead_chunks = ahead ? (ahead + m->chunk_size - 1) / m->chunk_size : 0;
    atomic_store(&marks->replay_active, true); /* readers may use brought from here on */
    j->marks = marks;
    j->account = &marks->bytes_prefetched;
    j->repo = repo;
    snprintf(j->list_name, sizeof(j->list_name), "%s", list_name);
    return start_job(pf, j);
}

int prefetch_background(struct prefetcher *pf, const struct manifest *m, uint64_t rate, struct prefetch_marks *marks)
{
    bool expected = false;
    if (!atomic_compare_exchange_strong(&marks->background_started, &expected, true))
        return 0;
    struct job *j = new_job(m, NULL, 1);
    if (!j)
        return -ENOMEM;
    j->rate = rate;
    j->loaded = true;
    j->account = &marks->bytes_prefetched;
    log_info("background fill of %s@%" PRIu64 " at %" PRIu64 " bytes/s", m->name, m->version, rate);
    return start_job(pf, j);
}

void prefetch_readahead(struct fetcher *f, const struct manifest *m, struct prefetch_stream *stream,
                        struct fetch_counters *counters, uint64_t first, uint64_t last)
{
    uint64_t window = PREFETCH_READAHEAD / m->chunk_size ? PREFETCH_READAHEAD / m->chunk_size : 1;
    uint64_t length = last + 1 - first;
    /* Move the head (1 + the furthest chunk read in order) past this read.
     * The FUSE threads hand over a sequential reader's requests in parallel,
     * so neighbours arrive swapped: a read that starts at most its own
     * length past the head, or behind it by at most a window (at least the
     * head's own chunk, read again in pieces when chunks are large), is
     * part of the run (one behind adds nothing to it); anything else starts
     * a new run here. */
    uint64_t head = atomic_load(&stream->seq_next);
    for (;;) {
        bool in_run = head != 0 && (first > head ? first - head <= length : head - first <= window);
        if (!in_run) {
            atomic_store(&stream->seq_next, last + 1);
            atomic_store(&stream->seq_run, 0); /* not the continuation of the read before */
            return;
        }
        if (last + 1 <= head)
            return;
        if (atomic_compare_exchange_weak(&stream->seq_next, &head, last + 1))
            break;
    }
    /* Only a reader that has gone a whole window in order gets readahead:
     * scattered and short reads (a boot) fetch exactly what they read. A
     * read past a gap counts nothing: a swapped neighbour fills the gap
     * later, but a reader that reads one chunk in two never does, and it
     * must not look sequential. */
    uint64_t in_order = first == head ? length : 0;
    if (atomic_fetch_add(&stream->seq_run, in_order) + in_order < window)
        return;
    uint64_t stop = last + 1 + window < m->chunk_count ? last + 1 + window : m->chunk_count;
    /* Only the caller that moves ahead_until asks for the chunks. */
    uint64_t seen = atomic_load(&stream->ahead_until), from;
    do {
        from = seen < last + 1 || seen > stop + window ? last + 1 : seen; /* else a new run */
        if (from >= stop)
            return;
    } while (!atomic_compare_exchange_weak(&stream->ahead_until, &seen, stop));
    for (uint64_t i = from; i < stop; i++)
        if (!chunk_hash_is_null(&m->chunks[i]))
            fetch_ahead(f, &m->chunks[i], m->chunk_size, counters);
}

void prefetch_note_read(struct prefetch_marks *marks, uint64_t index, bool was_hit)
{
    if (!atomic_load(&marks->replay_active))
        return;
    uint64_t reached = atomic_load(&marks->list_pos[index]);
    uint64_t seen = atomic_load(&marks->guest_pos);
    while (reached > seen && !atomic_compare_exchange_weak(&marks->guest_pos, &seen, reached))
        ;
    if (!was_hit)
        atomic_fetch_add(&marks->misses, 1);
    else if (atomic_exchange(&marks->brought[index], 0))
        atomic_fetch_add(&marks->hits, 1);
}

/* ---- pre-copy pin sets ----------------------------------------------------- */

/* Pin set names look like NAME@V or NAME@V+LIST. */
static bool key_is_valid(const char *key)
{
    size_t n = strlen(key);
    return n > 0 && n < 150 && key[0] != '.' && key[0] != '-' &&
           strspn(key, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-@+") == n;
}

static int pin_path(struct prefetcher *pf, const char *key, char *out, size_t len)
{
    if (!key_is_valid(key))
        return -EINVAL;
    return path_join(out, len, "%s/%s", pf->pin_dir, key);
}

/* Holds or releases every hash listed in a pin file's text. */
static void hold_text(struct prefetcher *pf, const char *text, bool hold)
{
    for (const char *p = text; *p;) {
        struct chunk_hash hash;
        if (strlen(p) >= CHUNK_HASH_HEX && chunk_hash_from_hex(p, &hash) == 0)
            cache_hold(pf->cache, &hash, hold);
        const char *nl = strchr(p, '\n');
        if (!nl)
            break;
        p = nl + 1;
    }
}

int prefetch_precopy(struct prefetcher *pf, const char *key, const struct manifest *m,
                     const struct chunk_list *list, uint64_t rate, struct prefetch_marks *marks, char *err,
                     size_t errlen)
{
    char path[PATH_MAX];
    if (pin_path(pf, key, path, sizeof(path)) != 0) {
        snprintf(err, errlen, "bad pin name %s", key);
        return -EINVAL;
    }
    pthread_mutex_lock(&pf->lock);
    struct job *running = find_job_locked(pf, key);
    bool busy = running && atomic_load(&running->running) > 0;
    pthread_mutex_unlock(&pf->lock);
    if (busy)
        return 0; /* already running: the caller just follows it */
    struct job *j = new_job(m, list, 1);
    if (!j) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    j->loaded = true;
    j->rate = rate;
    j->account = &marks->bytes_prefetched;
    snprintf(j->key, sizeof(j->key), "%s", key);
    /* The pin set is written first, so nothing fetched can be evicted and
     * an interrupted pre-copy is still pinned when it is resumed. */
    size_t cap = (size_t)j->count * (CHUNK_HASH_HEX + 1) + 1, pos = 0;
    char *text = malloc(cap);
    if (!text) {
        free_job(j);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    for (uint64_t i = 0; i < j->count; i++) {
        const struct chunk_hash *h = &m->chunks[j->indices[i]];
        if (chunk_hash_is_null(h))
            continue;
        chunk_hash_to_hex(h, text + pos);
        pos += CHUNK_HASH_HEX;
        text[pos++] = '\n';
    }
    text[pos] = '\0';
    char *old = NULL;
    size_t old_len;
    bool had_old = read_file(path, 1u << 30, &old, &old_len) == 0;
    int rc = write_file_atomic(path, text, pos);
    if (rc) {
        snprintf(err, errlen, "cannot write pin set %s: %s", path, strerror(-rc));
        free(text);
        free(old);
        free_job(j);
        return rc;
    }
    hold_text(pf, text, true);
    if (had_old)
        hold_text(pf, old, false); /* a re-run replaces the earlier hold */
    free(old);
    free(text);
    pthread_mutex_lock(&pf->lock);
    /* Forget a finished job of the same key; its threads have exited. */
    for (struct job **p = &pf->jobs; *p; p = &(*p)->next_job) {
        if ((*p)->key[0] && strcmp((*p)->key, key) == 0) {
            struct job *dead = *p;
            *p = dead->next_job;
            for (int i = 0; i < dead->workers; i++)
                pthread_join(dead->threads[i], NULL);
            free_job(dead);
            break;
        }
    }
    pthread_mutex_unlock(&pf->lock);
    rc = start_job(pf, j);
    if (rc)
        snprintf(err, errlen, "cannot start the pre-copy: %s", strerror(-rc));
    return rc;
}

int prefetch_status(struct prefetcher *pf, const char *key, struct job_status *out)
{
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&pf->lock);
    struct job *j = find_job_locked(pf, key);
    if (j) {
        out->done = atomic_load(&j->done);
        out->total = j->count;
        out->bytes_fetched = atomic_load(&j->bytes);
        snprintf(out->error, sizeof(out->error), "%s", j->error);
        bool finished = atomic_load(&j->running) == 0;
        snprintf(out->state, sizeof(out->state), "%s",
                 !finished ? "running" : atomic_load(&j->failed) ? "failed" : atomic_load(&j->stop) ? "stopped" : "done");
    }
    pthread_mutex_unlock(&pf->lock);
    return j ? 0 : -ENOENT;
}

int prefetch_stop(struct prefetcher *pf, const char *key)
{
    pthread_mutex_lock(&pf->lock);
    struct job *j = find_job_locked(pf, key);
    if (j)
        atomic_store(&j->stop, true);
    pthread_mutex_unlock(&pf->lock);
    return j ? 0 : -ENOENT;
}

int prefetch_unpin(struct prefetcher *pf, const char *key)
{
    char path[PATH_MAX];
    if (pin_path(pf, key, path, sizeof(path)) != 0)
        return -EINVAL;
    pthread_mutex_lock(&pf->lock);
    struct job *j = find_job_locked(pf, key);
    if (j)
        atomic_store(&j->stop, true);
    pthread_mutex_unlock(&pf->lock);
    char *text;
    size_t len;
    int rc = read_file(path, 1u << 30, &text, &len);
    if (rc)
        return rc;
    rc = unlink(path) < 0 ? -errno : 0;
    if (!rc) {
        fsync_dir(pf->pin_dir);
        hold_text(pf, text, false);
    }
    free(text);
    return rc;
}

int prefetch_load_pins(struct prefetcher *pf)
{
    DIR *d = opendir(pf->pin_dir);
    if (!d)
        return -errno;
    struct dirent *de;
    while ((de = readdir(d))) {
        char path[PATH_MAX];
        if (strstr(de->d_name, ".tmp.") || pin_path(pf, de->d_name, path, sizeof(path)) != 0)
            continue;
        char *text;
        size_t len;
        if (read_file(path, 1u << 30, &text, &len) == 0) {
            hold_text(pf, text, true);
            free(text);
        }
    }
    closedir(d);
    return 0;
}

/* ---- traces ------------------------------------------------------------------ */

struct chunk_trace *trace_new(uint64_t chunk_count)
{
    struct chunk_trace *t = calloc(1, sizeof(*t));
    if (!t || !(t->seen = calloc(chunk_count ? chunk_count : 1, 1))) {
        free(t);
        return NULL;
    }
    t->chunk_count = chunk_count;
    pthread_mutex_init(&t->lock, NULL);
    return t;
}

void trace_note(struct chunk_trace *t, uint64_t index)
{
    pthread_mutex_lock(&t->lock);
    if (index < t->chunk_count && !t->seen[index]) {
        if (t->count == t->cap) {
            uint64_t cap = t->cap ? t->cap * 2 : 1024;
            uint64_t *grown = realloc(t->order, cap * sizeof(*grown));
            if (!grown) {
                pthread_mutex_unlock(&t->lock);
                return;
            }
            t->order = grown;
            t->cap = cap;
        }
        t->seen[index] = 1;
        t->order[t->count++] = index;
    }
    pthread_mutex_unlock(&t->lock);
}

void trace_free(struct chunk_trace *t)
{
    if (!t)
        return;
    pthread_mutex_destroy(&t->lock);
    free(t->seen);
    free(t->order);
    free(t);
}

int trace_finish(struct chunk_trace *t, const struct manifest *m, struct chunk_list **out)
{
    struct chunk_list *list = calloc(1, sizeof(*list));
    if (!list) {
        trace_free(t);
        return -ENOMEM;
    }
    snprintf(list->base_name, sizeof(list->base_name), "%s", m->name);
    list->base_version = m->version;
    list->base_id = m->id;
    list->chunk_size = m->chunk_size;
    list->chunks = t->order;
    list->count = t->count;
    t->order = NULL;
    trace_free(t);
    *out = list;
    return 0;
}
