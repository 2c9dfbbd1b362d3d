/* vm: VM disks made of a base version and a chain of differential layers.
 *
 * State directory (-o state=DIR):
 *   imgfs-state          marker "imgfs-state 1"
 *   vms/NAME.vm          one VM: its size, owner and mode, the exact identity
 *                        of its base (name, version, manifest hash), its live
 *                        chain of layers (bottom to top; the top one takes the
 *                        writes) and its snapshots, each a frozen chain; a
 *                        checksum line ends it; replaced atomically
 *   layers/ID.log        layers (see layer.h), shared by VMs and snapshots
 *
 * A disk reads each 4 KiB block from the topmost layer that owns it, else
 * from the base (through the chunk cache), else zeros for a blank disk.
 * A write of a partial block first copies the block up from below. Layers
 * below the top are frozen and never written again, which is what lets
 * snapshots and clones share them. A layer's files are removed when no VM or
 * snapshot references it any more.
 *
 * Locking, in this order: registry->lock guards the list of VMs, the layer
 * table and every VM's chain and snapshot list changes (and is held when the
 * attributes change, so save_vm() may read them). Each VM has write_ranges,
 * a range lock on the blocks a write or discard covers (overlapping writes
 * wait for each other, others run in parallel; held across the write's
 * local I/O); then write_lock (a rwlock),
 * held shared by writes and discards and exclusively by chain changes and
 * export, so that no write lands in a layer being frozen (writer-preferring:
 * a snapshot waits for the writes under way, not for every later one); and
 * chain_lock (a rwlock) that readers hold while they use the chain.
 * attr_lock, held only briefly and never across I/O, guards open_count,
 * deleted, mode, uid and gid, and each snapshot's open_count.
 *
 * Life of a VM: created (vm_create, vm_create_empty, vm_clone, vm_import)
 * -> opened and closed any number of times (open_count) -> removed by
 * vm_remove() once open_count is 0 (deleted is set; the struct lives until
 * the registry closes, so tree nodes may keep pointing at it). A snapshot
 * follows the same rule with its own open_count and removed flag.
 *
 * No VM lock is ever held while the network is waited on. registry->lock
 * (which control commands and stats take) may wait for a write_lock, and
 * write_lock and chain_lock are held across local layer I/O only: a write
 * that copies blocks up from the base first fetches those base chunks with
 * no lock held (vm_write; vm_write_start with no thread waiting), and reads take chain_lock only to map a range
 * and to build their reply from chunks already in hand (fs/ops.c).
 */
#ifndef IMGFS_VM_H
#define IMGFS_VM_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "disk.h"
#include "fetch.h"
#include "layer.h"
#include "manifest.h"
#include "rangelock.h"

#define VM_MAX_DEPTH DISK_MAX_DEPTH
/* 16 TiB (a log layer's data locations reach 2^48 blocks, and a ceiling
 * keeps absurd sizes out). Larger sizes (from the command line, a VM file
 * or a base) are refused before allocating. */
#define VM_MAX_SIZE (16ull << 40)
/* A new VM disk is readable and writable by its owner only (root until the
 * operator chowns it to the hypervisor's user), even with allow_other. */
#define VM_DEFAULT_MODE 0600
#define VM_MAX_SNAPSHOTS 256

struct prefetch_marks;
struct chunk_trace;


/* Finds base NAME@VERSION; returns NULL when the mount does not have it. */
typedef const struct vm_base *(*vm_base_lookup_fn)(void *ctx, const char *name, uint64_t version);


struct vm_snapshot {
    char name[65];
    struct disk disk;
    bool implicit;      /* made by vm_clone of a live VM: goes with its last clone */
    unsigned open_count; /* guarded by the VM's attr_lock */
    atomic_bool removed; /* set once by vm_remove_snapshot(); the struct lives on */
    struct vm_snapshot *next_removed;
};

/* A link in one of the registry's tables by name (vm.c). */
struct name_link {
    const char *name;
    struct name_link *next;
};

struct vm {
    char name[65];
    char base_name[65];
    uint64_t base_version;
    struct chunk_hash base_id;
    bool has_base;

