#include "repo.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <unistd.h>

#include "digests.h"
#include "disk.h"
#include "repo_publish.h"
#include "util.h"

#define MAX_IDLE_HANDLES 16

/* One HTTP mirror and its counters. The counters are atomics; last_error
 * and last_error_ns are guarded by the repo's stats_lock. */
struct mirror {
    char url[PATH_MAX]; /* as long as a location: the first mirror is the location */
    atomic_uint_fast64_t requests;
    atomic_uint_fast64_t bytes;
    atomic_uint_fast64_t errors;
    atomic_uint_fast64_t retries;
    atomic_uint_fast64_t latency_ns; /* total over successful requests */
    char last_error[160];
    uint64_t last_error_ns;
    atomic_uint_fast64_t down_until_ns; /* failed recently: not a failover target */
};

#define MIRROR_DOWN_NS (5ull * 1000000000ull)

/* A backend: how repository files are read, and what callers may expect of
 * it (see the capability queries in repo.h). One table per transport; a new
 * one (S3 with SigV4 through CURLOPT_AWS_SIGV4, say) adds a table and an
 * entry in backend_for(). */
struct repo_backend {
    const char *kind;
    bool cheap_reads;      /* reads never wait on a network */
    bool missing_is_final; /* a missing file does not appear by waiting */
    bool url_chunks;       /* chunks can be fetched by URL (repo_http_prepare) */
    int (*get)(struct repo *repo, const char *relpath, size_t max_len, uint64_t deadline_ns, char **data,
               size_t *len, int *mirror);
};

struct repo {
    const struct repo_backend *backend; /* always the first member */
    char location[PATH_MAX];
    bool local;
    struct repo_options opts;
    char meta_dir[PATH_MAX / 2]; /* local copies of index and manifests, "" for none */
    bool offline_fallback;
    char proxy[PATH_MAX / 2];
    char netrc_file[PATH_MAX / 2]; /* "" for none */
    /* The digest of the index last kept in meta_dir, so that an unchanged
     * index is not written (and fsync'd) again. Guarded by meta_lock. */
    pthread_mutex_t meta_lock;
    struct sign_digest kept_index;
    bool kept_index_valid;
    struct mirror mirrors[REPO_MAX_MIRRORS];
    int mirror_count;
    atomic_int current;               /* index of the mirror tried first */
    atomic_uint_fast64_t failover_ns; /* when current left mirror 0 */
    pthread_mutex_t stats_lock;
    /* Idle curl handles kept for connection reuse. Guarded by handles_lock. */
    pthread_mutex_t handles_lock;
    CURL *idle_handles[MAX_IDLE_HANDLES];
    int idle_count;
    struct trust *trust;                  /* not owned; NULL: nothing verified */
    struct repo_writer writer; /* the publisher's (repo_publish.c) */
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

const char *repo_location(const struct repo *repo) { return repo->location; }
bool repo_is_local(const struct repo *repo) { return repo->local; }
struct repo_writer *repo_writer(struct repo *repo) { return &repo->writer; }
int repo_mirror_count(const struct repo *repo) { return repo->local ? 1 : repo->mirror_count; }

void repo_chunk_relpath(const struct chunk_hash *hash, char *out, size_t len)
{
    char hex[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(hash, hex);
    snprintf(out, len, "chunks/%.2s/%s", hex, hex);
}

static int local_path(const struct repo *repo, const char *relpath, char *out, size_t len)
{
    return path_join(out, len, "%s/%s", repo->location, relpath);
}

/* ---- HTTP ---------------------------------------------------------------- */

struct http_body {
    char *data;
    size_t len;
    size_t cap;
    size_t max_len;
    bool too_big;
};

static size_t http_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct http_body *body = userdata;
    size_t n = size * nmemb;
    if (body->len + n > body->max_len) {
        body->too_big = true;
        return 0;
    }
    if (body->len + n + 1 > body->cap) {
        size_t cap = body->cap ? body->cap : 65536;
        while (cap < body->len + n + 1)
            cap *= 2;
        char *grown = realloc(body->data, cap);
        if (!grown)
            return 0;
        body->data = grown;
        body->cap = cap;
    }
    memcpy(body->data + body->len, ptr, n);
    body->len += n;
    return n;
}

static CURL *take_handle(struct repo *repo)
{
    CURL *h = NULL;
    pthread_mutex_lock(&repo->handles_lock);
    if (repo->idle_count > 0)
        h = repo->idle_handles[--repo->idle_count];
    pthread_mutex_unlock(&repo->handles_lock);
    return h ? h : curl_easy_init();
}

static void return_handle(struct repo *repo, CURL *h)
{
    pthread_mutex_lock(&repo->handles_lock);
    if (repo->idle_count < MAX_IDLE_HANDLES) {
        repo->idle_handles[repo->idle_count++] = h;
        h = NULL;
    }
    pthread_mutex_unlock(&repo->handles_lock);
    if (h)
        curl_easy_cleanup(h);
}

/* The last HTTP failure seen by this thread, for error messages. */
static __thread char thread_http_error[160];

static const char *describe_error(int rc)
{
    return rc != -ENOENT && thread_http_error[0] ? thread_http_error : strerror(-rc);
}

static void note_mirror_error(struct repo *repo, int i, const char *what)
{
    if (i == 0)
        snprintf(thread_http_error, sizeof(thread_http_error), "%s", what);
    else
        format_cut(thread_http_error, sizeof(thread_http_error), "%s (mirror %s)", what, repo->mirrors[i].url);
    atomic_fetch_add(&repo->mirrors[i].errors, 1);
    atomic_store(&repo->mirrors[i].down_until_ns, now_ns() + MIRROR_DOWN_NS);
    pthread_mutex_lock(&repo->stats_lock);
    snprintf(repo->mirrors[i].last_error, sizeof(repo->mirrors[i].last_error), "%s", what);
    repo->mirrors[i].last_error_ns = now_ns();
    pthread_mutex_unlock(&repo->stats_lock);
}

/* Makes the next mirror after i that has not failed recently current (if i
 * still is); when all have failed, simply the next one. */
static void fail_over(struct repo *repo, int i)
{
    int expected = i;
    int next = (i + 1) % repo->mirror_count;
    uint64_t now = now_ns();
    for (int k = 1; k < repo->mirror_count; k++) {
        int j = (i + k) % repo->mirror_count;
        if (atomic_load(&repo->mirrors[j].down_until_ns) <= now) {
            next = j;
            break;
        }
    }
    if (repo->mirror_count > 1 && atomic_compare_exchange_strong(&repo->current, &expected, next)) {
        if (i == 0)
            atomic_store(&repo->failover_ns, now_ns());
        log_warn("repository: switching from mirror %s to %s", repo->mirrors[i].url, repo->mirrors[next].url);
    }
}

void repo_report_bad(struct repo *repo, int mirror)
{
    if (repo->local || mirror < 0 || mirror >= repo->mirror_count)
        return;
    note_mirror_error(repo, mirror, "served a chunk that failed verification");
    fail_over(repo, mirror);
}

int repo_http_prepare(struct repo *repo, int mirror, const char *relpath, void *handle)
{
    char url[PATH_MAX + 64];
    int err = path_join(url, sizeof(url), "%s/%s", repo->mirrors[mirror].url, relpath);
    if (err)
        return err;
    CURL *h = handle;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)(repo->opts.connect_timeout * 1000));
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1024L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, (long)(repo->opts.stall_timeout + 0.5));
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(h, CURLOPT_MAXREDIRS, 5L);
    curl_easy_setopt(h, CURLOPT_PROXY, repo->proxy); /* "" disables any proxy from the environment */
    if (repo->netrc_file[0]) {
        curl_easy_setopt(h, CURLOPT_NETRC, (long)CURL_NETRC_REQUIRED);
        curl_easy_setopt(h, CURLOPT_NETRC_FILE, repo->netrc_file);
    }
    /* HTTP/2 where an https server offers it; keep-alive HTTP/1.1 otherwise. */
    curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    return 0;
}

