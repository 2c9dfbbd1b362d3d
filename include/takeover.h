/* takeover: how a FUSE mount outlives the process that serves it.
 *
 * Processes. `imgfs REPO MNT` runs a supervisor (fs/supervisor.c) that
 * mounts, keeps the /dev/fuse descriptor for the life of the mount and runs
 * the serving process: it re-executes the imgfs binary by the path it was
 * started from (so an upgraded package takes effect) with IMGFS_SERVE in
 * its environment. The supervisor reads and answers no FUSE request, loads
 * no repository and no VM; it forks, waits, and signals. The server does
 * everything else.
 *
 * Why the requests of a dead server are not lost. Every server uses the
 * supervisor's descriptor itself (inherited, never cloned with
 * FUSE_DEV_IOC_CLONE): all readers share one struct file, so one
 * struct fuse_dev and one processing queue. The kernel ends the requests on
 * a processing queue only when that file is released (fuse_dev_release ->
 * end_requests), and the supervisor keeps it open. A request that a dying
 * server had read but not answered stays on the processing queue; the next
 * server writes FUSE_NOTIFY_RESEND (notify code 7: a 16-byte
 * fuse_out_header with unique 0 and error 7; Linux 6.9+, protocol 7.40,
 * announced by FUSE_HAS_RESEND in the INIT flags), and the kernel moves
 * those requests back to the pending queue with bit 63 set in their unique,
 * which the new server echoes in its reply. Requests never read are simply
 * read by the new server. Re-executing an operation must therefore be
 * harmless: reads and lookups are; a write rewrites the same bytes; an open
 * whose reply was lost counts once more (see the handle table); a create or
 * an unlink sent again finds its work done and answers as if it had done it
 * (serve_request_is_resent() in serve.h); a control command sent again on a
 * handle of the dead server is refused with EBADF and not run.
 *
 * Why libfuse 3.14 can serve a connection it did not INIT. A fresh
 * fuse_session answers everything before INIT with EIO, and 3.14 has no API
 * to restore a negotiated session. The first server keeps the kernel's INIT
 * request bytes here (serve.c's own receive loop sees them before
 * libfuse). The next server opens its session on /dev/fd/N (libfuse's
 * documented way to use a descriptor it did not open) and passes the same
 * INIT bytes to fuse_session_process_buf: libfuse negotiates from the same
 * kernel offer (protocol minor, flags, max_readahead, max_pages) with the
 * same op_init, so it reaches the same state the kernel holds: proto_minor
 * (reply layouts), want (splice, writeback cache, parallel dirops...),
 * max_write, max_readahead, bufsize, time_gran. op_init then checks its
 * result against the values the first server negotiated (kept below) and
 * forces them, so even an upgraded binary whose op_init would ask for
 * something else believes what the kernel was told. Its INIT reply goes out
 * with the INIT request's unique, which the kernel finished long ago
 * (uniques only grow): request_find fails, the write returns ENOENT and
 * libfuse drops it silently. If the first server died before answering
 * INIT, that same reply is the answer the kernel still waits for.
 *
 * Stable identities. Node ids and file handles live in this shared memory,
 * which belongs to the supervisor and so lives as long as the connection:
 *   - the inode map: the (parent, kind, name) of every node ever given an
 *     inode number; a new server gives a node the number it had (tree.c);
 *   - the handle table: one slot per open base, snapshot or VM disk; the
 *     file handle is the slot number + 1. A new server rebuilds the VMs'
 *     open counts (which `vm rm` refuses on) and restarts prefetch replay for
 *     every open VM disk from it. A slot is taken before the open is
 *     answered, so an open re-sent after a crash counts twice: the count can
 *     only be too high (vm rm refused), never too low.
 * Status and control files keep their text in the server; a handle from a
 * previous server fails with EBADF, which imgfsctl reports as such.
 *
 * Writes answered but not yet flushed. A VM layer keeps such writes as
 * pending entries in memory until a flush writes their record; a server
 * killed in between would take them along, and the flush that the kernel
 * then sends again would find nothing to do. So the layers keep a copy of
 * their pending entries in the supervisor's tmpfs directory (layer_dir,
 * /dev/shm/imgfs-layers-RANDOM, which lives as long as the supervisor:
 * owner_dir_create() in owner.h; layer_share_pending() in layer.h), and the
 * next server takes them over with the data they name, which is in the page cache.
 * The same directory holds what servers of the mount checked of the flat
 * files of -o base_passthrough (flat.h, "Takeover"), so that a new server
 * does not read again a file that has not changed since.
 *
 * Kernels without FUSE_NOTIFY_RESEND: a request a dead server held would
 * hang, so after a crash the supervisor ends the mount as before (the
 * next mount replaces the dead one), and only `imgfsctl restart`, which lets
 * the old server finish what it holds, hands over. The server logs which
 * case applies at start.
 *
 * Upgrades: the region's layout has a number (TAKEOVER_LAYOUT); a binary
 * whose layout differs cannot take over, dies at start-up, and the
 * supervisor (which stays the binary that mounted) gives up after its
 * retries: change the layout only with a release note that says "remount".
 * A server re-reads the options and config file, but refuses to serve with
 * a state or cache directory other than the ones the supervisor locked.
 *
 * Concurrency: exactly one server runs at a time (the supervisor starts the
 * next only after the previous one has exited), and within it the writers
 * are: handle slots (atomic compare-and-swap), the inode map (under
 * tree->lock), the rest (the main thread at start-up). The supervisor only
 * reads, between servers or racily for a status line.
 */
