/* tree: the namespace of the mount and the base versions behind it.
 *
 *   /                      inode 1
 *   /bases/                NAME@V.raw for every version V of every base,
 *                          NAME.raw -> NAME@LATEST.raw (a symlink)
 *   /vms/                  VM.raw for each VM (read-write), VM@SNAP.raw for
 *                          each of its snapshots (read-only)
 *   /.imgfs/stats          plain-text status
 *   /.imgfs/control        imgfsctl's command channel (root only)
 *   /.imgfs/metrics        the same status in Prometheus text format
 *   /.imgfs/status.json    the same status as JSON
 *
 * Inode numbers are given in order of first appearance and, through the
 * takeover inode map, keep their value across servers (see takeover.h).
 * Base version files are immutable, so each keeps one inode for the life of
 * the mount and the kernel may cache its pages forever. A new publish adds a
 * new NAME@V.raw and re-points the NAME.raw symlink. Removing a VM detaches
 * its nodes (parent 0) without freeing them.
 *
 * Lookups go through a hash index keyed by (parent inode, name), so they
 * cost the same with thousands of VM disks and versions.
 *
 * Locking: the node table is guarded by tree->lock (a rwlock). Nodes are
 * never freed before tree_destroy(), so a node pointer obtained under the
 * lock stays valid afterwards; its immutable fields may be read without it.
 * A node is handed out (tree_get, tree_lookup, tree_for_each_child) only
 * once it is claimed, so its kind, version, vm and snapshot never change
 * after a caller has it. Its parent does (0 once detached) and is atomic:
 * a request that found the node reads it with no lock while another one
 * removes the VM. The symlink target (link_target) changes on refresh and
 * is read and written only under the lock. Refreshes are serialised by
 * refresh_lock and do their repository I/O without holding tree->lock.
 */
#ifndef IMGFS_TREE_H
#define IMGFS_TREE_H

#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "fetch.h"
#include "manifest.h"
#include "passthrough.h"
#include "repo.h"
#include "prefetch.h"
#include "takeover.h"
#include "vm.h"

enum {
    INO_ROOT = FUSE_ROOT_ID,
    INO_BASES,
    INO_VMS,
    INO_STATUS_DIR,
    INO_STATS,
    INO_CONTROL,
    INO_METRICS,
    INO_STATUS_JSON,
    INO_FIRST_DYNAMIC,
};

enum node_kind {
    NODE_DIR,
    NODE_BASE_FILE,
    NODE_BASE_LINK,
    NODE_STATUS_FILE,
    NODE_CONTROL_FILE,
    NODE_VM_FILE,
    NODE_VM_SNAPSHOT,
    NODE_UNCLAIMED, /* after a takeover: a number an earlier server gave, not yet seen again */
};

struct base_version {
    struct manifest *manifest; /* owned */
    struct fetch_counters counters;
    struct prefetch_marks marks;
    struct vm_base view; /* {manifest, &counters, &marks}, what VM disks read through */
    /* What status last counted of it in the cache (fs/status.c), good while
     * cache_generation() is still residency_generation, so that a stats
     * read walks a version's chunks only when the cache changed. Guarded by
     * residency_lock, which is never held across the walk. */
    pthread_mutex_t residency_lock;
    bool residency_known;
    uint64_t residency_generation;
    uint64_t stored_chunks, resident_chunks, resident_bytes;
    struct passthrough_version pt; /* its opens with and without FUSE passthrough */
};

struct node {
    fuse_ino_t ino;
    _Atomic fuse_ino_t parent; /* 0: detached (written under tree->lock) */
    enum node_kind kind;       /* NODE_UNCLAIMED only while nobody is handed the node */
    char name[80];
    struct base_version *version; /* NODE_BASE_FILE: owned */
    char link_target[80];         /* NODE_BASE_LINK: guarded by tree->lock */
    struct vm *vm;                /* NODE_VM_FILE and NODE_VM_SNAPSHOT: not owned */
    struct vm_snapshot *snapshot; /* NODE_VM_SNAPSHOT */
    struct node *index_next;      /* the name index's chain: guarded by tree->lock */
    struct prefetch_stream readahead; /* image files: atomics, no lock */
};

/* How far the versions of one base have been read: every version up to
 * done is loaded or given up (a bad manifest). A missing version stalls the
 * base until retry_ns, with a backoff, so that an index claiming versions
 * that do not exist costs one request per backoff, not one per version per
 * refresh. */
