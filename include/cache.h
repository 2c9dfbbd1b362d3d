/* cache: the host-local, content-addressed store of chunks.
 *
 * Layout of the cache directory:
 *   imgfs-cache            marker: "imgfs-cache 2\n"
 *   packs/NNNNNNNN.pack    chunk bytes, appended at 4 KiB-aligned offsets
 *   packs/NNNNNNNN.idx     the pack's index log: 64-byte records "chunk HASH
 *                          is at OFFSET, LENGTH bytes" (ADD) or "is gone"
 *                          (DROP), each sealed with a checksum
 *   packs/NNNNNNNN.sums    an xxh3-64 of each 4 KiB block of the pack
 *                          (8 bytes per block, 0 = unknown)
 *   flat/                  flat copies of whole base versions (flat.h): not
 *                          touched here, but their bytes count against the
 *                          limit (cache_charge) and give way first when a
 *                          fill needs room (cache_set_reclaim)
 *   meta/, pins, imgfs.lock  other modules' files, never touched here
 *
 * Why packs: a cold read stores thousands of chunks, and one file per chunk
 * cost an inode, a create and a rename each (20-27% of the system time),
 * and a read of a cached base an open per chunk and scattered blocks. A
 * pack is one file written in fill order, kept open, so a base that was
 * filled in order reads back like one file.
 *
 * Writes. Fills append to one active pack (an offset handed out under a
 * lock, the bytes written without it), which rolls over at 256 MiB. Each
 * cache_open() starts a new active pack, so a restarted daemon never
 * appends to a pack that a dead one was writing. A chunk's ADD record is
 * appended only once its bytes are written, so after a kill -9 no record
 * points at a half-written chunk. No fill is fsync'd (the cache can always
 * be refilled; see "Power loss" below); instead every chunk is checked
 * against its hash the first time this process uses it, so bytes damaged
 * by a crash, power loss or bit rot are dropped (a DROP record) and
 * fetched again, never served. A torn or garbled record ends a pack's log
 * at open.
 *
 * A read of part of a chunk (cache_acquire's range) is checked by block
 * instead: each 4 KiB block it covers against the sum stored with it when
 * the verified chunk was written, once per run. A random 4 KiB read of a
 * cached base after a reboot then reads 4 KiB, not the whole chunk; the
 * first sum read from a pack in a run starts reading its whole sums file
 * (1/512 of the pack) into the page cache, so that such reads do not each
 * wait for their sums page before their block. A sum
 * that is unknown (a pack of an older build) or does not match never fails
 * or serves anything by itself: the whole chunk is checked against its hash
 * and decides (dropped, or its sums written anew). Before the bytes of a
 * damaged chunk go, its drop waits for readers of blocks checked earlier.
 *
 * Power loss. An insert is durable once the kernel has written back (its
 * own writeback, a sync(1), a clean shutdown) the chunk's bytes in its
 * pack, its ADD record in the pack's index log, and the names in packs/. A
 * power cut never loses a durable chunk that was not evicted or dropped
 * since, never makes the cache serve wrong bytes (the check on first use),
 * and leaves no file on disk uncounted (inside a pack, blocks whose DROP
 * record a cut kept but whose punch it lost stay allocated, uncounted,
 * until the pack goes). What that takes: a compaction syncs
 * the copies it made (their packs and packs/) before it drops the
 * originals, the cache's only sync; at open, of two copies of one chunk
 * the later wins unless its bytes are wrong and the older's right (a cut
 * may lose an eviction's DROP record but keep its punch, before the chunk
 * is filled again elsewhere; or lose a compaction's copy before its sync),
 * and the loser gets a DROP record, once the winner's pack is synced (its
 * soundness may have been read from the page cache after a kill -9; when
 * that sync fails the older copy stays); a pack whose .pack a cut lost goes
 * with its .idx and .sums. tests/unit/test_cache_power.c checks this
 * against a model of what a cut may leave (tests/unit/power_model.h).
 *
 * Eviction is per chunk: its DROP record is written and its blocks are
 * punched out of the pack (fallocate PUNCH_HOLE), so the disk space goes
 * back at once; offsets are never reused, and a pack whose last chunk is
 * evicted is removed (the active one once it has rolled over). A full pack
 * kept alive by a few hot chunks (at most 1/16 of it live) has them copied
 * into the active pack after an eviction pass and then goes, so packs do
 * not pile up behind their index logs and descriptors.
 *
 * The old layout (marker "imgfs-cache 1", one file per chunk under
 * chunks/XY/) is imported at open: each file is copied into a pack and
 * removed, and verified on first use like any chunk.
 *
 * The check of a chunk's first use reads its bytes from the pack; the
 * hit keeps that buffer (cache_pin.bytes), so a reply sends the bytes that
 * were checked, and a random 4 KiB read after a reboot costs one read of
 * the pack, not a check read and a second one for the reply. Later hits in
 * the run hold no buffer: they are read from the pack's descriptor. A
 * readahead (cache_prefetch) only brings the bytes into the page cache; it
 * checks nothing.
 *
 * Single flight: cache_acquire() hands the job of filling a missing chunk to
 * exactly one caller; everyone else asking for the same chunk waits for it
 * (up to their deadline) instead of fetching it again. No lock is held while
 * the filler does its I/O.
 *
 * A pinned chunk's pack descriptor, and its bytes at pin->off, stay valid
 * until cache_release(); the cache never closes, evicts, punches or reuses
 * a pinned chunk.
 *
 * One process at a time opens a cache directory (the owner lock).
 * Contract: every function is thread-safe.
 */
