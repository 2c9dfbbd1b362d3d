#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fs.h"
#include "util.h"

/* A growable text buffer for rendering status files. */
struct text {
    char *data;
    size_t len;
    size_t cap;
    bool failed;
};

static void text_printf(struct text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void text_printf(struct text *t, const char *fmt, ...)
{
    if (t->failed)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->data ? t->data + t->len : NULL, t->data ? t->cap - t->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            t->failed = true;
            return;
        }
        if (t->data && t->len + (size_t)n < t->cap) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap ? t->cap * 2 : 4096;
        while (cap < t->len + (size_t)n + 1)
            cap *= 2;
        char *grown = realloc(t->data, cap);
        if (!grown) {
            t->failed = true;
            return;
        }
        t->data = grown;
        t->cap = cap;
    }
}

struct version_walk {
    struct imgfs *fs;
    struct text *out;
};

static int render_version(void *ctx, const struct node *n)
{
    struct version_walk *w = ctx;
    if (n->kind != NODE_BASE_FILE)
        return 0;
    const struct manifest *m = n->version->manifest;
    const struct fetch_counters *c = &n->version->counters;
    uint64_t stored = 0, resident = 0;
    for (uint64_t i = 0; i < m->chunk_count; i++) {
        if (chunk_hash_is_null(&m->chunks[i]))
            continue;
        stored++;
        resident += cache_contains(w->fs->cache, &m->chunks[i]);
    }
    char id[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(&m->id, id);
    text_printf(w->out,
                "\n[base %s@%" PRIu64 "]\n"
                "file              bases/%s\n"
                "manifest          %s\n"
                "size              %" PRIu64 "\n"
                "chunk_size        %" PRIu32 "\n"
                "chunks_total      %" PRIu64 "\n"
                "chunks_zero       %" PRIu64 "\n"
                "chunks_resident   %" PRIu64 "/%" PRIu64 "\n"
                "bytes_fetched     %" PRIu64 "\n"
                "bytes_prefetched  %" PRIu64 "\n"
                "cache_hits        %" PRIu64 "\n"
                "cache_waits       %" PRIu64 "\n"
                "cache_misses      %" PRIu64 "\n"
                "verify_failures   %" PRIu64 "\n"
                "read_errors       %" PRIu64 "\n"
                "prefetch_list     %" PRIu64 "/%" PRIu64 "%s\n"
                "prefetch_guest_at %" PRIu64 "\n"
                "prefetch_hits     %" PRIu64 "\n"
                "prefetch_misses   %" PRIu64 "\n",
                m->name, m->version, n->name, id, m->size, m->chunk_size, m->chunk_count,
                m->chunk_count - stored, resident, stored, (uint64_t)atomic_load(&c->bytes_fetched),
                (uint64_t)atomic_load(&n->version->marks.bytes_prefetched),
                (uint64_t)atomic_load(&c->hits), (uint64_t)atomic_load(&c->waits), (uint64_t)atomic_load(&c->misses),
                (uint64_t)atomic_load(&c->verify_failures), (uint64_t)atomic_load(&c->errors),
                (uint64_t)atomic_load(&n->version->marks.list_done), (uint64_t)atomic_load(&n->version->marks.list_total),
                atomic_load(&n->version->marks.replay_started) ? "" : " (not started)",
                (uint64_t)atomic_load(&n->version->marks.guest_pos),
                (uint64_t)atomic_load(&n->version->marks.hits), (uint64_t)atomic_load(&n->version->marks.misses));
    return 0;
}

static void render_vm(void *ctx, struct vm *vm)
{
    struct text *t = ctx;
    text_printf(t, "\n[vm %s]\nfile              vms/%s.raw\nsize              %" PRIu64 "\n", vm->name, vm->name,
                vm->live.size);
    if (vm->has_base)
        text_printf(t, "base              %s@%" PRIu64 "\n", vm->base_name, vm->base_version);
    else
        text_printf(t, "base              none\n");
    pthread_mutex_lock(&vm->attr_lock);
    unsigned open_count = vm->open_count;
    pthread_mutex_unlock(&vm->attr_lock);
    pthread_rwlock_rdlock(&vm->chain_lock);
    unsigned depth = vm->live.depth, snapshots = vm->snapshot_count;
    uint64_t owned = atomic_load(&vm->live.layers[depth - 1]->owned_blocks);
    pthread_rwlock_unlock(&vm->chain_lock);
    text_printf(t,
                "layer_bytes       %" PRIu64 "\n"
                "top_layer_blocks  %" PRIu64 "\n"
                "layers            %u\n"
                "snapshots         %u\n"
                "open              %u\n",
                vm_layer_bytes(vm), owned, depth, snapshots, open_count);
}

int status_render_stats(struct imgfs *fs, char **out, size_t *len)
{
    struct text t = {0};
    struct cache_usage usage;
    struct fetch_totals totals;
    cache_get_usage(fs->cache, &usage);
    fetcher_get_totals(fs->fetcher, &totals);
    char refresh_error[256];
    tree_refresh_error(fs->tree, refresh_error, sizeof(refresh_error));

    text_printf(&t,
                "# imgfs %s status; sizes in bytes\n"
                "[daemon]\n"
                "uptime_seconds    %.0f\n"
                "repository        %s\n"
                "repository_kind   %s\n"
                "refresh_error     %s\n"
                "\n[cache]\n"
                "directory         %s\n"
                "chunks            %" PRIu64 "\n"
                "bytes             %" PRIu64 "\n"
                "limit             %" PRIu64 "\n"
                "pinned_bytes      %" PRIu64 "\n"
                "evictions         %" PRIu64 "\n"
                "open_files        %" PRIu64 "\n"
                "damaged_dropped   %" PRIu64 "\n"
                "\n[fetch]\n"
                "requests          %" PRIu64 "\n"
                "bytes_transferred %" PRIu64 "\n"
                "verify_failures   %" PRIu64 "\n"
                "errors            %" PRIu64 "\n"
                "served_uncached   %" PRIu64 "\n"
                "in_flight         %" PRIu64 "\n"
                "queued            %" PRIu64 "\n",
                IMGFS_VERSION, now_seconds() - fs->started, repo_location(fs->repo),
                repo_is_local(fs->repo) ? "local" : "http", refresh_error[0] ? refresh_error : "none",
                cache_dir(fs->cache), usage.chunks, usage.bytes, usage.limit, usage.held_bytes, usage.evictions, usage.open_fds,
                usage.dropped_damaged,
                totals.requests, totals.bytes_transferred, totals.verify_failures, totals.errors, totals.uncached,
                totals.in_flight, totals.queued);
    if (totals.last_error_age >= 0)
        text_printf(&t, "last_error        %s (%.0f s ago)\n", totals.last_error, totals.last_error_age);
    else
        text_printf(&t, "last_error        none\n");

    struct repo_mirror_stats mirrors[REPO_MAX_MIRRORS];
    size_t nmirrors = repo_mirror_stats(fs->repo, mirrors, REPO_MAX_MIRRORS);
    for (size_t i = 0; i < nmirrors; i++) {
        const struct repo_mirror_stats *m = &mirrors[i];
        text_printf(&t,
                    "\n[mirror %zu]\n"
                    "url               %s\n"
                    "current           %s\n"
                    "requests          %" PRIu64 "\n"
                    "bytes             %" PRIu64 "\n"
                    "errors            %" PRIu64 "\n"
                    "retries           %" PRIu64 "\n"
                    "avg_latency_ms    %.1f\n",
                    i, m->url, m->current ? "yes" : "no", m->requests, m->bytes, m->errors, m->retries,
                    m->avg_latency_ms);
        if (m->last_error_age >= 0)
            text_printf(&t, "last_error        %s (%.0f s ago)\n", m->last_error, m->last_error_age);
        else
            text_printf(&t, "last_error        none\n");
    }

    char vm_errors[2048];
    vm_registry_errors(fs->vms, vm_errors, sizeof(vm_errors));
    text_printf(&t, "\n[vms]\nstate_directory   %s\nload_errors       %s\n", fs->opts->state_dir,
                vm_errors[0] ? vm_errors : "none");

    struct version_walk walk = {fs, &t};
    tree_for_each_child(fs->tree, INO_BASES, 0, render_version, &walk);
    vm_registry_each(fs->vms, render_vm, &t);
    if (t.failed) {
        free(t.data);
        return -ENOMEM;
    }
    *out = t.data;
    *len = t.len;
    return 0;
}