void repo_note_request(struct repo *repo, int mirror, bool retry)
{
    atomic_fetch_add(&repo->mirrors[mirror].requests, 1);
    if (retry)
        atomic_fetch_add(&repo->mirrors[mirror].retries, 1);
}

void repo_note_success(struct repo *repo, int mirror, uint64_t bytes, uint64_t latency_ns)
{
    atomic_fetch_add(&repo->mirrors[mirror].bytes, bytes);
    atomic_fetch_add(&repo->mirrors[mirror].latency_ns, latency_ns);
}

void repo_note_failure(struct repo *repo, int mirror, const char *what)
{
    note_mirror_error(repo, mirror, what);
    fail_over(repo, mirror);
}

int repo_pick_mirror(struct repo *repo)
{
    if (repo->local)
        return 0;
    int start = atomic_load(&repo->current);
    if (start != 0 && now_ns() - atomic_load(&repo->failover_ns) > (uint64_t)(repo->opts.failback_seconds * 1e9)) {
        /* Time to give the preferred mirror another chance. */
        atomic_store(&repo->current, 0);
        start = 0;
    }
    return start;
}

int repo_next_mirror(const struct repo *repo, int mirror)
{
    return repo->local ? 0 : (mirror + 1) % repo->mirror_count;
}

/* One GET from one mirror. */
static int http_get_one(struct repo *repo, int i, const char *relpath, size_t max_len, uint64_t deadline_ns,
                        char **data, size_t *len)
{
    CURL *h = take_handle(repo);
    if (!h)
        return -ENOMEM;
    struct http_body body = {.max_len = max_len};
    curl_easy_reset(h);
    int err = repo_http_prepare(repo, i, relpath, h);
    if (err) {
        return_handle(repo, h);
        return err;
    }
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, http_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
    if (deadline_ns) {
        uint64_t now = now_ns();
        long ms = deadline_ns > now ? (long)((deadline_ns - now) / 1000000) : 1;
        curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, ms > 0 ? ms : 1L);
    }
    uint64_t started = now_ns();
    atomic_fetch_add(&repo->mirrors[i].requests, 1);
    CURLcode rc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    char what[160];
    if (rc == CURLE_OK && status == 200) {
        err = 0;
        repo_note_success(repo, i, body.len, now_ns() - started);
    } else if (rc == CURLE_OK && (status == 404 || status == 410)) {
        err = -ENOENT;
    } else {
        /* An error page may be longer than the file asked for: the status
         * is what it says. */
        if (status == 401 || status == 403)
            err = -EACCES, snprintf(what, sizeof(what), "access denied (HTTP status %ld)", status);
        else if (body.too_big)
            err = -EFBIG, snprintf(what, sizeof(what), "response larger than %zu bytes", max_len);
        else if (rc == CURLE_OK)
            err = -EIO, snprintf(what, sizeof(what), "HTTP status %ld", status);
        else
            err = rc == CURLE_OPERATION_TIMEDOUT ? -ETIMEDOUT : -EIO,
            snprintf(what, sizeof(what), "%s", curl_easy_strerror(rc));
        note_mirror_error(repo, i, what);
        log_debug("GET %s/%s failed: %s", repo->mirrors[i].url, relpath, what);
    }
    return_handle(repo, h);
    if (err) {
        free(body.data);
        return err;
    }
    if (!body.data && !(body.data = malloc(1)))
        return -ENOMEM;
    body.data[body.len] = '\0';
    *data = body.data;
    *len = body.len;
    return 0;
}

