/* flat: one plain file per base version in the cache directory, holding the
 * version's bytes at the base's offsets, for the kernel to read by itself
 * (FUSE passthrough, passthrough.h). The chunk cache cannot be handed to the
 * kernel: its packs hold chunks in fill order, not at base offsets.
 *
 *   CACHE/flat/NAME@V.raw      the version's `size` bytes; zero chunks are holes
 *   CACHE/flat/NAME@V.tmp      one being built (never used; removed at open)
 *
 * Building (flat_build): only from chunks that are in the cache, each one
 * acquired and so checked against its hash as every use of the cache is
 * (cache.h); a chunk that is not there ends the build (-ENOENT). They are
 * written into the .tmp file, which is then read back in full and compared,
 * chunk by chunk, with the manifest's hashes (zero chunks must read as
 * zeros), fdatasync'd, renamed into place, and the directory fsync'd. So a
 * kill -9 or a power loss in the middle leaves at most a .tmp file, which
 * the next flat_open() removes: no partial file is ever used. No lock is
 * held across any of that I/O; one build or check runs at a time (the
 * caller's one background thread, passthrough.h).
 *
 * Checking (flat_check): a file found at flat_open() is UNCHECKED, and
 * flat_open_ready() does not hand it out until flat_check() has read it in
 * full and compared every chunk with the manifest again, in this run; a
 * mismatch removes it (counted in rejected). A file built in this run is
 * READY at once. A check also fails a file whose identity (below) after
 * the reads is not what it was before them: it changed while being read.
 *
 * Takeover: a new server of the same mount (imgfsctl restart, or a kill -9
 * and the supervisor's next server) need not read again what the last one
 * checked. Each build or check that passes records, in the trust directory
 * given to flat_open() (the supervisor's, in /dev/shm: it lives exactly as
 * long as the mount, so a fresh mount has none), the file's identity: its
 * name, the manifest id, st_dev, st_ino, size, mtime and ctime, as they
 * were when its bytes were compared (for a build, after its rename). A
 * check then takes a file without reading it (counted in trusted, not in
 * checked) only when the record's manifest id is m's and every field of
 * the identity is the file's now; any other is checked in full. A write, a
 * truncate, a touch, a chmod or a file put in its place changes its ctime
 * at least, except a change within the same tick of the file system's
 * clock (a few ms) as the recorded ctime. The record is removed before its
 * file.
 *
 * What this catches and what it does not. Caught: a file torn by a crash
 * before its rename (never renamed), and any change to a file's bytes made
 * while no daemon ran (the check at start), or between two servers of a
 * mount through the file system (its ctime moves). Not caught: bytes
 * changed on disk after the check, by anyone with write access to the
 * cache directory (root) who also sets the ctime back (the clock), or
 * through the block device, bit rot or a disk that lies. The kernel reads the file itself and
 * nothing of imgfs checks those reads, so such bytes reach the reader as
 * they are. That is why passthrough is a mount option, off by default
 * (-o base_passthrough).
 *
 * Space: each file's bytes count against the cache's limit (cache_charge):
 * a file is built only into room that is free under 90% of the limit and
 * evicts no chunk for itself, and the files are the first thing to go when
 * a fill needs room (flat_reclaim, through cache_set_reclaim): the chunks
 * win, because they serve every read and a flat file is only a faster copy
 * of some of them. The caller also removes a file when its version stops
 * being held (flat_remove). A removed file that the kernel still has open
 * keeps its blocks until it is closed; the charge is given back at once.
 *
 * Contract: every function is thread-safe; the state of each file is
 * guarded by the store's lock, which is never held across I/O.
 */
#ifndef IMGFS_FLAT_H
#define IMGFS_FLAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache.h"
#include "manifest.h"

struct flat_store;

enum flat_state {
    FLAT_NONE,      /* no file */
    FLAT_BUILDING,  /* flat_build() under way */
    FLAT_UNCHECKED, /* found at open, not yet checked in this run */
    FLAT_CHECKING,  /* flat_check() under way */
    FLAT_READY,     /* built or checked in this run: may be handed to the kernel */
};

struct flat_usage {
    uint64_t files, ready; /* files (any state), of them READY */
    uint64_t bytes;        /* charged to the cache */
    uint64_t built;        /* builds finished in this run */
    uint64_t checked;      /* start-up checks passed, the file read in full */
    uint64_t trusted;      /* start-up checks passed on this mount's record, not read */
    uint64_t rejected;     /* files removed because a check failed */
    uint64_t reclaimed;    /* files removed to make room for chunks */
};

/* Opens CACHE/flat (made 0700 when missing): removes every .tmp file,
 * charges every NAME@V.raw to the cache as UNCHECKED (removes those that do
 * not fit), and registers flat_reclaim with the cache. trust_dir: where
 * this mount's passed checks are recorded (NAME@V.flat; see Takeover), or
 * NULL or "" to record none and check every file in full. */
int flat_open(struct cache *cache, const char *trust_dir, struct flat_store **out, char *err, size_t errlen);
void flat_close(struct flat_store *store);

enum flat_state flat_state_of(struct flat_store *store, const struct manifest *m);

/* Builds m's file (see above): 0; -ENOENT when a chunk is not in the cache;
 * -ENOSPC when there is no free room under the limit; -EALREADY when the
 * file exists (any state); -EBADMSG when what was written does not read
 * back as m; -ECANCELED when it was reclaimed meanwhile; or another errno.
 * Nothing is left behind on failure. */
int flat_build(struct flat_store *store, const struct manifest *m);

/* Checks an UNCHECKED file against m, in full unless this mount's record
 * of it matches (see Takeover): 0 (READY), -EBADMSG (removed, counted in
 * rejected), -ENOENT when there is no unchecked file. */
int flat_check(struct flat_store *store, const struct manifest *m);

/* A new read-only descriptor of m's file when it is READY, else -ENOENT. */
int flat_open_ready(struct flat_store *store, const struct manifest *m);

/* Removes m's file (a build or check under way stops and removes it). */
void flat_remove(struct flat_store *store, const struct manifest *m);

/* Removes every file whose NAME@V keep() says no to (versions the mount no
 * longer has). */
void flat_prune(struct flat_store *store, bool (*keep)(void *ctx, const char *name), void *ctx);

/* The cache's reclaim function (cache_set_reclaim): removes files until
 * want bytes are uncharged, and returns them: every UNCHECKED file before
 * any build or check under way (stopped; its room comes back when it ends),
 * and those before any READY file. */
uint64_t flat_reclaim(void *store, uint64_t want);

/* Makes a build or check under way end soon (-ECANCELED; a file being
 * checked stays, unchecked) and every later one end at once: for shutdown. */
void flat_stop(struct flat_store *store);

void flat_get_usage(struct flat_store *store, struct flat_usage *out);

/* For tests (a kill in the middle of a build, opens during a check): sleeps
 * this many milliseconds after each chunk a build writes or a build or
 * check compares. Read from IMGFS_TEST_FLAT_DELAY_MS at open. */
extern unsigned flat_build_delay_ms;

/* For tests (what another thread sees at a given moment): when set, called
 * with no lock held after each chunk a build or check compares and just
 * before a flat file (.raw) is unlinked. */
enum flat_test_point { FLAT_TEST_COMPARED, FLAT_TEST_UNLINK };
extern void (*flat_test_hook)(enum flat_test_point point, const char *name);

#endif
