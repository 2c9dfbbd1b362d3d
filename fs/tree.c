#include "tree.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* ---- the name index (tree->lock held) ------------------------------------------
 *
 * A chained hash table of the attached nodes keyed by (parent, name), so
 * that a lookup costs the same with 20 or 20,000 nodes. It keys on the
 * parent's inode number and maps to the node, whatever scheme numbers the
 * inodes. A chain keeps insertion order, so of two equal keys the older
 * node is found, as the linear scan found it. */

static size_t index_slot(const struct tree *tree, fuse_ino_t parent, const char *name)
{
    uint64_t h = 0xcbf29ce484222325ull ^ (uint64_t)parent * 0x9e3779b97f4a7c15ull; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    return (size_t)(h ^ h >> 29) & (tree->index_cap - 1);
}

/* Appends n at the end of its chain. */
static void index_link(struct tree *tree, struct node *n)
{
    struct node **at = &tree->index[index_slot(tree, n->parent, n->name)];
    while (*at)
        at = &(*at)->index_next;
    n->index_next = NULL;
    *at = n;
}

static int index_insert(struct tree *tree, struct node *n)
{
    if (tree->index_count + 1 > tree->index_cap) {
        size_t cap = tree->index_cap ? tree->index_cap * 2 : 256;
        struct node **grown = calloc(cap, sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        free(tree->index);
        tree->index = grown;
        tree->index_cap = cap;
        /* Re-linked in inode order, which keeps the older-first chains;
         * n itself may be in nodes already, and is linked below. */
        for (size_t i = 0; i < tree->count; i++)
            if (tree->nodes[i]->parent && tree->nodes[i]->name[0] && tree->nodes[i] != n)
                index_link(tree, tree->nodes[i]);
    }
    index_link(tree, n);
    tree->index_count++;
    return 0;
}

static void index_remove(struct tree *tree, struct node *n)
{
    for (struct node **at = &tree->index[index_slot(tree, n->parent, n->name)]; *at; at = &(*at)->index_next)
        if (*at == n) {
            *at = n->index_next;
            tree->index_count--;
            return;
        }
}

static struct node *lookup_locked(struct tree *tree, fuse_ino_t parent, const char *name)
{
    if (!tree->index_cap)
        return NULL;
    for (struct node *n = tree->index[index_slot(tree, parent, name)]; n; n = n->index_next)
        if (n->parent == parent && strcmp(n->name, name) == 0)
            return n;
    return NULL;
}

static void map_record(struct tree *tree, const struct node *n)
{
    struct takeover *t = tree->inode_map;
    if (!t || n->ino > TAKEOVER_MAX_INODES)
        return;
    struct takeover_inode *e = &t->inodes[n->ino - 1];
    e->parent = n->parent;
    e->kind = n->kind;
    snprintf(e->name, sizeof(e->name), "%s", n->name);
    if (t->inode_count < n->ino)
        t->inode_count = n->ino;
}

/* The placeholder that an earlier server gave (parent, kind, name), if any. */
static struct node *claim_placeholder(struct tree *tree, fuse_ino_t parent, enum node_kind kind, const char *name)
{
    if (!tree->unclaimed)
        return NULL;
    for (size_t i = INO_FIRST_DYNAMIC - 1; i < tree->count; i++) {
        struct node *n = tree->nodes[i];
        const struct takeover_inode *e = &tree->inode_map->inodes[i];
        if (n->kind == NODE_UNCLAIMED && e->parent == parent && e->kind == (uint32_t)kind &&
            strcmp(n->name, name) == 0) {
            n->parent = parent;
            if (index_insert(tree, n) != 0) {
                n->parent = 0; /* stays unclaimed; the caller sees out of memory */
                return NULL;
            }
            n->kind = kind;
            tree->unclaimed--;
            return n;
        }
    }
    return NULL;
}

static struct node *append_node(struct tree *tree)
{
    if (tree->count == tree->cap) {
        size_t cap = tree->cap ? tree->cap * 2 : 64;
        struct node **grown = realloc(tree->nodes, cap * sizeof(*grown));
        if (!grown)
            return NULL;
        tree->nodes = grown;
        tree->cap = cap;
    }
    struct node *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->ino = tree->count + 1;
    tree->nodes[tree->count++] = n;
    return n;
}

/* Adds a node; called with tree->lock held for writing. After a takeover
 * a node gets the inode number the previous server gave it. */
static struct node *add_node(struct tree *tree, fuse_ino_t parent, enum node_kind kind, const char *name)
{
    struct node *n = claim_placeholder(tree, parent, kind, name);
    if (n)
        return n;
    if ((n = append_node(tree)) == NULL)
        return NULL;
    n->parent = parent;
    n->kind = kind;
    snprintf(n->name, sizeof(n->name), "%s", name);
    /* The root has no name and is never looked up. */
    if (n->name[0] && index_insert(tree, n) != 0) {
        n->parent = 0; /* left detached: its number stays unused */
        return NULL;
    }
    map_record(tree, n);
    return n;
}

void tree_use_inode_map(struct tree *tree, struct takeover *t)
{
    pthread_rwlock_wrlock(&tree->lock);
    tree->inode_map = t;
    for (size_t i = 0; i < tree->count; i++) /* the fixed nodes */
        map_record(tree, tree->nodes[i]);
    while (tree->count < t->inode_count) {
        const struct takeover_inode *e = &t->inodes[tree->count];
        struct node *n = append_node(tree);
        if (!n)
            break; /* out of memory: those numbers stay unused */
        n->kind = NODE_UNCLAIMED; /* parent 0: invisible until claimed */
        format_cut(n->name, sizeof(n->name), "%s", e->name); /* written from a node: it fits */
        if (e->parent)
            tree->unclaimed++;
    }
    pthread_rwlock_unlock(&tree->lock);
}

int tree_create(struct repo *repo, double refresh_seconds, struct tree **out)
{
    struct tree *tree = calloc(1, sizeof(*tree));
    if (!tree)
        return -ENOMEM;
    pthread_rwlock_init(&tree->lock, NULL);
    pthread_mutex_init(&tree->refresh_lock, NULL);
    pthread_mutex_init(&tree->error_lock, NULL);
    tree->repo = repo;
    tree->refresh_seconds = refresh_seconds;
    /* The fixed part, in the inode order of the INO_* constants. */
    bool ok = add_node(tree, INO_ROOT, NODE_DIR, "") && add_node(tree, INO_ROOT, NODE_DIR, "bases") &&
              add_node(tree, INO_ROOT, NODE_DIR, "vms") && add_node(tree, INO_ROOT, NODE_DIR, ".imgfs") &&
              add_node(tree, INO_STATUS_DIR, NODE_STATUS_FILE, "stats") &&
              add_node(tree, INO_STATUS_DIR, NODE_CONTROL_FILE, "control") &&
              add_node(tree, INO_STATUS_DIR, NODE_STATUS_FILE, "metrics") &&
              add_node(tree, INO_STATUS_DIR, NODE_STATUS_FILE, "status.json");
    if (!ok) {
        tree_destroy(tree);
        return -ENOMEM;
    }
    *out = tree;
    return 0;
}

void tree_destroy(struct tree *tree)
{
    if (!tree)
        return;
    for (size_t i = 0; i < tree->count; i++) {
        struct node *n = tree->nodes[i];
        if (n->version) {
            free((void *)n->version->marks.brought);
            free((void *)n->version->marks.list_pos);
            manifest_free(n->version->manifest);
            pthread_mutex_destroy(&n->version->residency_lock);
            passthrough_version_destroy(&n->version->pt);
            free(n->version);
        }
        free(n);
    }
    free(tree->nodes);
    free(tree->index);
    free(tree->scans);
    pthread_rwlock_destroy(&tree->lock);
    pthread_mutex_destroy(&tree->refresh_lock);
    pthread_mutex_destroy(&tree->error_lock);
    free(tree);
}

struct node *tree_get(struct tree *tree, fuse_ino_t ino)
{
    pthread_rwlock_rdlock(&tree->lock);
    struct node *n = ino >= 1 && ino <= tree->count ? tree->nodes[ino - 1] : NULL;
    if (n && n->kind == NODE_UNCLAIMED)
        n = NULL; /* a claim will write its kind and VM: never handed out before */
    pthread_rwlock_unlock(&tree->lock);
    return n;
}

struct node *tree_lookup(struct tree *tree, fuse_ino_t parent, const char *name)
{
    pthread_rwlock_rdlock(&tree->lock);
    struct node *n = lookup_locked(tree, parent, name);
    pthread_rwlock_unlock(&tree->lock);
    return n;
}

void tree_for_each_child(struct tree *tree, fuse_ino_t parent, fuse_ino_t after,
                         int (*fn)(void *ctx, const struct node *n), void *ctx)
{
    pthread_rwlock_rdlock(&tree->lock);
    for (size_t i = after; i < tree->count; i++) {
        struct node *n = tree->nodes[i];
        if (n->ino != INO_ROOT && n->parent == parent && fn(ctx, n) != 0)
            break;
    }
    pthread_rwlock_unlock(&tree->lock);
}

void tree_refresh_error(struct tree *tree, char *out, size_t len)
{
    pthread_mutex_lock(&tree->error_lock);
    snprintf(out, len, "%s", tree->last_refresh_error);
    pthread_mutex_unlock(&tree->error_lock);
}

void tree_read_link(struct tree *tree, const struct node *n, char *out, size_t len)
{
    pthread_rwlock_rdlock(&tree->lock);
    snprintf(out, len, "%s", n->link_target);
    pthread_rwlock_unlock(&tree->lock);
}

/* Adds NAME@V.raw for a loaded manifest, and points NAME.raw at the latest. */
static int publish_version(struct tree *tree, struct manifest *m, bool latest)
{
    char file[80], link[80];
    snprintf(file, sizeof(file), "%s@%" PRIu64 ".raw", m->name, m->version);
    snprintf(link, sizeof(link), "%s.raw", m->name);
    struct base_version *v = calloc(1, sizeof(*v));
    if (!v)
        return -ENOMEM;
    v->manifest = m;
    v->view.manifest = m;
    v->view.counters = &v->counters;
    v->view.marks = &v->marks;
    pthread_mutex_init(&v->residency_lock, NULL);
    passthrough_version_init(&v->pt);
    pthread_rwlock_wrlock(&tree->lock);
    struct node *n = add_node(tree, INO_BASES, NODE_BASE_FILE, file);
    if (n)
        n->version = v;
    struct node *l = lookup_locked(tree, INO_BASES, link);
    if (n && !l && (l = add_node(tree, INO_BASES, NODE_BASE_LINK, link)) == NULL)
        n = NULL;
    if (n && latest)
        snprintf(l->link_target, sizeof(l->link_target), "%s", file);
    pthread_rwlock_unlock(&tree->lock);
    if (!n) {
        pthread_mutex_destroy(&v->residency_lock);
        passthrough_version_destroy(&v->pt);
        free(v);
        return -ENOMEM;
    }
    return 0;
}

void tree_stop_refresh(struct tree *tree) { atomic_store(&tree->stopping, true); }

/* Called with refresh_lock held. */
static struct base_scan *scan_of(struct tree *tree, const char *name)
{
    for (size_t i = 0; i < tree->scan_count; i++)
        if (strcmp(tree->scans[i].name, name) == 0)
            return &tree->scans[i];
    struct base_scan *grown = realloc(tree->scans, (tree->scan_count + 1) * sizeof(*grown));
    if (!grown)
        return NULL;
    tree->scans = grown;
    struct base_scan *s = &tree->scans[tree->scan_count++];
    memset(s, 0, sizeof(*s));
    snprintf(s->name, sizeof(s->name), "%s", name);
    return s;
}

/* Reads the versions of one base that are due, within *budget manifest
 * reads. Called with refresh_lock held. */
static void scan_base(struct tree *tree, const struct repo_index_entry *e, unsigned *budget, char *error,
                      size_t errlen)
{
    struct base_scan *s = scan_of(tree, e->name);
    if (!s || (s->retry_ns && now_ns() < s->retry_ns))
        return;
    uint64_t missing_from = 0; /* first version of the current run of missing ones */
    while (s->done < e->latest && *budget > 0 && !atomic_load(&tree->stopping)) {
        uint64_t v = s->done + 1;
        struct manifest *m;
        (*budget)--;
        char why[256];
        int rc = repo_read_manifest(tree->repo, e->name, v, &m, why, sizeof(why));
        if (rc != 0 && rc != -EBADMSG && rc != -EINVAL && repo_version_retired(tree->repo, e->name, v)) {
            s->done = v; /* retired (repo.h): gone for good, and no error */
            continue;
        }
        if (rc)
            snprintf(error, errlen, "%s", why);
        if (rc == 0 && publish_version(tree, m, v == e->latest) != 0) {
            manifest_free(m);
            snprintf(error, errlen, "out of memory");
            return;
        }
        if (rc != 0 && (!s->problem_is_bad || rc == -EBADMSG || rc == -EINVAL)) {
            snprintf(s->problem, sizeof(s->problem), "%s", error);
            s->problem_is_bad = rc == -EBADMSG || rc == -EINVAL;
        } else if (rc == 0 && !s->problem_is_bad) {
            s->problem[0] = '\0'; /* what was waited for came */
        }
        if (rc == 0 || rc == -EBADMSG || rc == -EINVAL) {
            s->done = v; /* loaded, or bad for good: versions never change */
            s->retry_ns = s->backoff_ns = 0;
            missing_from = 0;
            continue;
        }
        /* A missing version below existing ones is a hole (a removed
         * version): skip it. A run of missing versions up to the newest, or
         * a long one, is what the index claims but the repository does not
         * have (yet): stop there and retry later, not on every refresh. */
        if (!missing_from)
            missing_from = v;
        if (rc == -ENOENT && v < e->latest && v - missing_from + 1 < TREE_MAX_MISSING_RUN) {
            s->done = v;
            continue;
        }
        s->done = missing_from - 1;
        s->backoff_ns = s->backoff_ns ? s->backoff_ns * 2 : TREE_RETRY_START_NS;
        if (s->backoff_ns > TREE_RETRY_MAX_NS)
            s->backoff_ns = TREE_RETRY_MAX_NS;
        s->retry_ns = now_ns() + s->backoff_ns;
        return;
    }
    if (missing_from)
        s->done = missing_from - 1; /* cut short in a run (budget, unmount): it is tried again */
}

int tree_refresh(struct tree *tree, bool force, char *err, size_t errlen)
{
    if (force) {
        pthread_mutex_lock(&tree->refresh_lock);
    } else if (pthread_mutex_trylock(&tree->refresh_lock) != 0) {
        return 0; /* a refresh is under way: this caller does not wait for it */
    }
    uint64_t now = now_ns();
    if (!force && tree->last_refresh_ns &&
        now - tree->last_refresh_ns < (uint64_t)(tree->refresh_seconds * 1e9)) {
        pthread_mutex_unlock(&tree->refresh_lock);
        return 0;
    }
    bool first = tree->last_refresh_ns == 0;
    tree->last_refresh_ns = now;
    struct repo_index index;
    int rc = repo_read_index(tree->repo, &index, err, errlen);
    char version_error[256] = "";
    unsigned budget = first ? TREE_FIRST_REFRESH_BUDGET : TREE_REFRESH_BUDGET;
    /* A bad version is reported and skipped; the others still show. */
    for (size_t i = 0; rc == 0 && i < index.count; i++)
        scan_base(tree, &index.entries[i], &budget, version_error, sizeof(version_error));
    /* A version given up on stays reported, though it is not read again. */
    for (size_t i = 0; rc == 0 && !version_error[0] && i < tree->scan_count; i++)
        snprintf(version_error, sizeof(version_error), "%s", tree->scans[i].problem);
    if (rc == 0)
        repo_index_free(&index);
    const char *problem = rc ? err : version_error;
    pthread_mutex_lock(&tree->error_lock);
    /* The first failure to read the index is the caller's to report. */
    if (problem[0] && strcmp(tree->last_refresh_error, problem) != 0 && !(first && rc))
        log_warn("repository refresh: %s", problem);
    snprintf(tree->last_refresh_error, sizeof(tree->last_refresh_error), "%s", problem);
    pthread_mutex_unlock(&tree->error_lock);
    pthread_mutex_unlock(&tree->refresh_lock);
    return rc;
}

/* Whether vm (snap: one of its snapshots, or NULL) has an attached node,
 * found by the name it was added under. */
static bool has_vm_node(struct tree *tree, const struct vm *vm, const struct vm_snapshot *snap)
{
    char full[160], name[sizeof(((struct node *)0)->name)];
    if (snap)
        snprintf(full, sizeof(full), "%s@%s.raw", vm_name(vm), vm_snapshot_name(snap));
    else
        snprintf(full, sizeof(full), "%s.raw", vm_name(vm));
    snprintf(name, sizeof(name), "%.79s", full); /* as add_node cuts it */
    const struct node *n = lookup_locked(tree, INO_VMS, name);
    return n && n->vm == vm && n->snapshot == snap;
}

int tree_add_vm(struct tree *tree, struct vm *vm)
{
    /* Copied before tree->lock is taken: a lookup never waits behind a
     * VM's chain_lock. */
    struct vm_snapshot *snaps[VM_MAX_SNAPSHOTS];
    unsigned snap_count = vm_snapshot_list(vm, snaps);
    int rc = 0;
    pthread_rwlock_wrlock(&tree->lock);
    if (!has_vm_node(tree, vm, NULL)) {
        char name[80];
        snprintf(name, sizeof(name), "%s.raw", vm_name(vm));
        struct node *n = add_node(tree, INO_VMS, NODE_VM_FILE, name);
        if (n)
            n->vm = vm;
        else
            rc = -ENOMEM;
    }
    for (unsigned s = 0; s < snap_count && !rc; s++) {
        struct vm_snapshot *snap = snaps[s];
        if (has_vm_node(tree, vm, snap))
            continue;
        char name[160];
        snprintf(name, sizeof(name), "%s@%s.raw", vm_name(vm), vm_snapshot_name(snap));
        struct node *n = add_node(tree, INO_VMS, NODE_VM_SNAPSHOT, name);
        if (n) {
            n->vm = vm;
            n->snapshot = snap;
        } else {
            rc = -ENOMEM;
        }
    }
    pthread_rwlock_unlock(&tree->lock);
    return rc;
}

void tree_remove_vm(struct tree *tree, struct vm *vm)
{
    pthread_rwlock_wrlock(&tree->lock);
    for (size_t i = 0; i < tree->count; i++) {
        if (tree->nodes[i]->vm == vm && tree->nodes[i]->parent) {
            index_remove(tree, tree->nodes[i]);
            tree->nodes[i]->parent = 0;
            map_record(tree, tree->nodes[i]);
        }
    }
    pthread_rwlock_unlock(&tree->lock);
}

void tree_prune_snapshots(struct tree *tree)
{
    pthread_rwlock_wrlock(&tree->lock);
    for (size_t i = 0; i < tree->count; i++) {
        struct node *n = tree->nodes[i];
        if (n->kind == NODE_VM_SNAPSHOT && vm_snapshot_removed(n->snapshot) && n->parent) {
            index_remove(tree, n);
            n->parent = 0;
        }
    }
    pthread_rwlock_unlock(&tree->lock);
}

struct base_version *tree_find_version(struct tree *tree, const char *name, uint64_t version)
{
    char file[80];
    snprintf(file, sizeof(file), "%s@%" PRIu64 ".raw", name, version);
    struct node *n = tree_lookup(tree, INO_BASES, file);
    return n && n->kind == NODE_BASE_FILE ? n->version : NULL;
}
