/* fs: the FUSE side of imgfs (low-level API).
 *
 * Base version files are served read-only from pinned cache files with
 * zero-copy replies (splice from the cache file), and with keep_cache so
 * that the kernel page cache keeps their pages across opens: the bytes of a
 * version never change. Status files are rendered when opened and served
 * with direct_io, so `cat` always sees a fresh, complete snapshot.
 *
 * Contract: struct imgfs is created by the daemon before the session starts
 * and outlives it; every member is thread-safe (see each module's header).
 */
#ifndef IMGFS_FS_H
#define IMGFS_FS_H

#include <fuse_lowlevel.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "cache.h"
#include "fetch.h"
#include "prefetch.h"
#include "options.h"
#include "repo.h"
#include "takeover.h"
#include "status.h"
#include "tree.h"
#include "vm.h"

struct imgfs {
    const struct mount_options *opts;
    struct repo *repo;
    struct cache *cache;
    struct fetcher *fetcher;
    struct tree *tree;
    struct vm_registry *vms;
    struct prefetcher *prefetcher;
    struct trust *trust; /* what the repository is checked against (trust.h) */
    int tree_error; /* set while VM nodes are added at start-up */
    double started;    /* now_seconds() at mount */
    time_t mounted_at; /* wall clock at mount, for directory times */
    struct takeover *takeover; /* shared with the supervisor (takeover.h), or NULL */
    bool takeover_server;      /* this server took the mount over from another */
    atomic_bool restart_pending; /* imgfsctl restart, asked when its control file closes */
};

extern const struct fuse_lowlevel_ops imgfs_ops;

/* Runs one imgfsctl command written to .imgfs/control and returns the reply
 * in a malloc'd string: "ok[ DETAIL]\n" or "error SENTENCE\n". Commands are
 * one line of tab-separated fields:
 *   vm-create NAME BASE VERSION | vm-create NAME - SIZE
 *   vm-snapshot NAME SNAP       | vm-clone SRC SNAP|- DST
 *   vm-rm NAME|NAME@SNAP        | vm-export NAME ABSPATH
 *   vm-import ABSPATH NAME|-
 *   precopy NAME VERSION LIST|- RATE     | precopy-status NAME VERSION LIST|-
 *   unpin NAME VERSION LIST|-
 *   trace-start VM                       | trace-stop VM ABSPATH          */
/* Called when a control file handle is released. */
void fs_control_released(struct imgfs *fs);

char *control_execute(struct imgfs *fs, const char *command, size_t len);

/* Removes VM disk NAME (vm rm) or snapshot VM@SNAP, and their files in
 * vms/, with vm_remove()'s rules; implicit snapshots left without a clone
 * go too. 0 or a negative errno with one sentence in err. */
int fs_remove_disk(struct imgfs *fs, const char *name, char *err, size_t errlen);

/* After a takeover: counts the handles that earlier servers opened (the
 * VMs' open counts) and restarts prefetch replay for the open VM disks. */
void fs_restore_open_handles(struct imgfs *fs);

/* The base lookup that the VM registry uses (ctx is the struct imgfs). */
const struct vm_base *fs_lookup_base(void *ctx, const char *name, uint64_t version);

#endif