/* Tries each mirror once, starting with the current one. */
static int http_get(struct repo *repo, const char *relpath, size_t max_len, uint64_t deadline_ns, char **data,
                    size_t *len, int *mirror)
{
    int start = repo_pick_mirror(repo);
    int err = -EIO;
    bool all_missing = true;
    for (int k = 0; k < repo->mirror_count; k++) {
        int i = (start + k) % repo->mirror_count;
        if (k > 0)
            atomic_fetch_add(&repo->mirrors[i].retries, 1);
        err = http_get_one(repo, i, relpath, max_len, deadline_ns, data, len);
        if (err == 0) {
            if (mirror)
                *mirror = i;
            return 0;
        }
        if (err != -ENOENT) {
            all_missing = false;
            fail_over(repo, i);
        }
        if (err == -EFBIG || (deadline_ns && now_ns() >= deadline_ns))
            break;
    }
    return all_missing ? -ENOENT : err;
}

size_t repo_mirror_stats(struct repo *repo, struct repo_mirror_stats *out, size_t max)
{
    if (repo->local)
        return 0;
    size_t n = 0;
    int current = atomic_load(&repo->current);
    pthread_mutex_lock(&repo->stats_lock);
    for (int i = 0; i < repo->mirror_count && n < max; i++, n++) {
        struct mirror *m = &repo->mirrors[i];
        struct repo_mirror_stats *o = &out[n];
        format_cut(o->url, sizeof(o->url), "%s", m->url); /* for display */
        o->requests = atomic_load(&m->requests);
        o->bytes = atomic_load(&m->bytes);
        o->errors = atomic_load(&m->errors);
        o->retries = atomic_load(&m->retries);
        uint64_t ok = o->requests > o->errors ? o->requests - o->errors : 0;
        o->avg_latency_ms = ok ? (double)atomic_load(&m->latency_ns) / (double)ok / 1e6 : 0;
        o->current = i == current;
        snprintf(o->last_error, sizeof(o->last_error), "%s", m->last_error);
        o->last_error_age = m->last_error_ns ? (double)(now_ns() - m->last_error_ns) / 1e9 : -1;
    }
    pthread_mutex_unlock(&repo->stats_lock);
    return n;
}

/* ---- common -------------------------------------------------------------- */

static int local_get(struct repo *repo, const char *relpath, size_t max_len, uint64_t deadline_ns, char **data,
                     size_t *len, int *mirror)
{
    (void)deadline_ns, (void)mirror;
    char path[PATH_MAX];
    int err = local_path(repo, relpath, path, sizeof(path));
    return err ? err : read_file(path, max_len, data, len);
}

static const struct repo_backend local_backend = {
    .kind = "local", .cheap_reads = true, .missing_is_final = true, .url_chunks = false, .get = local_get};
static const struct repo_backend http_backend = {
    .kind = "http", .cheap_reads = false, .missing_is_final = false, .url_chunks = true, .get = http_get};

static const struct repo_backend *backend_for(const char *location)
{
    bool http = strncmp(location, "http://", 7) == 0 || strncmp(location, "https://", 8) == 0;
    return http ? &http_backend : &local_backend;
}

const char *repo_kind(const struct repo *repo) { return repo->backend->kind; }
bool repo_reads_are_cheap(const struct repo *repo) { return repo->backend->cheap_reads; }
bool repo_missing_is_final(const struct repo *repo) { return repo->backend->missing_is_final; }
bool repo_has_url_chunks(const struct repo *repo) { return repo->backend->url_chunks; }

