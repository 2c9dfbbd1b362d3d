/* status: the mount's snapshot and the user.imgfs.* attributes (status.h). */
#include "status.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fs.h"
#include "trust.h"
#include "util.h"

/* ---- the mount's snapshot -------------------------------------------------------------- */

/* What the cache holds of one base version. */
struct residency {
    uint64_t stored; /* chunks that are not all-zero */
    uint64_t resident;
    uint64_t resident_bytes;
};

static void count_residency(struct imgfs *fs, const struct manifest *m, struct residency *r)
{
    memset(r, 0, sizeof(*r));
    for (uint64_t i = 0; i < m->chunk_count; i++) {
        if (chunk_hash_is_null(&m->chunks[i]))
            continue;
        r->stored++;
        if (cache_stores(fs->cache, &m->chunks[i])) {
            uint64_t start = i * m->chunk_size;
            r->resident++;
            r->resident_bytes += m->size - start < m->chunk_size ? m->size - start : m->chunk_size;
        }
    }
}

/* The version's count, walked again only when the cache changed since the
 * last one (generation: cache_generation() taken before this snapshot's
 * first walk, so that a change during a walk shows at the next read): on a
 * host with hundreds of versions a stats read costs what it prints, not
 * every chunk of every version. */
static void base_residency(struct imgfs *fs, struct base_version *v, uint64_t generation, struct residency *r)
{
    pthread_mutex_lock(&v->residency_lock);
    bool known = v->residency_known && v->residency_generation == generation;
    if (known)
        *r = (struct residency){v->stored_chunks, v->resident_chunks, v->resident_bytes};
    pthread_mutex_unlock(&v->residency_lock);
    if (known)
        return;
    count_residency(fs, v->manifest, r);
    pthread_mutex_lock(&v->residency_lock);
    v->residency_known = true;
    v->residency_generation = generation;
    v->stored_chunks = r->stored;
    v->resident_chunks = r->resident;
    v->resident_bytes = r->resident_bytes;
    pthread_mutex_unlock(&v->residency_lock);
}

/* Reads that found their chunk in the cache (or already on its way), as a
 * fraction of all reads of stored chunks; 0 before the first read. */
static double hit_rate(const struct fetch_counters *c)
{
    double hits = (double)atomic_load(&c->hits) + (double)atomic_load(&c->waits);
    double all = hits + (double)atomic_load(&c->misses);
    return all > 0 ? hits / all : 0;
}