#ifndef IMGFS_TAKEOVER_H
#define IMGFS_TAKEOVER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define TAKEOVER_MAGIC 0x696d67667374616bull /* "imgfstak" */
#define TAKEOVER_LAYOUT 1
#define TAKEOVER_MAX_HANDLES 16384
#define TAKEOVER_MAX_INODES 65536
#define TAKEOVER_INIT_MAX 512

/* The environment variable that makes imgfs a server:
 * "FUSE_FD,STATE_FD,READY_FD" (READY_FD -1 when nobody waits). */
#define TAKEOVER_ENV "IMGFS_SERVE"

/* A server exits with this status after a hand-over (imgfsctl restart). */
#define TAKEOVER_EXIT_HANDED_OVER 75

struct takeover_inode {
    uint64_t parent; /* 0: detached, never given again */
    uint32_t kind;   /* enum node_kind */
    char name[84];
};

struct takeover_handle {
    _Atomic uint64_t ino; /* 0: free */
    /* A VM disk (vms/VM.raw), for the supervisor. Set by the server that
     * just took the slot, after ino: atomic because the previous holder
     * may have written it on another thread, with only the kernel's
     * ordering of open, release and open between them; a supervisor reading
     * in that moment may see the previous holder's value, which only
     * changes the names it logs. */
    _Atomic uint32_t vm_disk;
    /* A base file opened with FUSE passthrough: the backing id its open
     * reply carried (serve.h), 0 otherwise. Set by the server that took the
     * slot, right after the open's mode is decided and before the reply;
     * a new server rebuilds each base's passthrough opens and the id they
     * share from it (passthrough.h). Was an unused word (layout 1). */
    _Atomic uint32_t backing_id;
};

struct takeover {
    uint64_t magic;
    uint32_t layout;
    /* Written by the supervisor. */
    int64_t started;          /* wall clock of the mount */
    _Atomic uint64_t takeovers; /* servers started after the first */
    _Atomic int32_t server_pid;
    int32_t supervisor_pid;
    /* Requests the current server has finished: 0 when it dies means it
     * died starting up (or on its first request), which the supervisor
     * counts towards giving up. Zeroed by the supervisor before each start. */
    _Atomic uint64_t requests_done;
    /* The directories the supervisor locked (owner.h): a server started
     * with other ones (a changed config file) refuses to serve. */
    char state_dir[1024], cache_dir[1024];
    /* A tmpfs directory of the supervisor's for the layers' pending
     * entries (layer_share_pending() in layer.h) and the records of flat
     * files checked (NAME@V.flat, flat.h), "" when there is none. */
    char layer_dir[128];
    /* Written by the first server that read INIT. */
    uint32_t init_len;
    uint8_t init[TAKEOVER_INIT_MAX];
    uint32_t negotiated; /* the values below are set */
    uint32_t want, max_write, max_readahead, max_background, congestion_threshold, time_gran;
    uint32_t has_resend; /* the kernel offered FUSE_HAS_RESEND */
    /* The first server's INIT reply asked for FUSE_PASSTHROUGH, which the
     * kernel offered (passthrough.h). In what was padding before
     * inode_count, so layout 1 is unchanged (0 from an older server). */
    uint32_t passthrough;
    /* Node ids. */
    uint64_t inode_count;
    struct takeover_inode inodes[TAKEOVER_MAX_INODES]; /* inodes[ino - 1] */
    struct takeover_handle handles[TAKEOVER_MAX_HANDLES];
};

/* Supervisor: a shared, zeroed region in a memfd (inherited by servers).
 * Returns the mapping and its descriptor in *fd, or NULL with errno. */
struct takeover *takeover_create(int *fd);
/* Server: maps the supervisor's region. NULL with errno, or EPROTO when
 * its layout is not this binary's. */
struct takeover *takeover_attach(int fd);

/* Called with every request before libfuse sees it; keeps the first INIT. */
void takeover_note_request(struct takeover *t, const void *bytes, size_t len);
/* Whether an INIT request offers FUSE_NOTIFY_RESEND. */
bool takeover_init_has_resend(const void *bytes, size_t len);

/* Whether an INIT request offers FUSE_PASSTHROUGH (Linux 6.9+ built with
 * CONFIG_FUSE_PASSTHROUGH). */
bool takeover_init_has_passthrough(const void *bytes, size_t len);

/* Takes a handle slot for ino; returns the file handle (slot + 1), or 0
 * when the table is full. */
uint64_t takeover_handle_open(struct takeover *t, uint64_t ino, bool vm_disk);
/* Records the backing id of fh's passthrough open (0: none). */
void takeover_handle_set_backing(struct takeover *t, uint64_t fh, uint32_t backing_id);
/* The backing id recorded for fh (0 when none or fh is not a slot). */
uint32_t takeover_handle_backing(struct takeover *t, uint64_t fh);
/* Frees the slot of fh if it holds ino, its backing id zeroed first;
 * returns whether it did. */
bool takeover_handle_release(struct takeover *t, uint64_t fh, uint64_t ino);

/* Writes FUSE_NOTIFY_RESEND to the connection. 0 or a negative errno. */
int takeover_notify_resend(int fuse_fd);

#endif
