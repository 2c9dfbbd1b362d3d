/* layer: one differential layer of a VM disk.
 *
 * A layer holds some 4 KiB blocks of a disk of a fixed size. Each block is
 * either not owned (the disk reads it from below: a lower layer or the
 * base), owned with data, or owned and zero (a discarded range). A block
 * never goes back to "not owned". How a layer keeps its blocks on disk is
 * known to layer.c alone; callers use the functions below.
 *
 * On disk, in the state directory, a layer ID is one file, layers/ID.log,
 * a log in 4 KiB blocks (integers little-endian):
 *   block 0      header: "imgfs-layer-log 1\n", disk size, a random file id
 *                and an xxh3-64 checksum of those
 *   then         data blocks and records, only ever appended. A record block
 *                starts with magic, entry count, sequence number (1, 2, ...),
 *                the file id, the block of the next record, where its
 *                continuation blocks are, and an xxh3-64 checksum over the
 *                record and its continuations. An entry (32 bytes) says
 *                "disk blocks [b, b+n) are data at log block L, whose bytes
 *                hash to S" or "are owned and zero".
 * The first record is at block 1; each names where the next one goes, so a
 * flush is: write the data, write one record, one fdatasync(). Open replays
 * the records in order and stops at the first that is not valid. Records
 * are written one flush after another, so every record before the last
 * valid one is durable with its data; the last one's data is checked
 * against its hashes, and the whole record is dropped when any of it did
 * not reach the disk (a torn flush whose fsync never returned).
 *
 * When the guest flushes often and little (at most 1 MiB of data per
 * flush), the log past its tail is written with zeros (with O_DIRECT for a
 * guest that writes with O_DIRECT, so that its flushes write none back) and
 * synced ahead of time, a quarter of the log at a time (4 to 16 MiB; never on tmpfs, nor
 * with less than 64 such windows free, nor past 1 GiB zeroed ahead by all
 * the layers of the process: see Disk), so that a flush writes data over
 * allocated blocks: its fdatasync() writes the data and flushes the device,
 * with no journal commit of new blocks and size. Open cuts those zeros.
 * A guest that writes with O_DIRECT and flushes more than that gets the log
 * allocated (fallocate) instead of written, by its flushes themselves, just
 * before their fdatasync: three flushes' worth past the tail (192 MiB at
 * most) once less than two are left. Zeros would double what its flushes
 * write, and its writes could not go with O_DIRECT without extending the
 * file. Writes of guests that use O_DIRECT go there with O_DIRECT
 * (layer_write_through), so a flush then writes only its record, itself with
 * O_DIRECT into those blocks (zeros written ahead with O_DIRECT go into
 * blocks allocated first, so that they never hold the guest's writes behind
 * the file's lock). Page-cache
 * and O_DIRECT writes to a log take turns, never both at once, so that no
 * cached page of a block written through keeps its old bytes.
 *
 * Overwritten data stays in the log as dead space. When dead space exceeds
 * the live data and 64 MiB, a background thread compacts the layer: it
 * copies the live blocks to ID.log.new and syncs it while writes and
 * flushes go on (yielding to them), copying again what they changed until
 * little is left. Then it holds writes and flushes only while it copies
 * that last little and switches the layer to the new file (no I/O but the
 * copy). Writes go on into the new file at once; flushes wait while it is
 * synced, renamed over ID.log and the directory synced, since only then
 * does a crash open it. A crash before the rename leaves ID.log with every
 * flushed write (ID.log.new is deleted at open, except by a takeover that
 * finishes the switch: layer_share_pending). For tests, the environment
 * variable IMGFS_LAYER_COMPACT_MIN replaces the 64 MiB,
 * IMGFS_TEST_COMPACT_PAUSE_FILE=PATH makes a compaction that reaches its
 * switch while PATH exists pause there, before the sync and rename, until
 * PATH is removed (writes go on meanwhile, flushes wait);
 * IMGFS_LAYER_ZERO_AHEAD=0 switches zeroing ahead off (a process that forks
 * children, as the crash tests do, then starts no background thread);
 * IMGFS_LAYER_THROUGH=0 makes layer_write_through() a layer_write() (for
 * comparisons), and IMGFS_LAYER_THROUGH=all makes it write with O_DIRECT
 * past the zeroed blocks too (for the crash tests, which zero nothing).
 * That one is read when a layer is opened.
 *
 * Old layers (ID.data, a sparse file of the disk's size, and ID.map, an
 * ownership bitmap after the header "imgfs-layer-map 1") are converted at
 * open: the log is built as ID.log.tmp, synced and renamed, and only then
 * are the old files removed.
 *
 * Memory: 8 bytes per owned block with data, in 4 KiB nodes of 512 blocks
 * (a 2 MiB range of the disk) created when first written; ranges owned as
 * zeros cost nothing. Nothing is allocated in proportion to the disk's
 * size except one pointer per GiB.
 *
 * Disk: the log's blocks, plus the zeros ahead of its tail. Those count
 * against the process's 1 GiB (IMGFS_LAYER_AHEAD_HOST_MAX for tests) from
 * when they are written until the layer writes over them, writes nothing
 * for 60 s (layer_set_ahead_idle) or closes, so a host with 2,000 VMs that
 * write holds 1 GiB of them, not 16 MiB a VM, and VMs that stopped writing
 * leave theirs to the ones that write. An idle layer's log is cut at its
 * tail, as if it had never zeroed (its times stay); its next small flush
 * asks for zeros again. A zeroing or allocation ahead that fails (a full
 * disk) cuts the log the same way past what it had before, at once, and
 * the layer prepares no more.
 * Times set while zeros are written stay, as do those the zeros moved
 * (put back), unless a write or punch came since.
 * layer_ahead_host_bytes() tells how much is held.
 *
 * Promises (what callers and the crash tests rely on):
 *   1. After layer_flush() returns 0, every write and punch that returned
 *      before it was called survives a kill -9 of the daemon or a power loss.
 *   2. After a crash, each block not flushed shows either its new bytes or
 *      its old ones; an unflushed write never changes any other block.
 *   3. layer_open() after a crash needs no repair step from anyone.
 * "A power loss" is taken as: every change to a file since its last
 * fdatasync() (pwrite, O_DIRECT or not, hole punch, size change) may be
 * lost, kept or torn at 512-byte sectors, in any combination; creations,
 * renames and unlinks in the directory since its last fsync() are kept as
 * a prefix (ext4's journal order), and neither kind is durable otherwise.
 * The argument: a flush writes its record after its data and syncs both
 * once; a record is valid only when its magic, sequence number, file id,
 * checksum and entries' bounds are, so a torn or lost record ends the
 * replay, and the last valid one's data is checked against its hashes (a
 * record after it was written only once it was synced: I2 in layer.c);
 * data is only ever appended, never overwritten in place, so an unflushed
 * write can only be lost; a compaction's file is synced before it is
 * renamed over ID.log and the directory synced before a flush returns
 * again. tests/unit/test_layer_power.c checks this against a model of
 * such power cuts (its header says what the model does not simulate).
 *
 * A flush whose fdatasync() fails leaves the layer refusing writes (-EIO)
 * until it is opened again: what reached the disk is then unknown.
 *
 * Threads: layer_owns(), layer_extent_at() and layer_read() may run from any
 * thread at any time. layer_write() and layer_punch() may run concurrently
 * with each other on disjoint block ranges; the caller orders writes whose
 * blocks overlap. layer_flush() may run concurrently with all of them, and
 * does not wait for the writes under way (a write that returns after it was
 * called may go in the next flush instead), except behind a zeroing pass,
 * an idle layer's give-back or a compaction's switch that is waiting for
 * them: those take the layer exclusively; and a large flush of a guest
 * that writes with O_DIRECT, when it allocates ahead, waits (in the file
 * system) for the O_DIRECT writes under way.
 */