int repo_get_from(struct repo *repo, const char *relpath, size_t max_len, uint64_t deadline_ns, char **data,
                  size_t *len, int *mirror)
{
    if (mirror)
        *mirror = -1;
    return repo->backend->get(repo, relpath, max_len, deadline_ns, data, len, mirror);
}

int repo_get(struct repo *repo, const char *relpath, size_t max_len, char **data, size_t *len)
{
    return repo_get_from(repo, relpath, max_len, 0, data, len, NULL);
}

static void strip_slashes(char *url)
{
    /* Trailing slashes would double up in joined paths. */
    size_t n = strlen(url);
    while (n > 1 && url[n - 1] == '/')
        url[--n] = '\0';
}

static struct repo *repo_alloc(const char *location, bool local, const struct repo_options *opts)
{
    struct repo *repo = calloc(1, sizeof(*repo));
    if (!repo)
        return NULL;
    snprintf(repo->location, sizeof(repo->location), "%s", location);
    strip_slashes(repo->location);
    repo->local = local;
    repo->backend = backend_for(location);
    repo_writer_init(&repo->writer);
    if (opts)
        repo->opts = *opts;
    if (repo->opts.connect_timeout <= 0)
        repo->opts.connect_timeout = 5;
    if (repo->opts.stall_timeout <= 0)
        repo->opts.stall_timeout = 10;
    if (repo->opts.failback_seconds <= 0)
        repo->opts.failback_seconds = 60;
    snprintf(repo->proxy, sizeof(repo->proxy), "%s", repo->opts.proxy ? repo->opts.proxy : "");
    snprintf(repo->netrc_file, sizeof(repo->netrc_file), "%s", repo->opts.netrc_file ? repo->opts.netrc_file : "");
    repo->opts.proxy = repo->opts.netrc_file = NULL; /* the caller's strings are not kept */
    snprintf(repo->mirrors[0].url, sizeof(repo->mirrors[0].url), "%s", repo->location);
    repo->mirror_count = 1;
    for (int i = 0; opts && i < opts->mirror_count && repo->mirror_count < REPO_MAX_MIRRORS; i++) {
        struct mirror *m = &repo->mirrors[repo->mirror_count++];
        snprintf(m->url, sizeof(m->url), "%s", opts->mirrors[i]);
        strip_slashes(m->url);
        repo->opts.mirrors[i] = NULL;
    }
    pthread_mutex_init(&repo->handles_lock, NULL);
    pthread_mutex_init(&repo->stats_lock, NULL);
    pthread_mutex_init(&repo->meta_lock, NULL);
    return repo;
}

void repo_close(struct repo *repo)
{
    if (!repo)
        return;
    repo_writer_release(repo);
    for (int i = 0; i < repo->idle_count; i++)
        curl_easy_cleanup(repo->idle_handles[i]);
    pthread_mutex_destroy(&repo->handles_lock);
    pthread_mutex_destroy(&repo->stats_lock);
    pthread_mutex_destroy(&repo->meta_lock);
    free(repo);
}

static int check_marker(struct repo *repo, char *err, size_t errlen)
{
    char *data;
    size_t len;
    int rc = repo_get(repo, "imgfs-repo", 64, &data, &len);
    if (rc == -ENOENT || rc == -EFBIG || rc == -EINVAL) {
        snprintf(err, errlen, "%s is not an imgfs repository (no imgfs-repo marker file)", repo->location);
        return -ENOENT;
    }
    if (rc == -EACCES) {
        snprintf(err, errlen, "repository %s: %s; give its user name and password with -o credentials=FILE",
                 repo->location, describe_error(rc));
        return rc;
    }
    if (rc) {
        snprintf(err, errlen, "cannot reach repository %s: %s", repo->location, describe_error(rc));
        return rc;
    }
    bool ok = len == strlen(REPO_MARKER_TEXT) && memcmp(data, REPO_MARKER_TEXT, len) == 0;
    free(data);
    if (!ok) {
        snprintf(err, errlen, "%s has an unsupported or damaged imgfs-repo marker", repo->location);
        return -EBADMSG;
    }
    return 0;
}

int repo_open(const char *location, struct repo **out, char *err, size_t errlen)
{
    return repo_open_with(location, NULL, out, err, errlen);
}

int repo_open_with(const char *location, const struct repo_options *opts, struct repo **out, char *err,
                   size_t errlen)
{
    bool http = strncmp(location, "http://", 7) == 0 || strncmp(location, "https://", 8) == 0;
    if (strlen(location) >= PATH_MAX - 80) {
        snprintf(err, errlen, "repository location is too long");
        return -ENAMETOOLONG;
    }
    if (http) {
        pthread_once(&curl_once, curl_init_once);
    } else {
        struct stat st;
        if (stat(location, &st) < 0) {
            snprintf(err, errlen, "repository %s does not exist", location);
            return -ENOENT;
        }
        if (!S_ISDIR(st.st_mode)) {
            snprintf(err, errlen, "repository %s is not a directory", location);
            return -ENOTDIR;
        }
    }
    for (int i = 0; opts && i < opts->mirror_count; i++) {
        if (strncmp(opts->mirrors[i], "http://", 7) != 0 && strncmp(opts->mirrors[i], "https://", 8) != 0) {
            snprintf(err, errlen, "mirror %s is not an http(s) URL", opts->mirrors[i]);
            return -EINVAL;
        }
        if (!http) {
            snprintf(err, errlen, "mirrors need an http(s) repository, not a directory");
            return -EINVAL;
        }
    }
    struct repo *repo = repo_alloc(location, !http, opts);
    if (!repo) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    int rc = check_marker(repo, err, errlen);
    if (rc && http && opts && opts->offline && rc != -ENOENT && rc != -EBADMSG) {
        log_warn("%s; continuing offline with what is cached", err);
        rc = 0;
    }
    if (rc) {
        repo_close(repo);
        return rc;
    }
    *out = repo;
    return 0;
}

