/* passthrough: base files read by the kernel itself (FUSE passthrough,
 * Linux 6.9+), from the flat file of their version (flat.h), so that a READ
 * of a cached base never reaches the daemon. A FUSE round trip costs about
 * what the disk read does (bench/RESULTS.md), so no server that answers
 * each READ reaches the local file's speed on a cold read; the kernel's
 * passthrough does.
 *
 * Off unless the mount asks for it (-o base_passthrough): the kernel checks
 * nothing on these reads, so bytes changed on disk after imgfs checked its
 * flat file are served as they are (flat.h says what is and is not caught).
 *
 * Negotiation. With the option, the first server's INIT reply asks for
 * FUSE_PASSTHROUGH when the kernel's INIT offered it and the writeback cache
 * (vm_cache=writeback, which the kernel refuses it with) is not asked for;
 * the takeover region records that it asked, so a later server, which never
 * sees INIT, knows. The background thread then checks once that the backing
 * ioctl works (it needs CAP_SYS_ADMIN). If any of that fails it logs one line
 * saying why and base files are served as without the option.
 * IMGFS_NO_PASSTHROUGH=1 in the environment forces that (for tests).
 *
 * The background thread (never a FUSE worker) keeps one flat file for each
 * version whose every stored chunk is in the cache and held by a pre-copy
 * pin set (imgfsctl precopy): it builds missing ones, checks those found at
 * start (before any of them is handed to the kernel in this run; until then
 * opens take the normal, checked path), and removes the file of a version
 * that is no longer held (and of names the mount no longer has), every
 * PASSTHROUGH_SCAN_SECONDS.
 *
 * Opens. The kernel keeps one io mode per inode: an inode open without
 * passthrough cannot be opened with it (EIO), nor the other way round, and
 * all passthrough opens of an inode must share one backing file. So each
 * version counts its opens of each kind: an open of a version that has
 * passthrough opens passes through with their backing id; one of a version
 * that has normal opens is normal; otherwise it passes through when the
 * flat file is ready. The backing id is registered at the first passthrough
 * open and closed at the last one's release (the open files keep their own
 * reference to the flat file, which may be removed meanwhile). Each handle's
 * backing id is kept in the takeover handle table, so a new server rebuilds
 * the counts and the shared id (passthrough_restore), handles RELEASE of
 * files opened before it and opens more of them through the same id.
 *
 * Contract: thread-safe. A version's counts are guarded by its lock, held
 * across the open(2) of its flat file and the backing ioctl (local, short),
 * never across a build or check.
 */
#ifndef IMGFS_PASSTHROUGH_H
#define IMGFS_PASSTHROUGH_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "cache.h"
#include "flat.h"
#include "takeover.h"

#define PASSTHROUGH_SCAN_SECONDS 2
#define PASSTHROUGH_DISABLE_ENV "IMGFS_NO_PASSTHROUGH"

struct tree;
struct base_version;

/* One base version's opens (in struct base_version). */
struct passthrough_version {
    pthread_mutex_t lock; /* guards cached_opens, pt_opens and backing_id */
    uint32_t cached_opens; /* open without passthrough */
    uint32_t pt_opens;     /* open with passthrough, all through backing_id */
    int backing_id;        /* > 0 while pt_opens > 0 */
    atomic_uint_fast64_t reads;    /* READ requests of the base file the daemon served */
    atomic_uint_fast64_t pt_total; /* passthrough opens since this server started */
    /* The background thread's memo of whether the version is wholly held:
     * good while the cache's generation and held bytes are those. */
    uint64_t memo_generation, memo_held;
    bool memo_valid, memo_eligible;
};

void passthrough_version_init(struct passthrough_version *pv);
void passthrough_version_destroy(struct passthrough_version *pv);

enum passthrough_state {
    PASSTHROUGH_OFF,         /* the option is off */
    PASSTHROUGH_WAITING,     /* for INIT, or for the backing ioctl check */
    PASSTHROUGH_UNAVAILABLE, /* see why */
    PASSTHROUGH_ACTIVE,
};

struct passthrough_status {
    enum passthrough_state state;
    bool kernel_offers; /* the kernel's INIT offered FUSE_PASSTHROUGH */
    bool negotiated;    /* the INIT reply asked for it */
    char why[200];      /* UNAVAILABLE: why, "" otherwise */
    uint32_t opens;     /* files open with passthrough now */
    uint64_t opens_total;
    struct flat_usage flat;
};

struct passthrough;

/* wanted: -o base_passthrough. Opens the flat file store (flat_open) only
 * when wanted. fuse_fd is the connection; t the takeover region. */
int passthrough_create(bool wanted, struct cache *cache, struct tree *tree, struct takeover *t, int fuse_fd,
                       struct passthrough **out, char *err, size_t errlen);
/* Starts the background thread; call once the connection is being served. */
int passthrough_start(struct passthrough *pt);
/* Stops the thread (a build under way stops) and frees everything. Backing
 * ids of files still open stay registered for the next server. */
void passthrough_destroy(struct passthrough *pt);

/* In op_init of the server that answers INIT: asks for passthrough (see
 * above). writeback: the reply asks for the writeback cache. */
void passthrough_negotiate(struct passthrough *pt, bool writeback);

/* At the end of op_init, in every server (a takeover's replayed INIT too):
 * the negotiation is known, the background thread may start its work. */
void passthrough_init_done(struct passthrough *pt);

/* An open of version v's base file with handle fh (takeover slot): the
 * backing id to reply with (serve_set_open_backing), or 0 for a normal open
 * (with keep_cache). Counted until passthrough_release(); recorded in fh's
 * slot. */
int passthrough_open(struct passthrough *pt, struct base_version *v, uint64_t fh);
/* The release of such an open (also of one made by an earlier server). */
void passthrough_release(struct passthrough *pt, struct base_version *v, uint64_t fh);
/* After a takeover: counts an open that an earlier server made with this
 * backing id (0: normal). */
void passthrough_restore(struct passthrough *pt, struct base_version *v, uint32_t backing_id);

void passthrough_get_status(struct passthrough *pt, struct passthrough_status *out);
/* The state of v's flat file (FLAT_NONE when the option is off). */
enum flat_state passthrough_flat_state(struct passthrough *pt, const struct base_version *v);

#endif