struct base_scan {
    char name[65];
    uint64_t done;
    uint64_t retry_ns;
    uint64_t backoff_ns;
    char problem[256]; /* why a version was skipped or is waited for ("" if none) */
    bool problem_is_bad; /* a bad manifest (for good), not a missing one */
};

/* Manifest reads one refresh may do: the first (at mount) and later ones.
 * The rest waits for the next refresh; nothing waits for all of it. */
#define TREE_FIRST_REFRESH_BUDGET 4096
#define TREE_REFRESH_BUDGET 256
#define TREE_MAX_MISSING_RUN 8
#define TREE_RETRY_START_NS (30ull * 1000000000ull)
#define TREE_RETRY_MAX_NS (600ull * 1000000000ull)

struct tree {
    pthread_rwlock_t lock;
    struct node **nodes; /* nodes[ino - 1] */
    /* The attached, named nodes by (parent, name): a hash table of chains
     * of index_cap (a power of two) heads, guarded by lock. */
    struct node **index;
    size_t index_cap;
    size_t index_count;
    size_t count;
    size_t cap;

    pthread_mutex_t refresh_lock; /* held across a refresh's repository I/O */
    uint64_t last_refresh_ns;     /* guarded by refresh_lock */
    struct base_scan *scans;      /* guarded by refresh_lock: how far each base is read */
    size_t scan_count;
    atomic_bool stopping;         /* set by tree_stop_refresh(): a refresh ends early */
    double refresh_seconds;
    struct repo *repo; /* not owned */
    /* Never held across I/O, so status readers never wait on the network. */
    pthread_mutex_t error_lock;
    char last_refresh_error[256]; /* guarded by error_lock */

    struct takeover *inode_map; /* not owned; written under lock */
    size_t unclaimed;           /* placeholders still unclaimed; guarded by lock */
};

int tree_create(struct repo *repo, double refresh_seconds, struct tree **out);
void tree_destroy(struct tree *tree);

/* Makes inode numbers outlive this server (takeover.h): every node is
 * recorded in t's inode map, and a node that an earlier server numbered
 * gets the same number again. Call before the first refresh. */
void tree_use_inode_map(struct tree *tree, struct takeover *t);

/* Re-reads the repository index and adds new versions, at most a budget of
 * manifest reads at a time (TREE_*_BUDGET). force ignores the refresh
 * interval and waits for a refresh under way; without force a refresh under
 * way is not waited for (a lookup never blocks behind the network). Returns
 * a negative errno (with err set) only when the index cannot be read; the
 * tree then keeps what it had. A version whose manifest is bad is skipped,
 * logged and kept in last_refresh_error; a missing one is retried later,
 * unless it is retired (repo.h): that one is skipped quietly and asked
 * about only once. A version the tree has keeps its node after it is
 * retired. */
int tree_refresh(struct tree *tree, bool force, char *err, size_t errlen);
/* Makes a refresh under way stop at its next version (for unmount). */
void tree_stop_refresh(struct tree *tree);

/* Returns the node, or NULL (also for a placeholder not claimed yet). */
struct node *tree_get(struct tree *tree, fuse_ino_t ino);
struct node *tree_lookup(struct tree *tree, fuse_ino_t parent, const char *name);

/* Calls fn for each child of parent in inode order, starting after
 * the child with inode `after` (0 = from the start), while fn returns 0. */
void tree_for_each_child(struct tree *tree, fuse_ino_t parent, fuse_ino_t after,
                         int (*fn)(void *ctx, const struct node *n), void *ctx);

/* Adds vms/VM.raw and vms/VM@SNAP.raw for each of vm's snapshots that has
 * no node yet. */
int tree_add_vm(struct tree *tree, struct vm *vm);
/* Detaches every node of vm. */
void tree_remove_vm(struct tree *tree, struct vm *vm);
/* Detaches the nodes of snapshots that were removed (vm_snapshot.removed). */
void tree_prune_snapshots(struct tree *tree);
/* The base version NAME@VERSION, or NULL. */
struct base_version *tree_find_version(struct tree *tree, const char *name, uint64_t version);

/* Copies the last refresh error ("" when the last refresh worked). */
void tree_refresh_error(struct tree *tree, char *out, size_t len);

/* Copies a symlink's target under the lock. */
void tree_read_link(struct tree *tree, const struct node *n, char *out, size_t len);

#endif