    pthread_rwlock_t write_lock;
    struct range_lock write_ranges;
    pthread_rwlock_t chain_lock;
    pthread_mutex_t attr_lock;
    struct disk live;
    /* live.size for the readers that hold no lock (vm_size(), and the checks
     * before a write takes its locks): set with live.size, under write_lock
     * and chain_lock. Atomic because an ftruncate that sizes a blank disk
     * and the stat or write after it may run on two FUSE threads with only
     * the kernel's ordering of the two requests between them. */
    _Atomic uint64_t size;
    /* VM_MAX_SNAPSHOTS entries once the first is made, else NULL; changed
     * under registry->lock and chain_lock (exclusive), so readers hold
     * either (vm_snapshot_list takes chain_lock). */
    struct vm_snapshot **snapshots;
    unsigned snapshot_count;

    struct chunk_trace *trace; /* recording, or NULL; guarded by chain_lock */
    struct vm_snapshot *removed_snapshots; /* freed with the VM; guarded by registry->lock */
    struct name_link by_name; /* in the registry's name index; guarded by registry->lock */

    unsigned open_count;
    bool deleted;
    mode_t mode;
    uid_t uid;
    gid_t gid;
};

struct vm_registry;

/* Loads every VM of state_dir (creating the layout when it is empty). A VM
 * that cannot be loaded (missing layer, base missing or different) is
 * skipped and reported through vm_registry_errors(). */
int vm_registry_open(const char *state_dir, vm_base_lookup_fn lookup, void *lookup_ctx,
                     struct vm_registry **out, char *err, size_t errlen);
void vm_registry_close(struct vm_registry *reg);

/* Text of the per-VM load errors, "" when none. */
void vm_registry_errors(struct vm_registry *reg, char *out, size_t len);

/* Calls fn for each VM (not deleted) under the registry lock. */
void vm_registry_each(struct vm_registry *reg, void (*fn)(void *ctx, struct vm *vm), void *ctx);
struct vm *vm_find(struct vm_registry *reg, const char *name);

/* Commands. Each returns 0 or a negative errno with one sentence in err. */
int vm_create(struct vm_registry *reg, const char *name, const char *base_name, uint64_t base_version,
              uint64_t size, struct vm **out, char *err, size_t errlen);
int vm_snapshot(struct vm_registry *reg, struct vm *vm, const char *snap, char *err, size_t errlen);
int vm_clone(struct vm_registry *reg, struct vm *src, const char *snap, const char *dst, struct vm **out,
             char *err, size_t errlen);
int vm_remove(struct vm_registry *reg, struct vm *vm, char *err, size_t errlen);
/* Removes a VM that failed to load (its base is missing, say): its VM file,
 * and its layers unless another VM names them. -EBUSY if it is loaded. */
int vm_remove_unloaded(struct vm_registry *reg, const char *name, char *err, size_t errlen);
/* A disk made by creating a file in vms/: blank, of size 0 until
 * vm_resize_blank() gives it its size (as ftruncate after O_CREAT does). */
int vm_create_empty(struct vm_registry *reg, const char *name, mode_t mode, uid_t uid, gid_t gid, struct vm **out,
                    char *err, size_t errlen);
/* Sets the size of a blank disk that was never written and has no
 * snapshot; -EPERM for any other disk, whose size is fixed. */
int vm_resize_blank(struct vm_registry *reg, struct vm *vm, uint64_t size, char *err, size_t errlen);
/* Removes snapshot snap of vm: -EBUSY while it is open or a clone was made
 * from it. Its layers go when nothing else uses them. Implicit snapshots
 * (vm_clone of a live VM) are removed by vm_remove() of their last clone.
 * The snapshot's struct stays valid (removed is set) until the registry
 * closes. */
int vm_remove_snapshot(struct vm_registry *reg, struct vm *vm, const char *snap, char *err, size_t errlen);
/* The times of a disk (snapshot NULL: the live one): those of its top
 * layer, which every write moves; and setting the live disk's. */