#ifndef IMGFS_LAYER_H
#define IMGFS_LAYER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#define LAYER_BLOCK_SIZE 4096u
#define LAYER_ID_LEN 16

struct layer;

/* Keeps a copy of every layer's pending entries (written and answered, not
 * yet in a durable record) in DIR/ID.pending, DIR being a tmpfs that lives
 * exactly as long as the mount's supervisor (takeover.h). A server that
 * opens the layer after the previous one was killed between a write and its
 * flush gets those writes back (their data is in the page cache of the
 * log), so a flush the kernel sends again to it still keeps promise 1.
 * It names the log it belongs to: when that is an ID.log.new that a
 * compaction had switched to but not renamed, the opening server syncs and
 * renames it first (its writes since the switch are only there).
 * Entries are appended through a shared mapping of that file (no system
 * call per write); a write whose entry cannot be kept there (a full tmpfs)
 * is flushed before it returns, so a takeover never lacks an answered write.
 * A flush drops the entries it made durable, so the file holds at most
 * about twice the entries pending, however long writes go on, and its size
 * follows: once a burst is flushed, the file shrinks back (by the flush,
 * never by a write).
 * After a reboot the tmpfs is gone, and the promises are as above. Call
 * once at start-up, before any layer is opened; NULL or "" for none. */
