#include "passthrough.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "serve.h"
#include "tree.h"
#include "util.h"

struct passthrough {
    bool wanted;
    struct cache *cache;
    struct tree *tree;
    struct takeover *t;
    int fuse_fd;
    struct flat_store *flat; /* NULL unless wanted */
    atomic_int state;        /* enum passthrough_state */
    atomic_uint opens;
    atomic_uint_fast64_t opens_total;
    pthread_mutex_t lock; /* guards why, stop, started and init_done; wake waits on it */
    pthread_cond_t wake;
    char why[200];
    bool stop, started;
    bool init_done; /* op_init has run: t->passthrough is final */
    pthread_t thread;
};

void passthrough_version_init(struct passthrough_version *pv)
{
    memset(pv, 0, sizeof(*pv));
    pthread_mutex_init(&pv->lock, NULL);
}

void passthrough_version_destroy(struct passthrough_version *pv) { pthread_mutex_destroy(&pv->lock); }

int passthrough_create(bool wanted, struct cache *cache, struct tree *tree, struct takeover *t, int fuse_fd,
                       struct passthrough **out, char *err, size_t errlen)
{
    struct passthrough *pt = calloc(1, sizeof(*pt));
    if (!pt) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pt->wanted = wanted;
    pt->cache = cache;
    pt->tree = tree;
    pt->t = t;
    pt->fuse_fd = fuse_fd;
    atomic_init(&pt->state, wanted ? PASSTHROUGH_WAITING : PASSTHROUGH_OFF);
    pthread_mutex_init(&pt->lock, NULL);
    cond_init_monotonic(&pt->wake);
    if (wanted) {
        /* The supervisor's /dev/shm directory lives as long as the mount:
         * what an earlier server of it checked is recorded there. */
        int rc = flat_open(cache, t ? t->layer_dir : NULL, &pt->flat, err, errlen);
        if (rc) {
            passthrough_destroy(pt);
            return rc;
        }
    }
    *out = pt;
    return 0;
}

static void set_why(struct passthrough *pt, const char *why)
{
    pthread_mutex_lock(&pt->lock);
    snprintf(pt->why, sizeof(pt->why), "%s", why);
    pthread_mutex_unlock(&pt->lock);
}

void passthrough_negotiate(struct passthrough *pt, bool writeback)
{
    struct takeover *t = pt->t;
    t->passthrough = 0;
    if (!pt->wanted)
        return;
    const char *off = getenv(PASSTHROUGH_DISABLE_ENV);
    if (off && strcmp(off, "0") != 0)
        set_why(pt, PASSTHROUGH_DISABLE_ENV " is set");
    else if (!takeover_init_has_passthrough(t->init, t->init_len))
        set_why(pt, "the kernel does not offer FUSE passthrough (it needs Linux 6.9 or later built with "
                    "CONFIG_FUSE_PASSTHROUGH)");
    else if (writeback)
        set_why(pt, "the kernel refuses it together with the writeback cache of vm_cache=writeback");
    else {
        serve_amend_init_passthrough();
        t->passthrough = 1;
    }
}

void passthrough_init_done(struct passthrough *pt)
{
    pthread_mutex_lock(&pt->lock);
    pt->init_done = true;
    pthread_cond_broadcast(&pt->wake);
    pthread_mutex_unlock(&pt->lock);
}

/* Whether backing files can be registered: the kernel granted INIT's ask
 * (which it does when it processes the reply, so EPERM is retried a
 * moment) and we have CAP_SYS_ADMIN. 0 or -errno. */
static int probe_backing(struct passthrough *pt)
{
    char path[PATH_MAX];
    int rc = path_join(path, sizeof(path), "%s/imgfs-cache", cache_dir(pt->cache));
    int fd = rc ? -1 : open(path, O_RDONLY | O_CLOEXEC);
    if (!rc && fd < 0)
        rc = -errno;
    for (int attempt = 0; !rc && attempt < 20; attempt++) {
        int id = serve_backing_open(pt->fuse_fd, fd);
        if (id > 0) {
            serve_backing_close(pt->fuse_fd, id);
            rc = 0;
            break;
        }
        rc = id;
        if (rc != -EPERM)
            break;
        rc = 0;
        usleep(100 * 1000);
        if (attempt == 19)
            rc = -EPERM;
    }
    if (fd >= 0)
        close(fd);
    return rc;
}

/* Sleeps up to seconds or until stopped; returns whether to go on. */
static bool pause_for(struct passthrough *pt, double seconds)
{
    pthread_mutex_lock(&pt->lock);
    uint64_t deadline = now_ns() + (uint64_t)(seconds * 1e9);
    while (!pt->stop && cond_wait_until(&pt->wake, &pt->lock, deadline) != ETIMEDOUT)
        ;
    bool go_on = !pt->stop;
    pthread_mutex_unlock(&pt->lock);
    return go_on;
}