/* ---- index and manifests ------------------------------------------------- */

void repo_set_trust(struct repo *repo, struct trust *trust) { repo->trust = trust; }

static bool verifying(const struct repo *repo) { return repo->trust && trust_mode(repo->trust) == TRUST_SIGNED; }

void repo_index_free(struct repo_index *index)
{
    free(index->entries);
    index->entries = NULL;
    index->count = 0;
}

const struct repo_index_entry *repo_index_find(const struct repo_index *index, const char *name)
{
    for (size_t i = 0; i < index->count; i++)
        if (strcmp(index->entries[i].name, name) == 0)
            return &index->entries[i];
    return NULL;
}

/* "+KEY N" with N at most max, at most once. */
static int signed_field(const char *line, const char *key, uint64_t max, uint64_t *out, bool *seen)
{
    size_t k = strlen(key);
    if (strncmp(line, key, k) != 0 || line[k] != ' ')
        return 1; /* not this field */
    if (*seen || parse_u64(line + k + 1, out) < 0 || *out > max)
        return -1;
    *seen = true;
    return 0;
}

/* Parses the part of an index before its signature lines (see repo.h). */
int repo_index_parse(const char *data, size_t len, struct repo_index *out)
{
    unsigned sigs;
    size_t body = sign_body_len(data, len, &sigs);
    if (body < strlen(REPO_INDEX_HEADER) || memcmp(data, REPO_INDEX_HEADER, strlen(REPO_INDEX_HEADER)) != 0 ||
        data[body - 1] != '\n' || memchr(data, '\0', body))
        return -EBADMSG;
    size_t lines = 0;
    for (size_t i = 0; i < body; i++)
        lines += data[i] == '\n';
    struct repo_index index = {calloc(lines, sizeof(*index.entries)), 0, sigs > 0, 0, 0};
    if (!index.entries)
        return -ENOMEM;
    bool seen_seq = false, seen_time = false;
    const char *p = data + strlen(REPO_INDEX_HEADER);
    const char *end = data + body;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        char line[192];
        size_t n = (size_t)(nl - p);
        if (n >= sizeof(line))
            goto bad;
        memcpy(line, p, n);
        line[n] = '\0';
        p = nl + 1;
        if (line[0] == '+') {
            int a = signed_field(line, "+seq", REPO_MAX_SEQ, &index.seq, &seen_seq);
            int b = a == 1 ? signed_field(line, "+time", UINT32_MAX * 256ull, &index.signed_time, &seen_time) : 0;
            if (a < 0 || b != 0)
                goto bad;
            continue;
        }
        char name[80], latest[24], record[SIGN_DIGEST_HEX + 2];
        int fields = sscanf(line, "%79s %23s %65s", name, latest, record);
        struct repo_index_entry *e = &index.entries[index.count];
        if (fields < 2 || !name_is_valid(name) || parse_u64(latest, &e->latest) < 0 || e->latest == 0 ||
            e->latest > REPO_MAX_VERSION || repo_index_find(&index, name))
            goto bad;
        if (fields == 3 && sign_digest_from_hex(record, &e->record) < 0)
            goto bad;
        e->has_record = fields == 3;
        memcpy(e->name, name, strlen(name) + 1); /* name_is_valid() bounds it to 64 */
        index.count++;
    }
    *out = index;
    return 0;
bad:
    repo_index_free(&index);
    return -EBADMSG;
}

void repo_set_meta_cache(struct repo *repo, const char *dir, bool offline_fallback)
{
    snprintf(repo->meta_dir, sizeof(repo->meta_dir), "%s", dir);
    repo->offline_fallback = offline_fallback;
}

/* Keeps a copy of a repository file in the metadata cache (best effort). */
static void save_meta(struct repo *repo, const char *name, const char *data, size_t len)
{
    char path[PATH_MAX];
    if (repo->meta_dir[0] && path_join(path, sizeof(path), "%s/%s", repo->meta_dir, name) == 0 &&
        write_file_atomic(path, data, len) != 0)
        log_warn("cannot keep a copy of %s in %s", name, repo->meta_dir);
}