void layer_share_pending(const char *dir);

/* Creates a new, empty layer with a fresh random ID in dir. */
int layer_create(const char *dir, uint64_t size, struct layer **out);
/* Opens an existing layer; -EBADMSG if its files do not match size. */
int layer_open(const char *dir, const char *id, uint64_t size, struct layer **out);
void layer_close(struct layer *layer);
/* Removes a layer's files. */
int layer_remove(const char *dir, const char *id);

const char *layer_id(const struct layer *layer);
/* The disk size the layer was opened with. */
uint64_t layer_size(const struct layer *layer);

/* True when the layer owns block (data or zero). */
bool layer_owns(const struct layer *layer, uint64_t block);

/* Where the bytes of the layer at off come from, for at most max_len bytes
 * (clipped to the disk's size): one run of blocks of one kind.
 *   LAYER_EXTENT_UNOWNED  read them from below the layer
 *   LAYER_EXTENT_ZERO     owned, reads as zeros (a hole for SEEK_DATA)
 *   LAYER_EXTENT_DATA     owned: len bytes of fd at pos (zero-copy capable)
 * A DATA extent keeps fd open and its bytes unchanged until
 * layer_extent_release(); release every extent, of any kind, exactly once. */
enum layer_extent_kind { LAYER_EXTENT_UNOWNED, LAYER_EXTENT_ZERO, LAYER_EXTENT_DATA };
struct layer_extent {
    enum layer_extent_kind kind;
    uint64_t len;
    int fd;
    uint64_t pos;
    void *pin; /* private to layer.c */
};
int layer_extent_at(struct layer *layer, uint64_t off, uint64_t max_len, struct layer_extent *out);
void layer_extent_release(struct layer *layer, struct layer_extent *extent);

/* Reads len bytes at off, every block of which the layer owns (-EINVAL
 * otherwise). */
int layer_read(struct layer *layer, void *buf, size_t len, uint64_t off);

/* Writes whole blocks: off is a multiple of LAYER_BLOCK_SIZE and len is too,
 * unless the write ends at the disk's end. The blocks become owned. */
int layer_write(struct layer *layer, const void *buf, size_t len, uint64_t off);
/* The same, for a guest that wrote with O_DIRECT: where the log's blocks
 * are zeroed ahead, the bytes are written with O_DIRECT (from a copy when
 * buf is not 4 KiB aligned) and are on the device when it returns, so the
 * next flush writes only its record. Elsewhere (no zeros ahead, a file
 * system without O_DIRECT, a short last block) it is layer_write. Either
 * way the promises below hold alike, and reads see the new bytes. */
int layer_write_through(struct layer *layer, const void *buf, size_t len, uint64_t off);

/* Makes blocks [first, first+count) owned and zero, freeing their space:
 * it flushes (so it returns once the punch, and all before it, is durable),
 * then gives the log space of the dead data back to the file system. */
int layer_punch(struct layer *layer, uint64_t first, uint64_t count);

/* Makes every write and punch that returned before this call durable. */
int layer_flush(struct layer *layer);

/* The times of the layer's data (its data file's: a write or punch moves
 * the modification time), and setting them (UTIME_NOW and UTIME_OMIT
 * work as in utimensat). */