static void add_base_version(struct status_snapshot *s, struct imgfs *fs, uint64_t generation, const struct node *n)
{
    const struct manifest *m = n->version->manifest;
    const struct fetch_counters *c = &n->version->counters;
    const struct prefetch_marks *pm = &n->version->marks;
    struct residency r;
    base_residency(fs, n->version, generation, &r);
    char title[96], version[24], id[CHUNK_HASH_HEX + 1];
    snprintf(title, sizeof(title), "%s@%" PRIu64, m->name, m->version);
    snprintf(version, sizeof(version), "%" PRIu64, m->version);
    chunk_hash_to_hex(&m->id, id);

    struct status_section *sec = status_add_section(s, "base", title);
    status_add_label(s, sec, "base", m->name);
    status_add_label(s, sec, "version", version);
    status_text(s, sec, STATUS_INFO, "file", "bases/%s", n->name);
    status_text(s, sec, STATUS_INFO, "manifest", "%s", id);
    status_gauge(s, sec, "size", "Virtual size of the base version in bytes.", (double)m->size, 0);
    status_gauge(s, sec, "chunk_size", "Chunk size of the base version in bytes.", m->chunk_size, 0);
    status_gauge(s, sec, "chunks_total", "Chunks of the base version, zero chunks included.", (double)m->chunk_count, 0);
    status_gauge(s, sec, "chunks_zero", "All-zero chunks, which are never stored.", (double)(m->chunk_count - r.stored), 0);
    status_text(s, sec, STATUS_VIEW, "chunks_resident", "%" PRIu64 "/%" PRIu64, r.resident, r.stored);
    status_gauge(s, sec, "stored_chunks", "Chunks of the version that are stored (not all-zero).", (double)r.stored, 0);
    status_gauge(s, sec, "resident_chunks", "Stored chunks of the version that the cache holds.", (double)r.resident, 0);
    status_gauge(s, sec, "resident_bytes", "Bytes of the version that the cache holds.", (double)r.resident_bytes, 0);
    status_counter(s, sec, "bytes_fetched", "Bytes brought into the cache by reads.", atomic_load(&c->bytes_fetched));
    status_counter(s, sec, "bytes_prefetched", "Bytes brought in by replay, pre-copy and background fill.",
                   atomic_load(&pm->bytes_prefetched));
    status_counter(s, sec, "cache_hits", "Chunk reads that found the chunk cached.", atomic_load(&c->hits));
    status_counter(s, sec, "cache_waits", "Chunk reads that waited for a fetch already under way.",
                   atomic_load(&c->waits));
    status_counter(s, sec, "cache_misses", "Chunk reads that fetched the chunk.", atomic_load(&c->misses));
    status_gauge(s, sec, "hit_rate", "Fraction of chunk reads that needed no fetch of their own.", hit_rate(c), 4);
    status_counter(s, sec, "verify_failures", "Fetched chunks that failed verification.",
                   atomic_load(&c->verify_failures));
    status_counter(s, sec, "read_errors", "Reads that failed (EIO).", atomic_load(&c->errors));
    status_text(s, sec, STATUS_VIEW, "prefetch_list", "%" PRIu64 "/%" PRIu64 "%s", (uint64_t)atomic_load(&pm->list_done),
                (uint64_t)atomic_load(&pm->list_total), atomic_load(&pm->replay_started) ? "" : " (not started)");
    status_text(s, sec, STATUS_TEXT, "prefetch_started", "%s", atomic_load(&pm->replay_started) ? "yes" : "no");
    status_gauge(s, sec, "prefetch_list_done", "Chunks of the prefetch list handled by replay.",
                 (double)atomic_load(&pm->list_done), 0);
    status_gauge(s, sec, "prefetch_list_total", "Chunks in the prefetch list being replayed.",
                 (double)atomic_load(&pm->list_total), 0);
    status_gauge(s, sec, "prefetch_guest_at", "1 + the furthest prefetch list position a guest read reached.",
                 (double)atomic_load(&pm->guest_pos), 0);
    status_counter(s, sec, "prefetch_hits", "Guest reads served by a chunk that replay brought.",
                   atomic_load(&pm->hits));
    status_counter(s, sec, "prefetch_misses", "Guest reads that fetched while a prefetch list was known.",
                   atomic_load(&pm->misses));
    status_counter(s, sec, "reads", "READ requests of the base file that the daemon served (not passthrough).",
                   atomic_load(&n->version->pt.reads));
    if (fs->passthrough) {
        static const char *const flat_names[] = {"none", "building", "unchecked", "checking", "ready"};
        status_text(s, sec, STATUS_TEXT, "flat_file", "%s", flat_names[passthrough_flat_state(fs->passthrough, n->version)]);
        pthread_mutex_lock(&n->version->pt.lock);
        uint32_t pt_opens = n->version->pt.pt_opens, normal_opens = n->version->pt.cached_opens;
        pthread_mutex_unlock(&n->version->pt.lock);
        status_gauge(s, sec, "passthrough_open", "Opens of the base file read by the kernel (FUSE passthrough).",
                     pt_opens, 0);
        status_gauge(s, sec, "normal_open", "Opens of the base file read through the daemon.", normal_opens, 0);
        status_counter(s, sec, "passthrough_opens", "Opens given to the kernel's passthrough since the server started.",
                       atomic_load(&n->version->pt.pt_total));
    }
}