static int load_meta(struct repo *repo, const char *name, size_t max_len, char **data, size_t *len)
{
    char path[PATH_MAX];
    if (!repo->meta_dir[0] || path_join(path, sizeof(path), "%s/%s", repo->meta_dir, name) != 0)
        return -ENOENT;
    return read_file(path, max_len, data, len);
}

/* Parses an index and, when verifying, checks its signature and that it is
 * not older than the accepted one, and hands its chains to trust. */
static int accept_index(struct repo *repo, const char *data, size_t len, struct repo_index *out, char *err,
                        size_t errlen)
{
    int rc = repo_index_parse(data, len, out);
    if (rc) {
        snprintf(err, errlen, "the index of repository %s is malformed", repo->location);
        return rc;
    }
    if (!verifying(repo))
        return 0;
    char why[256];
    size_t body;
    rc = sign_verify(trust_keyring(repo->trust), data, len, &body, why, sizeof(why));
    for (size_t i = 0; !rc && i < out->count; i++)
        if (!out->entries[i].has_record)
            rc = -EBADMSG, snprintf(why, sizeof(why), "base %s has no signed digest", out->entries[i].name);
    if (!rc && out->seq == 0)
        rc = -EBADMSG, snprintf(why, sizeof(why), "it has no sequence number");
    if (!rc) {
        struct sign_digest digest;
        sign_digest_compute(data, body, &digest);
        rc = trust_accept_index(repo->trust, out->seq, out->signed_time, &digest, why, sizeof(why));
    }
    if (rc) {
        repo_index_free(out);
        snprintf(err, errlen, "the index of repository %s is refused: %s", repo->location, why);
        return rc;
    }
    for (size_t i = 0; i < out->count; i++)
        trust_set_top(repo->trust, out->entries[i].name, out->entries[i].latest, &out->entries[i].record);
    return 0;
}

int repo_read_index(struct repo *repo, struct repo_index *out, char *err, size_t errlen)
{
    char *data;
    size_t len;
    int rc = repo_get(repo, "index", REPO_MAX_INDEX_LEN, &data, &len);
    if (rc && repo->offline_fallback && load_meta(repo, "index", REPO_MAX_INDEX_LEN, &data, &len) == 0) {
        log_warn("repository %s unreachable (%s); using the index kept from the last contact", repo->location,
                 describe_error(rc));
        rc = accept_index(repo, data, len, out, err, errlen);
        free(data);
        return rc;
    }
    if (rc) {
        snprintf(err, errlen, "cannot read the index of repository %s: %s", repo->location,
                 rc == -ENOENT ? "it is missing" : describe_error(rc));
        return rc;
    }
    rc = accept_index(repo, data, len, out, err, errlen);
    if (rc == 0 && repo->meta_dir[0]) {
        struct sign_digest digest;
        sign_digest_compute(data, len, &digest);
        pthread_mutex_lock(&repo->meta_lock);
        bool changed = !repo->kept_index_valid || !sign_digest_equal(&digest, &repo->kept_index);
        repo->kept_index = digest;
        repo->kept_index_valid = true;
        pthread_mutex_unlock(&repo->meta_lock);
        if (changed)
            save_meta(repo, "index", data, len);
    }
    free(data);
    if (rc == 0)
        return 0;
    /* Refused, or malformed where the daemon must not give up (a takeover
     * server, -o offline): keep serving the newest accepted state, which is
     * the kept copy. */
    if (verifying(repo))
        trust_note_refusal(repo->trust, err);
    else if (!repo->offline_fallback)
        return rc;
    char why[PATH_MAX + 256];
    if (load_meta(repo, "index", REPO_MAX_INDEX_LEN, &data, &len) == 0) {
        int kept = accept_index(repo, data, len, out, why, sizeof(why));
        free(data);
        if (kept == 0) {
            if (!verifying(repo))
                log_warn("%s; using the index kept from the last contact", err);
            return 0;
        }
    }
    return rc;
}

/* Reads a repository file that has a kept copy named copy in the metadata
 * cache: the copy first when it passes check(), else the repository's. The
 * repository's is kept when it passes. */
static int read_checked(struct repo *repo, const char *rel, const char *copy, size_t max_len,
                        int (*check)(void *ctx, const char *data, size_t len, char *err, size_t errlen), void *ctx,
                        char **data, size_t *len, char *err, size_t errlen)
{
    if (load_meta(repo, copy, max_len, data, len) == 0) {
        if (check(ctx, *data, *len, err, errlen) == 0)
            return 0;
        free(*data);
        *data = NULL;
    }
    int rc = repo_get(repo, rel, max_len, data, len);
    if (rc) {
        snprintf(err, errlen, "%s", rc == -ENOENT ? "it does not exist" : describe_error(rc));
        return rc;
    }
    rc = check(ctx, *data, *len, err, errlen);
    if (rc) {
        free(*data);
        *data = NULL;
        return rc;
    }
    save_meta(repo, copy, *data, *len);
    return 0;
}

struct record_check {
    const char *name;
    uint64_t version;
    struct sign_digest want;
    struct version_digests *parsed;
};

