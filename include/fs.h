/* fs: the FUSE side of imgfs (low-level API).
 *
 * Base version files are served read-only from pinned chunks in the cache packs with
 * zero-copy replies (splice from the pack file), and with keep_cache so
 * that the kernel page cache keeps their pages across opens: the bytes of a
 * version never change. With -o base_passthrough, an open of a version
 * wholly held in the cache may instead be handed to the kernel, which reads
 * the version's checked flat file itself (passthrough.h). Status files are rendered when opened and served
 * with direct_io, so `cat` always sees a fresh, complete snapshot.
 *
 * Contract: struct imgfs is created by the daemon before the session starts
 * and outlives it; every member is thread-safe (see each module's header).
 */
#ifndef IMGFS_FS_H
#define IMGFS_FS_H

#include <fuse_lowlevel.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "cache.h"
#include "fetch.h"
#include "prefetch.h"
#include "options.h"
#include "passthrough.h"
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
    struct passthrough *passthrough; /* base files read by the kernel (passthrough.h) */
    int tree_error; /* set while VM nodes are added at start-up */
    double started;    /* now_seconds() at mount */
    time_t mounted_at; /* wall clock at mount, for directory times */
    struct takeover *takeover; /* shared with the supervisor (takeover.h), or NULL */
    bool takeover_server;      /* this server took the mount over from another */
    atomic_bool restart_pending; /* imgfsctl restart, asked when its control file closes */
};

extern const struct fuse_lowlevel_ops imgfs_ops;

/* Work that a control command leaves on its handle: an import stream that
 * takes the handle's next writes, then what may wait on a disk, for the
 * first read of the handle, where the kernel holds no other command back
 * (see control_execute). */
struct control_deferred {
    enum { CONTROL_EXPORT, CONTROL_IMPORT } kind;
    char vm[65];       /* export: the VM; import: its new name, or "" for the exported one */
    int fd;            /* import: the staged copy, an unnamed file of the state directory; else -1 */
    uint64_t size;     /* import: the bytes imgfsctl announced */
    uint64_t received; /* import: those in fd so far, at offsets 0..received */
    char error[320];   /* import: why the stream failed (then fd is -1), or "" */
};

/* What a control command leaves on its handle of .imgfs/control. */
struct control_answer {
    char *text; /* malloc'd: "ok[ DETAIL]\n" or "error SENTENCE\n", then any payload; "" when deferred */
    size_t len; /* of text, payload included */
    struct control_deferred *deferred; /* malloc'd (control_deferred_free), or NULL */
};

/* Runs one imgfsctl command written to .imgfs/control into *out (0, or
 * -ENOMEM with nothing in out). Commands are one line of tab-separated
 * fields:
 *   vm-create NAME BASE VERSION | vm-create NAME - SIZE
 *   vm-snapshot NAME SNAP       | vm-clone SRC SNAP|- DST
 *   vm-rm NAME|NAME@SNAP        | vm-export NAME
 *   vm-import-stream NAME|- SIZE
 *   precopy NAME VERSION LIST|- RATE     | precopy-status NAME VERSION LIST|-
 *   unpin NAME VERSION LIST|-
 *   trace-start VM                       | trace-stop VM
 *
 * The kernel runs writes to the control file one at a time (the inode
 * lock), so every command answers its write without waiting on a network
 * or a user's file, and the daemon opens no file for a user (imgfsctl
 * does, userfile.h):
 *  - trace-stop answers "ok SIZE\n" followed by the list's SIZE bytes;
 *  - vm-export is deferred: its handle reads as "" until it is first read
 *    (reads run in parallel), when control_run_deferred does the work. The
 *    export is staged into an unnamed file of the state directory and the
 *    handle then reads as "ok SIZE\n" followed by those SIZE bytes;
 *    imgfsctl copies them to the operator's file.
 *  - vm-import-stream is refused at once when SIZE cannot be an export,
 *    the state directory lacks room for twice SIZE (the staged copy and
 *    the VM's data) or NAME is taken. Else it answers "ok stream\n", which
 *    imgfsctl reads before it sends a byte (a daemon without the command
 *    answers an error, so no byte of a file is ever run as a command), and
 *    every later write to the handle is the next bytes of the export file
 *    that imgfsctl read, at offsets 0..SIZE (control_receive; each write
 *    waits only on the daemon's own disk), never a command. Once they are
 *    all in (or the stream failed), the next read (deferred, as for an
 *    export) checks and imports them and answers "ok\n" or an error. A
 *    handle released before that (a killed imgfsctl) takes its staged copy
 *    with it: nothing is left; an interrupted read stops the import and
 *    undoes it.
 * An older imgfsctl sends "vm-import ABSPATH NAME|-", for which the daemon
 * opened the path itself: that command is gone, and is answered as an
 * unknown command. */
int control_execute(struct imgfs *fs, const char *command, size_t len, struct control_answer *out);

/* True when d is an import stream: every write to its handle is its bytes. */
bool control_receiving(const struct control_deferred *d);
/* True when a read may run d: an export, or an import stream that has all
 * its bytes or failed (before that, a read gets the handle's text). */
bool control_ready(const struct control_deferred *d);
/* Appends the len bytes written at offset off of an import stream to its
 * staged copy: 0, or a negative errno when they do not follow on, run past
 * SIZE or find no room; that ends the stream (its copy goes, every later
 * write fails, and the read answers why). */
int control_receive(struct imgfs *fs, struct control_deferred *d, const void *buf, size_t len, uint64_t off);

/* Does the deferred work d (see above): *answer gets the malloc'd answer
 * line ("error SENTENCE\n" with -errno returned); an export's unnamed file
 * goes to *fd_out with its size in *size_out (else *fd_out is -1). stop is
 * asked between pieces of an export or an import (the reader was
 * interrupted: -EINTR, and nothing is imported). d stays the caller's. */
int control_run_deferred(struct imgfs *fs, const struct control_deferred *d, bool (*stop)(void *ctx), void *stop_ctx,
                         int *fd_out, uint64_t *size_out, char **answer);

/* Closes d's staged copy and frees it (NULL is fine). */
void control_deferred_free(struct control_deferred *d);
/* Frees what out holds. */
void control_answer_free(struct control_answer *out);

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