static void add_passthrough(struct status_snapshot *s, struct imgfs *fs)
{
    if (!fs->passthrough)
        return;
    static const char *const states[] = {"off", "waiting", "unavailable", "active"};
    struct passthrough_status ps;
    passthrough_get_status(fs->passthrough, &ps);
    struct status_section *sec = status_add_section(s, "passthrough", NULL);
    status_text(s, sec, STATUS_INFO, "state", "%s", states[ps.state]);
    status_text(s, sec, STATUS_INFO, "kernel_offers", "%s", ps.kernel_offers ? "yes" : "no");
    status_text(s, sec, STATUS_INFO, "negotiated", "%s", ps.negotiated ? "yes" : "no");
    status_text(s, sec, STATUS_TEXT, "why_not", "%s", ps.why[0] ? ps.why : "none");
    status_gauge(s, sec, "open_files", "Base files open with FUSE passthrough.", ps.opens, 0);
    status_counter(s, sec, "opens", "Opens given to the kernel's passthrough.", ps.opens_total);
    status_gauge(s, sec, "flat_files", "Flat files of base versions in the cache.", (double)ps.flat.files, 0);
    status_gauge(s, sec, "flat_ready", "Flat files checked in this run, which opens may use.", (double)ps.flat.ready, 0);
    status_gauge(s, sec, "flat_bytes", "Bytes of flat files counted against the cache limit.", (double)ps.flat.bytes, 0);
    status_counter(s, sec, "flat_built", "Flat files built.", ps.flat.built);
    status_counter(s, sec, "flat_checked", "Flat files found at start that passed their check, read in full.",
                   ps.flat.checked);
    status_counter(s, sec, "flat_trusted",
                   "Flat files found at start as an earlier server of this mount checked them, not read again.",
                   ps.flat.trusted);
    status_counter(s, sec, "flat_rejected", "Flat files removed because they failed their check.", ps.flat.rejected);
    status_counter(s, sec, "flat_reclaimed", "Flat files removed to make room for chunks.", ps.flat.reclaimed);
}

struct version_walk {
    struct status_snapshot *s;
    struct imgfs *fs;
    uint64_t generation;
};

static int walk_version(void *ctx, const struct node *n)
{
    struct version_walk *w = ctx;
    if (n->kind == NODE_BASE_FILE)
        add_base_version(w->s, w->fs, w->generation, n);
    return 0;
}

static void add_vm(void *ctx, struct vm *vm)
{
    struct status_snapshot *s = ctx;
    struct vm_stats vs;
    vm_get_stats(vm, &vs);
    struct status_section *sec = status_add_section(s, "vm", vm_name(vm));
    status_add_label(s, sec, "vm", vm_name(vm));
    status_text(s, sec, STATUS_INFO, "file", "vms/%s.raw", vm_name(vm));
    if (vs.has_base)
        status_text(s, sec, STATUS_INFO, "base", "%s@%" PRIu64, vs.base_name, vs.base_version);
    else
        status_text(s, sec, STATUS_INFO, "base", "none");
    status_gauge(s, sec, "size", "Virtual size of the VM disk in bytes.", (double)vs.size, 0);
    status_gauge(s, sec, "layer_bytes", "Bytes the VM's layers hold on the state disk.", (double)vs.layer_bytes, 0);
    status_gauge(s, sec, "top_layer_blocks", "4 KiB blocks the VM's writable layer owns.",
                 (double)vs.top_owned_blocks, 0);
    status_gauge(s, sec, "top_layer_log_blocks", "4 KiB blocks of the writable layer's log: live, dead, records.",
                 (double)vs.top.log_blocks, 0);
    status_counter(s, sec, "top_layer_compactions", "Compactions of the writable layer's log since the mount.",
                   vs.top.compactions);
    status_gauge(s, sec, "top_layer_compact_seconds", "Duration of the writable layer's last compaction.",
                 (double)vs.top.compact_ns / 1e9, 3);
    status_gauge(s, sec, "top_layer_compact_pause_seconds", "Of which its writes were held.",
                 (double)vs.top.compact_pause_ns / 1e9, 4);
    status_gauge(s, sec, "top_layer_compact_flush_hold_seconds",
                 "Of which its flushes were held (its writes, then the sync and rename of the new log).",
                 (double)vs.top.compact_flush_hold_ns / 1e9, 4);
    status_counter(s, sec, "top_layer_through_blocks",
                   "4 KiB blocks of O_DIRECT guest writes that the writable layer wrote to its log with O_DIRECT.",
                   vs.top.through_blocks);
    status_gauge(s, sec, "layers", "Layers in the VM's chain.", vs.depth, 0);
    status_gauge(s, sec, "snapshots", "Snapshots of the VM.", vs.snapshots, 0);
    status_gauge(s, sec, "open", "Open file handles of the VM disk and its snapshots.", vs.open_count, 0);
}

static void add_last_error(struct status_snapshot *s, struct status_section *sec, const char *error, double age)
{
    if (age >= 0)
        status_text(s, sec, STATUS_TEXT, "last_error", "%s (%.0f s ago)", error, age);
    else
        status_text(s, sec, STATUS_TEXT, "last_error", "none");
    status_gauge(s, sec, "last_error_age_seconds", "Seconds since the last error, -1 when there was none.",
                 age >= 0 ? age : -1, 0);
}