static bool stopping(struct passthrough *pt)
{
    pthread_mutex_lock(&pt->lock);
    bool stop = pt->stop;
    pthread_mutex_unlock(&pt->lock);
    return stop;
}

struct version_list {
    struct base_version **items;
    size_t count, cap;
};

static int collect(void *ctx, const struct node *n)
{
    struct version_list *l = ctx;
    if (n->kind != NODE_BASE_FILE)
        return 0;
    if (l->count == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        struct base_version **grown = realloc(l->items, cap * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        l->items = grown;
        l->cap = cap;
    }
    l->items[l->count++] = n->version;
    return 0;
}

static bool known_name(void *ctx, const char *name)
{
    const struct version_list *l = ctx;
    for (size_t i = 0; i < l->count; i++) {
        char own[96];
        snprintf(own, sizeof(own), "%s@%" PRIu64, l->items[i]->manifest->name, l->items[i]->manifest->version);
        if (strcmp(own, name) == 0)
            return true;
    }
    return false;
}

/* Whether every stored chunk of v is in the cache and held (memoised while
 * the cache's residency and holds do not change). */
static bool wholly_held(struct passthrough *pt, struct base_version *v)
{
    struct passthrough_version *pv = &v->pt;
    struct cache_usage usage;
    cache_get_usage(pt->cache, &usage);
    uint64_t generation = cache_generation(pt->cache);
    if (pv->memo_valid && pv->memo_generation == generation && pv->memo_held == usage.held_bytes)
        return pv->memo_eligible;
    const struct manifest *m = v->manifest;
    bool held = true;
    for (uint64_t i = 0; i < m->chunk_count && held; i++)
        held = chunk_hash_is_null(&m->chunks[i]) || cache_stores_held(pt->cache, &m->chunks[i]);
    pv->memo_valid = true;
    pv->memo_generation = generation;
    pv->memo_held = usage.held_bytes;
    pv->memo_eligible = held;
    return held;
}

static void scan(struct passthrough *pt)
{
    struct version_list l = {0};
    tree_for_each_child(pt->tree, INO_BASES, 0, collect, &l);
    flat_prune(pt->flat, known_name, &l);
    for (size_t i = 0; i < l.count && !stopping(pt); i++) {
        struct base_version *v = l.items[i];
        enum flat_state state = flat_state_of(pt->flat, v->manifest);
        if (!wholly_held(pt, v)) {
            if (state != FLAT_NONE)
                flat_remove(pt->flat, v->manifest);
        } else if (state == FLAT_NONE) {
            flat_build(pt->flat, v->manifest);
        } else if (state == FLAT_UNCHECKED) {
            flat_check(pt->flat, v->manifest);
        }
    }
    free(l.items);
}

static void *background(void *arg)
{
    struct passthrough *pt = arg;
    pthread_mutex_lock(&pt->lock);
    while (!pt->stop && !pt->init_done) /* the first server's INIT is still to come */
        pthread_cond_wait(&pt->wake, &pt->lock);
    bool stop = pt->stop;
    pthread_mutex_unlock(&pt->lock);
    if (stop)
        return NULL;
    int rc = -EPROTO;
    if (pt->t->passthrough)
        rc = probe_backing(pt);
    if (rc) {
        char why[200];
        pthread_mutex_lock(&pt->lock);
        if (!pt->t->passthrough && !pt->why[0])
            snprintf(pt->why, sizeof(pt->why), "it was not negotiated when the mount was made (remount to change)");
        else if (pt->t->passthrough)
            snprintf(pt->why, sizeof(pt->why), "the kernel refuses to register backing files: %s%s", strerror(-rc),
                     rc == -EPERM ? " (it needs CAP_SYS_ADMIN)" : "");
        snprintf(why, sizeof(why), "%s", pt->why);
        pthread_mutex_unlock(&pt->lock);
        atomic_store(&pt->state, PASSTHROUGH_UNAVAILABLE);
        log_warn("base_passthrough: %s; base files are read through the daemon", why);
        return NULL;
    }
    atomic_store(&pt->state, PASSTHROUGH_ACTIVE);
    log_info("base_passthrough: the kernel reads base files whose version is wholly held in the cache from "
             "their checked flat files");
    do
        scan(pt);
    while (pause_for(pt, PASSTHROUGH_SCAN_SECONDS));
    return NULL;
}

int passthrough_start(struct passthrough *pt)
{
    if (!pt->wanted)
        return 0;
    pthread_mutex_lock(&pt->lock);
    int rc = pthread_create(&pt->thread, NULL, background, pt);
    pt->started = rc == 0;
    pthread_mutex_unlock(&pt->lock);
    return -rc;
}

void passthrough_destroy(struct passthrough *pt)
{
    if (!pt)
        return;
    pthread_mutex_lock(&pt->lock);
    pt->stop = true;
    pthread_cond_broadcast(&pt->wake);
    bool started = pt->started;
    pthread_mutex_unlock(&pt->lock);
    if (pt->flat)
        flat_stop(pt->flat);
    if (started)
        pthread_join(pt->thread, NULL);
    flat_close(pt->flat);
    pthread_cond_destroy(&pt->wake);
    pthread_mutex_destroy(&pt->lock);
    free(pt);
}

/* A new backing id for v's flat file, or 0 when it is not ready. Caller
 * holds v's lock. */
static int register_flat(struct passthrough *pt, struct base_version *v)
{
    if (atomic_load(&pt->state) != PASSTHROUGH_ACTIVE)
        return 0;
    int fd = flat_open_ready(pt->flat, v->manifest);
    if (fd < 0)
        return 0;
    int id = serve_backing_open(pt->fuse_fd, fd);
    close(fd);
    if (id < 0) {
        log_warn("bases/%s@%" PRIu64 ".raw: the kernel refuses its flat file: %s; read through the daemon",
                 v->manifest->name, v->manifest->version, strerror(-id));
        return 0;
    }
    return id;
}

int passthrough_open(struct passthrough *pt, struct base_version *v, uint64_t fh)
{
    struct passthrough_version *pv = &v->pt;
    pthread_mutex_lock(&pv->lock);
    int id = 0;
    if (pv->pt_opens) /* the kernel insists: the same mode and backing file */
        id = pv->backing_id;
    else if (!pv->cached_opens)
        id = register_flat(pt, v);
    if (id > 0) {
        pv->backing_id = id;
        pv->pt_opens++;
        atomic_fetch_add(&pt->opens, 1);
        atomic_fetch_add(&pt->opens_total, 1);
        atomic_fetch_add(&pv->pt_total, 1);
    } else {
        pv->cached_opens++;
    }
    takeover_handle_set_backing(pt->t, fh, id > 0 ? (uint32_t)id : 0);
    pthread_mutex_unlock(&pv->lock);
    return id > 0 ? id : 0;
}

void passthrough_release(struct passthrough *pt, struct base_version *v, uint64_t fh)
{
    struct passthrough_version *pv = &v->pt;
    uint32_t id = takeover_handle_backing(pt->t, fh);
    pthread_mutex_lock(&pv->lock);
    if (id && pv->pt_opens) {
        atomic_fetch_sub(&pt->opens, 1);
        /* Every released slot drops its id before the slot is freed: a
         * server killed in between must not restore it with an id that is
         * closed here, or later by the last release, and reused; as a normal
         * open, the resent RELEASE undoes it. */
        takeover_handle_set_backing(pt->t, fh, 0);
        if (--pv->pt_opens == 0) {
            int rc = serve_backing_close(pt->fuse_fd, pv->backing_id);
            if (rc)
                log_warn("bases/%s@%" PRIu64 ".raw: closing backing id %d failed: %s", v->manifest->name,
                         v->manifest->version, pv->backing_id, strerror(-rc));
            pv->backing_id = 0;
        }
    } else if (!id && pv->cached_opens) {
        pv->cached_opens--;
    }
    pthread_mutex_unlock(&pv->lock);
}

void passthrough_restore(struct passthrough *pt, struct base_version *v, uint32_t backing_id)
{
    struct passthrough_version *pv = &v->pt;
    pthread_mutex_lock(&pv->lock);
    if (backing_id) {
        if (pv->backing_id && pv->backing_id != (int)backing_id)
            log_warn("bases/%s@%" PRIu64 ".raw: open with backing ids %d and %u", v->manifest->name,
                     v->manifest->version, pv->backing_id, backing_id);
        pv->backing_id = (int)backing_id;
        pv->pt_opens++;
        atomic_fetch_add(&pt->opens, 1);
    } else {
        pv->cached_opens++;
    }
    pthread_mutex_unlock(&pv->lock);
}

void passthrough_get_status(struct passthrough *pt, struct passthrough_status *out)
{
    memset(out, 0, sizeof(*out));
    out->state = (enum passthrough_state)atomic_load(&pt->state);
    out->kernel_offers = pt->t->init_len && takeover_init_has_passthrough(pt->t->init, pt->t->init_len);
    out->negotiated = pt->t->passthrough != 0;
    if (out->state == PASSTHROUGH_UNAVAILABLE) {
        pthread_mutex_lock(&pt->lock);
        snprintf(out->why, sizeof(out->why), "%s", pt->why);
        pthread_mutex_unlock(&pt->lock);
    }
    out->opens = atomic_load(&pt->opens);
    out->opens_total = atomic_load(&pt->opens_total);
    if (pt->flat)
        flat_get_usage(pt->flat, &out->flat);
}

enum flat_state passthrough_flat_state(struct passthrough *pt, const struct base_version *v)
{
    return pt->flat ? flat_state_of(pt->flat, v->manifest) : FLAT_NONE;
}