int vm_get_times(struct vm *vm, const struct vm_snapshot *snapshot, struct timespec *atime, struct timespec *mtime);
int vm_set_times(struct vm *vm, const struct timespec times[2]);
int vm_set_attr(struct vm_registry *reg, struct vm *vm, const mode_t *mode, const uid_t *uid, const gid_t *gid);
/* Writes vm's export stream (format in vm.c: its own data and its base's
 * identity, with a checksum trailer) to fd, from its current position.
 * Writes to the VM wait meanwhile (write_lock), so fd should be a local
 * file of the daemon's own, never a user's path. stop (may be NULL) is
 * asked between pieces; when it says yes the export ends with -EINTR.
 * The caller keeps the VM open (vm_open) so that it cannot be removed.
 * 0, or a negative errno with one sentence in err; fd is not closed. */
int vm_export(struct vm *vm, int fd, bool (*stop)(void *ctx), void *stop_ctx, char *err, size_t errlen);
/* Recreates the VM exported in fd under name (NULL: the name it was
 * exported under). fd is a regular file of the daemon's own, read from its
 * start with no deadline: the copy that imgfsctl streamed into the state
 * directory (fs.h vm-import-stream), never a user's path. The trailer is
 * checked over the whole file before anything is made, and a refused
 * import leaves no VM, VM file or layer. The disk keeps the export's
 * permission bits (mode & 0666: no setuid, setgid or sticky bit) and
 * belongs to root: no owner is taken from the export. stop (may be NULL)
 * is asked between records; when it says yes the import is undone and
 * fails with -EINTR. fd is not closed.
 * 0, or a negative errno with one sentence in err that reads after
 * "cannot import FILE: " (it names no path). */
int vm_import(struct vm_registry *reg, int fd, const char *name, bool (*stop)(void *ctx), void *stop_ctx,
              struct vm **out, char *err, size_t errlen);
/* The largest export there can be: a 16T disk (VM_MAX_SIZE) whose every
 * 4 KiB block is a record of its own, with its header and trailer. */
#define VM_EXPORT_MAX_SIZE (VM_MAX_SIZE + VM_MAX_SIZE / LAYER_BLOCK_SIZE * 17 + 4096)
/* The smallest: the magic line and the trailer. */
#define VM_EXPORT_MIN_SIZE 31

/* I/O on a VM's live disk. vm_write waits for the base chunks a copy-up
 * needs; vm_write_start does not: it returns the write's result (0 or
 * -errno) when it could be done at once, or VM_WRITE_PENDING when done(arg,
 * result) will be called exactly once later, from a fetch engine thread,
 * after the chunks came (or failed at their deadline: -EIO). buf is copied;
 * the caller may reuse it when vm_write_start returns. flags: 0, or
 * VM_WRITE_THROUGH for a guest that wrote with O_DIRECT (the layer writes
 * the bytes to the device before the write completes: layer_write_through).
 * A disk does not grow: a write that does not fit inside it fails with
 * -ENOSPC, also one already under way when vm_resize_blank shrinks the
 * disk under it. A base chunk a copy-up needs that cannot be had fails it
 * with -EIO, or -ENOMEM when the daemon had no memory for it (fetch.h),
 * before any of it is written. A write is one layer write (the partial
 * blocks at its edges copied up into one buffer with the whole blocks
 * between), done whole or not at all: one that fails (-ENOMEM for that
 * buffer or the layer's index, -EIO, -ENOSPC) changed no block, so no
 * failure is reported for a write that changed some of its blocks. (A
 * flush inside the layer write that fails, -EIO, leaves the layer refusing
 * writes: layer.h.) */
int vm_write(struct vm *vm, struct fetcher *fetcher, const char *buf, size_t len, uint64_t off);
typedef void (*vm_write_done_fn)(void *arg, int result);
#define VM_WRITE_PENDING 1
#define VM_WRITE_THROUGH 1u
int vm_write_start(struct vm *vm, struct fetcher *fetcher, const char *buf, size_t len, uint64_t off,
                   unsigned flags, vm_write_done_fn done, void *arg);