int status_snapshot_take(struct imgfs *fs, struct status_snapshot *s)
{
    memset(s, 0, sizeof(*s));
    struct cache_usage usage;
    struct fetch_totals totals;
    cache_get_usage(fs->cache, &usage);
    fetcher_get_totals(fs->fetcher, &totals);
    char refresh_error[256];
    tree_refresh_error(fs->tree, refresh_error, sizeof(refresh_error));

    struct status_section *sec = status_add_section(s, "daemon", NULL);
    status_text(s, sec, STATUS_INFO, "version", "%s", IMGFS_VERSION);
    status_gauge(s, sec, "uptime_seconds", "Seconds since the mount.", now_seconds() - fs->started, 0);
    status_text(s, sec, STATUS_INFO, "repository", "%s", repo_location(fs->repo));
    status_text(s, sec, STATUS_INFO, "repository_kind", "%s", repo_kind(fs->repo));
    status_text(s, sec, STATUS_TEXT, "refresh_error", "%s", refresh_error[0] ? refresh_error : "none");
    if (fs->takeover) { /* the serving process and the ones before it (takeover.h) */
        const struct takeover *t = fs->takeover;
        status_gauge(s, sec, "pid", "Process id of the serving process.", (double)t->server_pid, 0);
        status_gauge(s, sec, "supervisor_pid", "Process id of the supervisor that holds the mount.",
                     (double)t->supervisor_pid, 0);
        status_gauge(s, sec, "started", "Unix time of the mount.", (double)t->started, 0);
        status_counter(s, sec, "takeovers", "Serving processes that took the mount over (crash or restart).",
                       atomic_load(&((struct takeover *)t)->takeovers));
        status_text(s, sec, STATUS_INFO, "resend", "%s", t->has_resend ? "yes" : "no");
    }

    sec = status_add_section(s, "cache", NULL);
    status_text(s, sec, STATUS_INFO, "directory", "%s", cache_dir(fs->cache));
    status_gauge(s, sec, "chunks", "Chunks in the cache.", (double)usage.chunks, 0);
    status_gauge(s, sec, "bytes", "Bytes in the cache.", (double)usage.bytes, 0);
    status_gauge(s, sec, "limit", "Cache size limit in bytes, 0 for none.", (double)usage.limit, 0);
    status_gauge(s, sec, "pinned_bytes", "Resident bytes that pre-copy pinned.", (double)usage.held_bytes, 0);
    status_counter(s, sec, "evictions", "Chunks evicted to stay under the limit.", usage.evictions);
    status_gauge(s, sec, "packs", "Pack files that hold the cached chunks.", (double)usage.packs, 0);
    status_gauge(s, sec, "open_files", "Open pack and index files.", (double)usage.open_fds, 0);
    status_counter(s, sec, "damaged_dropped", "Cached chunks dropped because they failed verification.",
                   usage.dropped_damaged);

    add_passthrough(s, fs);

    sec = status_add_section(s, "fetch", NULL);
    status_counter(s, sec, "requests", "Chunk requests to the repository.", totals.requests);
    status_counter(s, sec, "bytes_transferred", "Encoded bytes read from the repository.", totals.bytes_transferred);
    status_counter(s, sec, "verify_failures", "Fetched chunks that failed verification.", totals.verify_failures);
    status_counter(s, sec, "errors", "Failed chunk fetches.", totals.errors);
    status_counter(s, sec, "served_uncached", "Chunks served from memory because the cache was full.",
                   totals.uncached);
    status_gauge(s, sec, "in_flight", "Chunk transfers under way.", (double)totals.in_flight, 0);
    status_gauge(s, sec, "queued", "Chunk fetches waiting for a transfer slot or a retry.", (double)totals.queued, 0);
    add_last_error(s, sec, totals.last_error, totals.last_error_age);

    struct trust_status ts;
    trust_get_status(fs->trust, &ts);
    sec = status_add_section(s, "trust", NULL);
    status_text(s, sec, STATUS_INFO, "mode", "%s", trust_mode_name(ts.mode));
    if (ts.mode == TRUST_INSECURE)
        status_text(s, sec, STATUS_TEXT, "warning", "NOT VERIFIED: mounted with -o insecure");
    status_gauge(s, sec, "keys", "Public keys in the trust file.", (double)ts.keys, 0);
    status_gauge(s, sec, "index_sequence", "Sequence number of the newest accepted signed index.",
                 (double)ts.index_seq, 0);
    status_gauge(s, sec, "index_signed_at", "Signing time (Unix seconds) of the newest accepted index.",
                 (double)ts.index_time, 0);
    status_text(s, sec, STATUS_TEXT, "index_stale", "%s", ts.stale ? "yes" : "no");
    status_gauge(s, sec, "index_is_stale", "1 when the accepted index is older than max_index_age.", ts.stale, 0);
    status_counter(s, sec, "index_refusals", "Repository metadata refused (signature, rollback, digest chain).",
                   ts.index_refusals);
    status_gauge(s, sec, "chunk_digests", "Chunks with a signed digest known.", (double)ts.chunk_digests, 0);
    status_counter(s, sec, "chunks_refused", "Fetched chunks that failed their signed digest.", ts.chunks_refused);
    if (ts.last_refusal_age >= 0)
        status_text(s, sec, STATUS_TEXT, "last_refusal", "%s (%.0f s ago)", ts.last_refusal, ts.last_refusal_age);
    else
        status_text(s, sec, STATUS_TEXT, "last_refusal", "none");

    struct repo_mirror_stats mirrors[REPO_MAX_MIRRORS];
    size_t nmirrors = repo_mirror_stats(fs->repo, mirrors, REPO_MAX_MIRRORS);
    for (size_t i = 0; i < nmirrors; i++) {
        const struct repo_mirror_stats *m = &mirrors[i];
        char index[24];
        snprintf(index, sizeof(index), "%zu", i);
        sec = status_add_section(s, "mirror", index);
        status_add_label(s, sec, "mirror", m->url);
        status_text(s, sec, STATUS_INFO, "url", "%s", m->url);
        status_text(s, sec, STATUS_TEXT, "current", "%s", m->current ? "yes" : "no");
        status_gauge(s, sec, "is_current", "1 for the mirror that requests go to.", m->current, 0);
        status_counter(s, sec, "requests", "Requests sent to the mirror.", m->requests);
        status_counter(s, sec, "bytes", "Bytes received from the mirror.", m->bytes);
        status_counter(s, sec, "errors", "Failed requests to the mirror.", m->errors);
        status_counter(s, sec, "retries", "Requests that were a retry after another mirror failed.", m->retries);
        status_gauge(s, sec, "avg_latency_ms", "Average request latency in milliseconds.", m->avg_latency_ms, 1);
        add_last_error(s, sec, m->last_error, m->last_error_age);
    }

    char vm_errors[2048];
    vm_registry_errors(fs->vms, vm_errors, sizeof(vm_errors));
    sec = status_add_section(s, "vms", NULL);
    status_text(s, sec, STATUS_INFO, "state_directory", "%s", fs->opts->state_dir);
    status_text(s, sec, STATUS_TEXT, "load_errors", "%s", vm_errors[0] ? vm_errors : "none");
    status_gauge(s, sec, "zeroed_ahead_bytes", "Bytes that the VMs' layers hold zeroed ahead of their logs' tails.",
                 (double)layer_ahead_host_bytes(), 0);

    struct version_walk walk = {s, fs, cache_generation(fs->cache)};
    tree_for_each_child(fs->tree, INO_BASES, 0, walk_version, &walk);
    vm_registry_each(fs->vms, add_vm, s);
    if (s->failed) {
        status_snapshot_free(s);
        return -ENOMEM;
    }
    return 0;
}