static int check_record(void *ctx, const char *data, size_t len, char *err, size_t errlen)
{
    struct record_check *c = ctx;
    struct sign_digest got;
    sign_digest_compute(data, len, &got);
    if (!sign_digest_equal(&got, &c->want)) {
        snprintf(err, errlen, "its digests record does not match the signed chain (altered or from another state)");
        return -EBADMSG;
    }
    char why[160];
    if (digests_parse(data, len, &c->parsed, why, sizeof(why)) != 0) {
        snprintf(err, errlen, "%s", why);
        return -EBADMSG;
    }
    if (strcmp(c->parsed->name, c->name) != 0 || c->parsed->version != c->version) {
        digests_free(c->parsed);
        c->parsed = NULL;
        snprintf(err, errlen, "its digests record names another version");
        return -EBADMSG;
    }
    return 0;
}

/* Reads and verifies the record of name@version against the chain, walking
 * down from the newest known link when needed. */
static int read_record(struct repo *repo, const char *name, uint64_t version, struct version_digests **out,
                       char *err, size_t errlen)
{
    for (;;) {
        struct record_check c = {.name = name, .version = version};
        uint64_t low = 0;
        bool direct = trust_expected(repo->trust, name, version, &c.want) == 0;
        if (!direct) {
            if (trust_lowest_known(repo->trust, name, &low) < 0 || low <= version) {
                snprintf(err, errlen, "it is not in the signed index");
                return -ENOENT;
            }
            c.version = low;
            trust_expected(repo->trust, name, low, &c.want);
        }
        char rel[160], copy[160];
        char *data;
        size_t len;
        snprintf(copy, sizeof(copy), "%s@%" PRIu64 ".digests", name, c.version);
        int rc = digests_relpath(name, c.version, rel, sizeof(rel));
        if (!rc)
            rc = read_checked(repo, rel, copy, REPO_MAX_DIGESTS_LEN, check_record, &c, &data, &len, err, errlen);
        if (rc)
            return rc;
        free(data);
        if (direct) {
            rc = c.parsed->has_previous
                     ? trust_learn_previous(repo->trust, name, version, &c.parsed->previous, err, errlen)
                     : 0;
            if (rc) {
                digests_free(c.parsed);
                return rc;
            }
            *out = c.parsed;
            return 0;
        }
        rc = c.parsed->has_previous ? trust_learn_previous(repo->trust, name, low, &c.parsed->previous, err, errlen)
                                    : -ENOENT;
        digests_free(c.parsed);
        if (rc == -ENOENT)
            snprintf(err, errlen, "its digests chain ends early");
        if (rc)
            return rc;
    }
}

struct manifest_check {
    const char *name;
    uint64_t version;
    const struct version_digests *record; /* NULL when not verifying */
    struct manifest *parsed;
};

static int check_manifest(void *ctx, const char *data, size_t len, char *err, size_t errlen)
{
    struct manifest_check *c = ctx;
    char why[200];
    if (manifest_parse(data, len, &c->parsed, why, sizeof(why)) != 0) {
        snprintf(err, errlen, "it is malformed: %s", why);
        return -EBADMSG;
    }
    int rc = 0;
    if (strcmp(c->parsed->name, c->name) != 0 || c->parsed->version != c->version)
        rc = -EBADMSG, snprintf(err, errlen, "it names another version");
    else if (c->record)
        rc = digests_check(c->record, c->parsed, data, len, err, errlen);
    if (rc) {
        manifest_free(c->parsed);
        c->parsed = NULL;
    }
    return rc;
}

int repo_read_manifest(struct repo *repo, const char *name, uint64_t version, struct manifest **out,
                       char *err, size_t errlen)
{
    char rel[160], copy[160];
    if (!name_is_valid(name)) {
        snprintf(err, errlen, "invalid base name");
        return -EINVAL;
    }
    snprintf(rel, sizeof(rel), "bases/%s/%" PRIu64 ".manifest", name, version);
    snprintf(copy, sizeof(copy), "%s@%" PRIu64 ".manifest", name, version);
    char why[256];
    struct version_digests *record = NULL;
    int rc = verifying(repo) ? read_record(repo, name, version, &record, why, sizeof(why)) : 0;
    struct manifest_check c = {name, version, record, NULL};
    char *data = NULL;
    size_t len;
    /* Versions never change, so a kept copy that passes is as good as the
     * original, and works while the repository is unreachable. */
    if (!rc)
        rc = read_checked(repo, rel, copy, REPO_MAX_MANIFEST_LEN, check_manifest, &c, &data, &len, why, sizeof(why));
    free(data);
    if (!rc && record)
        rc = trust_add_chunks(repo->trust, c.parsed, record, why, sizeof(why));
    digests_free(record);
    if (rc) {
        manifest_free(c.parsed);
        snprintf(err, errlen, "%s manifest %s@%" PRIu64 ": %s", rc == -EBADMSG ? "refused" : "cannot read", name,
                 version, why);
        if (rc == -EBADMSG && verifying(repo))
            trust_note_refusal(repo->trust, err);
        return rc;
    }
    *out = c.parsed;
    return 0;
}