#ifndef IMGFS_CACHE_H
#define IMGFS_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "hash.h"

struct cache;
struct cache_entry;

struct cache_pin {
    struct cache_entry *entry; /* NULL for a transient pin (see fetch.h) */
    int fd;                    /* valid while pinned */
    uint64_t off;              /* where the chunk's first byte is in fd */
    bool waited;               /* cache_acquire() waited for another caller's fill */
    /* When cache_acquire() had to read the bytes to check them (their first
     * use in this run), it keeps them: bytes holds the chunk's bytes
     * [bytes_off, bytes_off + bytes_len), exactly those it checked, which
     * cover the range asked for. Read them here rather than from fd again
     * (cache_pin_bytes). NULL otherwise; freed by cache_release(). */
    char *bytes;
    uint32_t bytes_off, bytes_len;
};

enum cache_acquire_status {
    CACHE_HIT = 0,   /* resident and verified: pin->fd is readable at pin->off */
    CACHE_MUST_FILL, /* caller must call cache_fill() or cache_abandon() */
};

struct cache_usage {
    uint64_t chunks;
    uint64_t bytes;
    uint64_t open_fds;        /* three per pack */
    uint64_t packs;
    uint64_t dropped_damaged; /* chunks that failed verification on first use */
    uint64_t limit;           /* 0 when unlimited */
    uint64_t evictions;
    uint64_t held_bytes;      /* stored bytes that pre-copy pinned (a running count, no walk) */
    uint64_t charged_bytes;   /* other modules' bytes counted against the limit (cache_charge) */
    uint64_t used;            /* what counts against the limit: chunks (and fills in progress),
                               * index logs, sums files (in whole 4 KiB blocks) and charged bytes */
};

int cache_open(const char *dir, struct cache **out, char *err, size_t errlen);
void cache_close(struct cache *cache);

/* Caps the bytes the cache may hold (0: no cap). When a fill would go over
 * it, charged space (flat files, cache_charge below) goes first, then the
 * least recently used chunks that nobody has pinned are removed until 90%
 * of the cap is used (hysteresis); a fill that still does not fit fails
 * with -ENOSPC. A full file system (ENOSPC on write) also reclaims, evicts
 * and retries once. Call before the cache is shared between threads. */
void cache_set_limit(struct cache *cache, uint64_t limit);

/* Returns CACHE_HIT or CACHE_MUST_FILL (>= 0), or -ETIMEDOUT when another
 * caller was filling the chunk and deadline_ns (monotonic) passed, -ENOMEM
 * when there was no memory to check a resident chunk in (it stays, to be
 * checked by the next acquire), or another negative errno. The caller reads only [want_off, want_off + want_len) of a
 * hit (checked by block, see above); want_len 0 asks for the whole chunk. */
int cache_acquire(struct cache *cache, const struct chunk_hash *hash, uint32_t chunk_size, uint32_t want_off,
                  uint32_t want_len, uint64_t deadline_ns, struct cache_pin *pin);

/* Stores data (the verified chunk) for a pin obtained with CACHE_MUST_FILL.
 * On success the pin becomes a normal pin with a readable fd. On failure the
 * pin is released and waiters are woken so that one of them can try. */
int cache_fill(struct cache *cache, struct cache_pin *pin, const void *data, size_t len);

/* Gives up filling: the pin is released and a waiter may take over. */
void cache_abandon(struct cache *cache, struct cache_pin *pin);

void cache_release(struct cache *cache, struct cache_pin *pin);

/* The checked bytes of a hit for [off, off + len) of its chunk, or NULL
 * when the pin holds none for that range (then read fd at pin->off + off). */