int status_render_file(struct imgfs *fs, uint64_t ino, char **text, size_t *len)
{
    struct status_snapshot s;
    int rc = status_snapshot_take(fs, &s);
    if (rc)
        return rc;
    if (ino == INO_METRICS)
        rc = status_render_metrics(&s, text, len);
    else if (ino == INO_STATUS_JSON)
        rc = status_render_json(&s, text, len);
    else
        rc = status_render_stats(&s, text, len);
    status_snapshot_free(&s);
    return rc;
}

/* ---- extended attributes ------------------------------------------------------------
 *
 * Computed for the one node asked about, not from a whole snapshot: a
 * monitoring agent may read them of every file often. */

#define XATTR_PREFIX "user.imgfs."

struct xattrs {
    char *names; /* listing: NUL-terminated names, one after another */
    size_t len;
    bool failed; /* out of memory */
    const char *wanted; /* the one name asked for, or NULL to list */
    char *value;
    bool found;
};

/* True when name is listed or is the one asked for. */
static bool xattr_wants(const struct xattrs *x, const char *name)
{
    if (!x->wanted)
        return true;
    return !x->found && strncmp(x->wanted, XATTR_PREFIX, strlen(XATTR_PREFIX)) == 0 &&
           strcmp(x->wanted + strlen(XATTR_PREFIX), name) == 0;
}