int repo_read_list(struct repo *repo, const struct manifest *m, const char *list_name, struct chunk_list **out,
                   char *err, size_t errlen)
{
    char rel[256], why[256];
    int rc = list_relpath(m->name, m->version, list_name, rel, sizeof(rel));
    if (rc) {
        snprintf(err, errlen, "invalid list name");
        return rc;
    }
    char *text;
    size_t len, body;
    rc = repo_get(repo, rel, REPO_MAX_LIST_LEN, &text, &len);
    if (rc) {
        snprintf(err, errlen, "cannot read list %s of %s@%" PRIu64 ": %s", list_name, m->name, m->version,
                 rc == -ENOENT ? "it does not exist" : describe_error(rc));
        return rc;
    }
    if (verifying(repo))
        rc = sign_verify(trust_keyring(repo->trust), text, len, &body, why, sizeof(why));
    else
        body = sign_body_len(text, len, NULL);
    if (!rc)
        rc = list_parse(text, body, out, why, sizeof(why));
    free(text);
    if (!rc && (rc = list_check(*out, m, why, sizeof(why))) != 0) {
        list_free(*out);
        *out = NULL;
    }
    if (rc) {
        snprintf(err, errlen, "list %s of %s@%" PRIu64 " is refused: %s", list_name, m->name, m->version, why);
        if (verifying(repo))
            trust_note_refusal(repo->trust, err);
        return rc == -ENOENT ? -EBADMSG : rc;
    }
    return 0;
}

int repo_decode_chunk(struct repo *repo, const struct chunk_hash *hash, const void *enc, size_t enc_len, void *out,
                      size_t chunk_size, const char **why)
{
    const char *unused;
    why = why ? why : &unused;
    *why = "is malformed";
    int rc = chunkfmt_unpack(enc, enc_len, out, chunk_size);
    return rc ? rc : repo_check_chunk(repo, hash, out, chunk_size, why);
}

int repo_check_chunk(struct repo *repo, const struct chunk_hash *hash, const void *data, size_t chunk_size,
                     const char **why)
{
    const char *unused;
    why = why ? why : &unused;
    if (trust_checks_chunks(repo->trust)) {
        *why = "failed verification against its signed digest";
        return trust_check_chunk(repo->trust, hash, data, chunk_size);
    }
    *why = "failed verification against its hash";
    struct chunk_hash got;
    chunk_hash_compute(data, chunk_size, &got);
    return chunk_hash_equal(&got, hash) ? 0 : -EBADMSG;
}

int repo_get_chunk(struct repo *repo, const struct chunk_hash *hash, uint32_t chunk_size, uint64_t deadline_ns,
                   char **enc, size_t *len, int *mirror)
{
    char rel[64];
    repo_chunk_relpath(hash, rel, sizeof(rel));
    /* A stored chunk never exceeds its raw size plus the header (chunkfmt
     * stores raw when compression does not pay). */
    return repo_get_from(repo, rel, (size_t)chunk_size + CHUNKFMT_MAX_OVERHEAD, deadline_ns, enc, len, mirror);
}

int repo_retired_relpath(const char *name, uint64_t version, char *out, size_t len)
{
    return path_join(out, len, "bases/%s/%" PRIu64 ".retired", name, version);
}

bool repo_version_retired(struct repo *repo, const char *name, uint64_t version)
{
    char rel[128], *data;
    size_t len;
    if (repo_retired_relpath(name, version, rel, sizeof(rel)) != 0 || repo_get(repo, rel, 4096, &data, &len) != 0)
        return false;
    free(data);
    return true;
}

struct repo_source {
    struct repo *repo;
    char *chunk; /* chunk_size bytes */
};

/* The base source of imgfsctl and extmap: every chunk fetched from the
 * repository and verified, no cache. */
static int repo_source_read(void *ctx, const struct vm_base *base, uint64_t index, void *buf, size_t len,
                            uint64_t chunk_off)
{
    struct repo_source *src = ctx;
    const struct manifest *m = base->manifest;
    char *enc = NULL;
    size_t enc_len = 0;
    int rc = repo_get_chunk(src->repo, &m->chunks[index], m->chunk_size, 0, &enc, &enc_len, NULL);
    if (!rc)
        rc = repo_decode_chunk(src->repo, &m->chunks[index], enc, enc_len, src->chunk, m->chunk_size, NULL);
    free(enc);
    if (!rc)
        memcpy(buf, src->chunk + chunk_off, len);
    return rc;
}

int repo_read_range(struct repo *repo, const struct manifest *m, void *buf, size_t len, uint64_t off)
{
    if (off > m->size || len > m->size - off)
        return -EINVAL;
    struct repo_source rs = {repo, malloc(m->chunk_size)};
    if (!rs.chunk)
        return -ENOMEM;
    struct vm_base base = {.manifest = m};
    struct disk base_only = {.size = m->size, .base = &base};
    struct base_source src = {repo_source_read, &rs};
    int rc = disk_read(&base_only, &src, buf, len, off);
    free(rs.chunk);
    return rc;
}