int layer_get_times(const struct layer *layer, struct timespec *atime, struct timespec *mtime);
int layer_set_times(struct layer *layer, const struct timespec times[2]);

/* Blocks the layer owns. */
uint64_t layer_owned_blocks(const struct layer *layer);
/* Bytes of space the layer's files use on disk, not counting what is
 * zeroed ahead of the tail. The answer is kept until the layer's change
 * counter moves (status reads it for every layer of every VM: one fstat
 * per layer and change, not per read). The rule: whatever changes the
 * current log's size, allocation or tail, or which file is current, bumps
 * the counter after the change, success or not. The sites: a write (the
 * tail, the data), a flush (its record's blocks), a punch (its holes), the
 * switch of a compaction (the new file), the cut of an idle layer's zeros
 * (give_back_ahead), and every zeroing or allocation ahead (zero_ahead,
 * allocate_ahead: once at its end, which covers the cut of a failed one). A call that runs during a change answers with the state
 * before or after it, and the next call after the change asks again. */
uint64_t layer_allocated_bytes(const struct layer *layer);
/* Bytes that all open layers hold zeroed ahead of their tails, as counted
 * against the process's budget (see Disk above). */
uint64_t layer_ahead_host_bytes(void);
/* How long (ns) a layer that holds zeros ahead may write nothing before it
 * gives them back (Disk above): 60 s unless changed (tests). */
void layer_set_ahead_idle(uint64_t ns);

struct layer_stats {
    uint64_t owned_blocks;
    uint64_t data_blocks;      /* owned blocks with data (live) */
    uint64_t log_blocks;       /* blocks of the log: live, dead and records */
    uint64_t compactions;      /* since open */
    uint64_t compact_ns;       /* the last compaction, start to end */
    uint64_t compact_pause_ns; /* of which writes were held */
    uint64_t compact_flush_hold_ns; /* and flushes (writes, then the sync) */
    uint64_t compact_bytes;    /* copied by compactions, in all */
    uint64_t through_blocks;   /* written with O_DIRECT since open (layer_write_through) */
};
void layer_stats(const struct layer *layer, struct layer_stats *out);

/* Compacts now, in the caller's thread (the background thread does this on
 * its own when dead space grows). */
int layer_compact(struct layer *layer);

/* For tests: every system call by which layer.c changes a layer's files or
 * their directory (and syncs them) goes through here, so that a test can
 * inject faults (a short write, EIO, ENOSPC, or a kill at a chosen step) or
 * model a power loss (tests/unit/test_layer_power.c). pwrite writes data,
 * records and headers, O_DIRECT or not; fallocate makes room in the shared
 * pending file (layer_share_pending) and punches the space of dead data;
 * shared_pwrite writes the shared file's header, and ftruncate cuts the
 * log (at open, of an idle layer that gives back its zeros, and of one
 * whose zeroing or allocation ahead failed); zero_pwrite writes the zeros
 * ahead (on the background thread) and ahead_fallocate allocates the log
 * ahead (in a flush). open is every open of a layer's file (creating ones
 * with O_CREAT), rename, unlink and fsync_dir (util.h) every change and
 * sync of the layer directory. The shared pending file, in a tmpfs that no
 * power loss keeps, is otherwise opened, cut and mapped directly;
 * sync_file_range (a writeback hint) and futimens (times) are direct too. */
struct layer_syscalls {
    ssize_t (*pwrite)(int fd, const void *buf, size_t len, off_t off);
    int (*fdatasync)(int fd);
    int (*fallocate)(int fd, int mode, off_t off, off_t len);
    ssize_t (*shared_pwrite)(int fd, const void *buf, size_t len, off_t off);
    int (*ftruncate)(int fd, off_t len);
    ssize_t (*zero_pwrite)(int fd, const void *buf, size_t len, off_t off);
    int (*ahead_fallocate)(int fd, int mode, off_t off, off_t len);
    int (*open)(const char *path, int flags, mode_t mode);
    int (*rename)(const char *from, const char *to);
    int (*unlink)(const char *path);
    int (*fsync_dir)(const char *dir);
};
extern struct layer_syscalls layer_syscalls;

#endif