static void xattr_put(struct xattrs *x, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void xattr_put(struct xattrs *x, const char *name, const char *fmt, ...)
{
    if (!xattr_wants(x, name))
        return;
    if (!x->wanted) {
        size_t n = strlen(XATTR_PREFIX) + strlen(name) + 1;
        char *grown = realloc(x->names, x->len + n);
        if (!grown) {
            x->failed = true;
            return;
        }
        x->names = grown;
        snprintf(x->names + x->len, n, XATTR_PREFIX "%s", name);
        x->len += n;
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&x->value, fmt, ap) < 0) {
        x->value = NULL;
        x->failed = true;
    }
    va_end(ap);
    x->found = true;
}

static void base_xattrs(struct imgfs *fs, struct xattrs *x, const struct vm_base *base)
{
    const struct manifest *m = base->manifest;
    char id[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(&m->id, id);
    xattr_put(x, "base", "%s@%" PRIu64, m->name, m->version);
    xattr_put(x, "manifest", "%s", id);
    /* Residency walks every chunk: only when it is the value asked for. */
    struct residency r = {0};
    if (x->wanted && xattr_wants(x, "resident_bytes"))
        count_residency(fs, m, &r);
    xattr_put(x, "resident_bytes", "%" PRIu64, r.resident_bytes);
    xattr_put(x, "hit_rate", "%.4f", hit_rate(base->counters));
    xattr_put(x, "fetch_errors", "%" PRIu64,
              (uint64_t)atomic_load(&base->counters->errors) + (uint64_t)atomic_load(&base->counters->verify_failures));
}

static void node_xattrs(struct imgfs *fs, const struct node *n, struct xattrs *x)
{
    switch (n->kind) {
    case NODE_BASE_FILE:
        base_xattrs(fs, x, &n->version->view);
        break;
    case NODE_VM_FILE:
    case NODE_VM_SNAPSHOT: {
        struct vm *vm = n->vm;
        if (n->kind == NODE_VM_FILE)
            xattr_put(x, "layer_bytes", "%" PRIu64, vm_layer_bytes(vm));
        xattr_put(x, "vm", "%s", vm_name(vm));
        if (vm_get_base(vm, NULL))
            base_xattrs(fs, x, vm_get_base(vm, NULL));
        else
            xattr_put(x, "base", "none");
        break;
    }
    case NODE_DIR:
        if (n->ino != INO_ROOT)
            break;
        struct fetch_totals totals;
        struct cache_usage usage;
        fetcher_get_totals(fs->fetcher, &totals);
        cache_get_usage(fs->cache, &usage);
        xattr_put(x, "version", "%s", IMGFS_VERSION);
        xattr_put(x, "repository", "%s", repo_location(fs->repo));
        xattr_put(x, "resident_bytes", "%" PRIu64, usage.bytes);
        xattr_put(x, "fetch_errors", "%" PRIu64, totals.errors + totals.verify_failures);
        xattr_put(x, "uptime", "%.0f", now_seconds() - fs->started);
        break;
    default:
        break;
    }
}

int status_xattr_list(struct imgfs *fs, const struct node *n, char **names, size_t *len)
{
    struct xattrs x = {0};
    node_xattrs(fs, n, &x);
    if (x.failed) {
        free(x.names);
        return -ENOMEM;
    }
    *names = x.names;
    *len = x.len;
    return 0;
}

int status_xattr_get(struct imgfs *fs, const struct node *n, const char *name, char **value, size_t *len)
{
    struct xattrs x = {.wanted = name};
    node_xattrs(fs, n, &x);
    if (x.failed) {
        free(x.value);
        return -ENOMEM;
    }
    if (!x.found)
        return -ENODATA;
    *value = x.value;
    *len = strlen(x.value);
    return 0;
}