/* Makes [off, off + len) read as zeros. What is past the disk's end, also
 * what vm_resize_blank put there while the discard ran, is left alone and
 * is no error (as a punch past a local file's end). */
int vm_discard(struct vm *vm, struct fetcher *fetcher, uint64_t off, uint64_t len);
int vm_flush(struct vm *vm);
uint64_t vm_layer_bytes(struct vm *vm);

/* ---- Verbs for the file system ----
 * fs/ reaches a VM only through these (and the commands above): it never
 * reads struct vm's fields or takes its locks itself. None of them waits on
 * the network; each holds attr_lock or chain_lock only for its own copy. */

/* The VM's name and its disk's size (the live disk's, which its snapshots
 * share). */
const char *vm_name(const struct vm *vm);
uint64_t vm_size(const struct vm *vm);
/* The base under the live disk (snap NULL) or under snapshot snap; NULL for
 * a blank disk. It never changes. */
const struct vm_base *vm_get_base(const struct vm *vm, const struct vm_snapshot *snap);

/* The VM's snapshots, copied into out in their order under chain_lock
 * (a snapshot or its removal may change the list meanwhile); returns how
 * many. Then their names, and whether one was removed (the struct stays
 * valid until the registry closes). */
unsigned vm_snapshot_list(struct vm *vm, struct vm_snapshot *out[VM_MAX_SNAPSHOTS]);
const char *vm_snapshot_name(const struct vm_snapshot *snap);
bool vm_snapshot_removed(const struct vm_snapshot *snap);

/* The owner and mode of the VM's disks, read together. */
struct vm_attr {
    mode_t mode;
    uid_t uid;
    gid_t gid;
};
void vm_get_attr(struct vm *vm, struct vm_attr *out);

/* An open of the live disk (snap NULL: -ENOENT once the VM is removed) or
 * of snapshot snap, which counts for the VM too: vm_remove waits for both.
 * vm_close undoes one open; vm_open_taken_over counts an open that a
 * previous server made (takeover.h), whatever has happened since. */
int vm_open(struct vm *vm, struct vm_snapshot *snap);
void vm_close(struct vm *vm, struct vm_snapshot *snap);
void vm_open_taken_over(struct vm *vm, struct vm_snapshot *snap);

/* A consistent copy of what status shows of one VM. */
struct vm_stats {
    bool has_base;
    char base_name[65];
    uint64_t base_version;
    uint64_t size;
    unsigned open_count; /* of the disk and its snapshots */
    unsigned depth;      /* layers in the live chain */
    unsigned snapshots;
    uint64_t top_owned_blocks;
    struct layer_stats top; /* of the writable layer */
    uint64_t layer_bytes;   /* vm_layer_bytes */
};
void vm_get_stats(struct vm *vm, struct vm_stats *out);

/* Recording the base chunks that the live disk's reads use (prefetch.h):
 * vm_trace_start fails (-EINVAL without a base, -EBUSY when one is already
 * recording, one sentence in err); vm_trace_stop hands the recording to the
 * caller (trace_finish), or returns NULL when there was none. */
int vm_trace_start(struct vm *vm, char *err, size_t errlen);
struct chunk_trace *vm_trace_stop(struct vm *vm);

/* A read of a disk (snap NULL: the live one) holds its chain stable from
 * vm_read_begin to vm_read_end (chain_lock for reading: held across local
 * layer I/O and the building of a reply only, never across a network
 * wait), so the layers that disk_map() gives for the returned disk stay
 * valid in between. *trace (may be NULL) gets the live disk's recording,
 * or NULL: the read notes the base chunks it uses there (trace_note)
 * before vm_read_end. */
const struct disk *vm_read_begin(struct vm *vm, const struct vm_snapshot *snap, struct chunk_trace **trace);
void vm_read_end(struct vm *vm);
/* SEEK_DATA / SEEK_HOLE on a disk (disk_seek) with its chain held. */
int64_t vm_seek(struct vm *vm, const struct vm_snapshot *snap, uint64_t off, int whence);


#endif
