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

/* What a control command leaves on its handle of .imgfs/control. */
struct control_answer {
    char *text;  /* malloc'd: "ok[ DETAIL]\n" or "error SENTENCE\n", then any payload */
    size_t len;  /* of text, payload included */
    char export_vm[65]; /* set by vm-export: text is "", and the export is
                         * staged with control_stage_export when the handle
                         * is first read */
};

/* Runs one imgfsctl command written to .imgfs/control into *out (0, or
 * -ENOMEM with nothing in out). Commands are one line of tab-separated
 * fields:
 *   vm-create NAME BASE VERSION | vm-create NAME - SIZE
 *   vm-snapshot NAME SNAP       | vm-clone SRC SNAP|- DST
 *   vm-rm NAME|NAME@SNAP        | vm-export NAME
 *   vm-import ABSPATH NAME|-
 *   precopy NAME VERSION LIST|- RATE     | precopy-status NAME VERSION LIST|-
 *   unpin NAME VERSION LIST|-
 *   trace-start VM                       | trace-stop VM
 *
 * The kernel runs writes to the control file one at a time (the inode
 * lock), so every command answers without waiting on anything slow, and
 * the daemon writes no file for a user: trace-stop answers "ok SIZE\n"
 * followed by the list's SIZE bytes, and vm-export answers nothing until
 * its handle is read (reads run in parallel), when control_stage_export
 * writes the export into an unnamed file of the state directory and the
 * handle reads as "ok SIZE\n" followed by those SIZE bytes. imgfsctl copies
 * the payload to the operator's file (imgfsctl.h, userfile.h). */
int control_execute(struct imgfs *fs, const char *command, size_t len, struct control_answer *out);

/* Stages the export of VM name (see above): *fd_out gets the unnamed file
 * holding its size_out bytes, *answer the malloc'd answer line ("ok SIZE\n",
 * or "error SENTENCE\n" with -errno returned and *fd_out -1). stop is asked
 * between pieces (the reader was interrupted: -EINTR). */
int control_stage_export(struct imgfs *fs, const char *name, bool (*stop)(void *ctx), void *stop_ctx, int *fd_out,
                         uint64_t *size_out, char **answer);

/* Called when a control file handle is released. */
void fs_control_released(struct imgfs *fs);

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