static inline const char *cache_pin_bytes(const struct cache_pin *pin, uint64_t off, uint64_t len)
{
    return pin->bytes && off >= pin->bytes_off && off + len <= (uint64_t)pin->bytes_off + pin->bytes_len
               ? pin->bytes + (off - pin->bytes_off)
               : NULL;
}

/* Space another module keeps in the cache directory (flat.h's flat files)
 * counts against the limit like chunks do, but wins no room from them:
 * cache_charge() counts len bytes only when they fit under 90% of the limit
 * with nothing evicted (-ENOSPC otherwise; always 0 with no limit), and
 * cache_uncharge() gives them back. When a fill needs room, the reclaim
 * function (set once, before the cache is shared between threads) is asked
 * for want bytes first, before any chunk is evicted; it removes what it
 * can, uncharges it and returns the bytes it freed. It is called with no
 * cache lock held, on the thread of the fill, and must not fill. */
int cache_charge(struct cache *cache, uint64_t len);
void cache_uncharge(struct cache *cache, uint64_t len);
void cache_set_reclaim(struct cache *cache, uint64_t (*reclaim)(void *ctx, uint64_t want), void *ctx);

bool cache_contains(struct cache *cache, const struct chunk_hash *hash);
/* Whether the chunk is stored (as cache_stores) and held by a pre-copy pin
 * set (cache_hold). */
bool cache_stores_held(struct cache *cache, const struct chunk_hash *hash);
/* Whether the cache stores the chunk: from its fill (or the index load)
 * until it is dropped, also while a reader checks it or compaction moves it
 * (when cache_contains says no). This is what cache_get_usage counts. */
bool cache_stores(struct cache *cache, const struct chunk_hash *hash);
/* A number that changes whenever a chunk starts or stops being stored:
 * what was counted with cache_stores() stays true while it is the same. */
uint64_t cache_generation(struct cache *cache);
/* Readahead of a resident chunk: starts reading its bytes from the pack into
 * the page cache (POSIX_FADV_WILLNEED) and returns without waiting or
 * checking them; the reader's cache_acquire() checks them, from memory by
 * then. -ENOENT when it is not resident. */
int cache_prefetch(struct cache *cache, const struct chunk_hash *hash);

/* Pins (hold = true) or unpins a chunk for pre-copy: a held chunk is never
 * evicted, whether it is resident yet or not. Holds nest. */
int cache_hold(struct cache *cache, const struct chunk_hash *hash, bool hold);
void cache_get_usage(struct cache *cache, struct cache_usage *out);
const char *cache_dir(const struct cache *cache);

/* Where a resident chunk's bytes are (for tests and diagnostics): the pack
 * file's path, the offset and the length. -ENOENT when not resident. */
int cache_locate(struct cache *cache, const struct chunk_hash *hash, char *path, size_t path_len, uint64_t *off,
                 uint64_t *len);
/* For tests: allocates the buffers a resident chunk's bytes are checked in
 * (malloc); replace it to inject ENOMEM, which fails that acquire with
 * -ENOMEM and keeps the chunk. Set before the cache is shared between
 * threads. */
extern void *(*cache_check_alloc)(size_t len);
/* Rolls the active pack over beyond bytes instead of 256 MiB (tests). Call
 * before the cache is shared between threads. */
void cache_set_pack_limit(struct cache *cache, uint64_t bytes);

/* For tests: every system call by which cache.c changes the files under
 * packs/ or that directory (and syncs them) goes through here, so that a
 * test can inject faults or model a power loss
 * (tests/unit/test_cache_power.c). open is every open of a pack's file
 * (creating ones with O_CREAT); pwrite writes chunk bytes and block sums;
 * write appends index records (the descriptor is O_APPEND); fallocate
 * punches the space of dropped chunks; ftruncate cuts an index log at a
 * torn record; fdatasync syncs a pack's file; unlink removes a pack's file;
 * fsync_dir (util.h) syncs packs/.
 * Not through here: the marker file (util.h's write_file_atomic), mkdir of
 * packs/, and the one-time import of the old layout (copy_file_range).
 * Defaults to the real calls; set before cache_open(). */
struct cache_syscalls {
    int (*open)(const char *path, int flags, mode_t mode);
    ssize_t (*pwrite)(int fd, const void *buf, size_t len, off_t off);
    ssize_t (*write)(int fd, const void *buf, size_t len);
    int (*fallocate)(int fd, int mode, off_t off, off_t len);
    int (*ftruncate)(int fd, off_t len);
    int (*fdatasync)(int fd);
    int (*unlink)(const char *path);
    int (*fsync_dir)(const char *dir);
};
extern struct cache_syscalls cache_syscalls;

#endif
