/* layer: a log of data blocks indexed by checksummed records.
 *
 * NOTES ON THE DESIGN (read with the format in layer.h)
 *
 * Invariants:
 *   I1. Data is only ever appended: a log block, once written, is never
 *       written again in the same file. So a reader that pinned a file can
 *       read a location it looked up without further locking. (Blocks past
 *       the tail may be written with zeros before they are reserved; no
 *       write or flush writes a block while zeroing may: zeroing_from.)
 *   I2. Record k+1 is written only after the fdatasync() that followed
 *       record k returned (flush_serial orders flushes). So when record k+1
 *       is valid on disk, record k and all the data it names are durable;
 *       only the data of the last valid record needs its checksums checked
 *       at open.
 *   I3. Every entry names data reserved before its record's position was
 *       reserved: 1 <= loc and loc + count <= next of its record. A flush
 *       does not wait for the writes under way: one that reserved its
 *       blocks before the record's and returns after the flush took the
 *       pending entries goes in a later record. So the data of the pending
 *       entries, and only theirs (with those of a record being written,
 *       which go back to pending if it fails), may lie below record_at and
 *       yet be in no closed record (closed_below).
 *   I4. A slot in the index goes from NONE to ZERO or DATA, and never back
 *       to NONE. Index nodes are never freed before layer_close().
 *   I5. A slot names its file by generation; the file of a generation stays
 *       open while a slot or a pinned extent names it.
 *   I6. A flush returns only once the file its record went into is durable
 *       as ID.log: between a compaction's switch and its directory fsync,
 *       flush_serial stays with the compaction.
 *
 * Transitions:
 *   write      reserve log blocks (atomic tail), pwrite (with O_DIRECT for
 *              a write-through into zeroed blocks), then under lock: append
 *              a pending entry and point the slots at the new data
 *   punch      under lock: append a zero entry, set the slots to ZERO; then
 *              flush, and give the log space of data in earlier records
 *              back to the file system (I2, I3: no replay needs it)
 *   flush      take the pending entries, reserve continuation blocks and
 *              the next record's block, write them, fdatasync once
 *   compact    copy live data into ID.log.new (phase 1, no lock), copy what
 *              changed meanwhile and fdatasync it (phase 1b); with writers
 *              and flushes held (phase 2, no I/O but the copy) copy the
 *              rest and make the new file cur; then writes go on into it
 *              while flushes wait (phase 3) for its fdatasync, the rename
 *              over ID.log and the directory's fsync (I6); last, repoint
 *              the slots that still name the old generation
 *   zero ahead when flushes carry little data: with swap_lock exclusive,
 *              note zeroing_from (the tail, or the end of the last zeroing);
 *              write zeros up to a window past the tail and fdatasync; a
 *              write or flush that reserved blocks reaching zeroing_from
 *              waits for it (background thread, under the compaction claim)
 *   open       replay records in order; check the last one's data
 */
#include "layer.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/ioprio.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <xxhash.h>

#include "util.h"

#define BS LAYER_BLOCK_SIZE
#define LOG_MAGIC "imgfs-layer-log 1\n"
#define RECORD_MAGIC 0x31434572u /* "rEC1" */
#define RECORD_HEADER 64u
#define ENTRY_LEN 32u
#define INLINE_ENTRIES ((BS - RECORD_HEADER) / ENTRY_LEN)
#define CONT_ENTRIES (BS / ENTRY_LEN)
#define MAX_RECORD_ENTRIES 4096u           /* a flush is forced beyond this */
#define MAX_PENDING_BYTES (64ull << 20)     /* and beyond this much data */
#define KICK_BYTES (1ull << 20)             /* start writeback every 1 MiB */
#define MAX_ENTRY_BLOCKS (1u << 30)
#define AHEAD_FLUSH_MAX (1ull << 20) /* a flush of at most this much data is small */
#define AHEAD_MIN (4ull << 20)       /* zeroed ahead of the tail: a quarter of */
#define AHEAD_MAX (16ull << 20)      /* the log, within these bounds, */
#define AHEAD_ALLOC_MAX (192ull << 20) /* allocated ahead by a large flush (allocate_ahead) */
#define AHEAD_FREE_FACTOR 64         /* and while 64 windows are free, */
#define AHEAD_HOST_MAX (1ull << 30)  /* and while all layers hold less than this */
#define AHEAD_IDLE_NS (60ull * 1000000000ull) /* given back by a layer that wrote nothing for this long */
#define NO_ZEROING UINT64_MAX
#define OLD_MAP_HEADER_LEN 64
#define OLD_MAP_MAGIC "imgfs-layer-map 1\n"

/* Index slots: 0 not owned, all ones owned and zero, else generation in the
 * top 16 bits and the log block (>= 1) below. */
#define SLOT_NONE 0ull
#define SLOT_ZERO UINT64_MAX
#define GEN_LIMIT 0xffffu
#define SLOT_DATA(gen, loc) (((uint64_t)(gen) << 48) | (loc))
#define SLOT_GEN(s) ((unsigned)((s) >> 48))
#define SLOT_LOC(s) ((s) & ((1ull << 48) - 1))
#define LEAF_BITS 9
#define LEAF_LEN (1u << LEAF_BITS)
#define MID_BITS 9
#define MID_LEN (1u << MID_BITS)
#define MID_SPAN (1ull << (LEAF_BITS + MID_BITS)) /* blocks under one mid node */
/* A node pointer: 0 none below, NODE_ZERO all owned and zero, else a node. */
#define NODE_ZERO ((uintptr_t)1)

enum entry_kind { ENTRY_DATA = 1, ENTRY_ZERO = 2 };
struct entry {
    uint64_t block;
    uint32_t count;
    uint32_t kind;
    uint64_t loc;
    uint64_t sum; /* xxh3-64 of the data */
};

struct log_file {
    int fd;
    unsigned gen;
    unsigned refs; /* guarded by layer.files_lock */
    /* A second descriptor of the file, with O_DIRECT, for write-through
     * (layer_write_through): DIRECT_UNOPENED until the first one needs it,
     * -1 where the file system has none. Closed with fd. */
    _Atomic int dfd;
};
#define DIRECT_UNOPENED (-2)

struct layer {
    char id[LAYER_ID_LEN + 1];
    char *dir; /* malloc'd: PATH_MAX inline was half a VM disk's memory */
    uint64_t size;
    uint64_t blocks;

    /* The index: top[block / MID_SPAN] -> mid node -> leaf of slots. Written
     * under lock, read without locks (I4). */
    _Atomic uintptr_t *top;
    size_t top_len;

    /* files_lock guards files[] and refs; held briefly, never across I/O. */
    pthread_mutex_t files_lock;
    struct log_file *files[4]; /* by generation % 4 */
    struct log_file *cur;      /* changes only in phase 2 of compaction */

    /* Writers and punches hold swap_lock shared across their I/O, and a
     * flush while it takes the pending entries and reserves its record (no
     * I/O); a zeroing ahead holds it exclusively while it picks where it
     * starts, an idle layer's give-back across its cut (one ftruncate),
     * phase 2 of compaction while it copies the last changes (no sync). */
    pthread_rwlock_t swap_lock;
    /* flush_serial orders flushes (I2) and is held across their I/O, and by
     * phases 2 and 3 of compaction (I6); taken before swap_lock. */
    pthread_mutex_t flush_serial;
    /* lock guards the index updates, pending, the record position and the
     * compaction change list; held briefly, never across I/O but the one
     * ftruncate of an idle layer's give-back (give_back_ahead). */
    pthread_mutex_t lock;
    _Atomic uint64_t tail; /* next free log block */
    uint64_t record_at;    /* where the next record goes */
    /* record_at's block is zeroed (or allocated) ahead: a flush may write
     * it with O_DIRECT (put_record). Guarded by flush_serial. */
    bool record_zeroed;
    /* The lowest log block of data that a flush took the entries of and has
     * not yet written its record for (UINT64_MAX: none): should that write
     * fail, the entries go back to pending (closed_below). Guarded by lock. */
    uint64_t flush_taken_below;
    uint64_t seq;          /* its sequence number */
    uint64_t file_id;
    struct entry *pending;
    size_t npending, pending_cap;
    uint64_t pending_bytes;
    struct entry *changed; /* ranges changed while compacting */
    size_t nchanged, changed_cap;
    bool tracking;
    _Atomic int broken; /* a failed fdatasync: the layer refuses further writes */
    /* The shared copy of pending (layer_share_pending()): its descriptor, or
     * -1, how many entries it holds, and the file mapped for appends
     * (shared_append; NULL until the first); guarded by lock. */
    int shared_fd;
    uint64_t shared_count;
    uint8_t *shared_map;
    size_t shared_map_len;
    bool shared_failing; /* the last append failed (logged once, not per write) */
    /* The file's header is not known to name this log (a reset failed of
     * a file just opened, or at a compaction's switch): no entry goes in,
     * so the writes flush before they return, until a flush's reset
     * succeeds. */
    bool shared_stale;

    /* Zeroing ahead (zero_ahead): log blocks [tail, ahead) of cur are
     * allocated and written with zeros, so a flush that writes data there
     * commits no file system metadata. zeroing_from is the first block a
     * zeroing under way writes (NO_ZEROING: none); it is set with swap_lock
     * held exclusively, and a write or flush that reserved blocks reaching
     * it waits on zero_done (zero_lock) before writing them. ahead and
     * zeroing_from change only in the thread that holds the compaction
     * claim, or at compaction's switch. changes counts punches, so that
     * zeroing puts back the times it moved only when no guest write (it
     * moves the tail) or punch moved them since they were last known. */
    _Atomic uint64_t ahead;
    _Atomic uint64_t zeroing_from;
    _Atomic bool small_flushes; /* the last flush with data had little */
    _Atomic bool no_zeroing;   /* zeroing stops until the layer is opened again */
    _Atomic bool no_direct;    /* the file system refused an O_DIRECT write */
    bool through_everywhere;   /* IMGFS_LAYER_THROUGH=all: also past the zeroed blocks */
    _Atomic uint64_t through_blocks; /* written with O_DIRECT (layer_write_through) */
    /* Writes to cur's log take turns by kind (write_turn_enter): page-cache
     * writes, or O_DIRECT ones, never both at once. turn_lock guards the
     * rest; it is never held across I/O. */
    pthread_mutex_t turn_lock;
    pthread_cond_t turn_changed;
    unsigned turn_writes;      /* writes of kind turn_direct under way */
    bool turn_direct;
    unsigned turn_waiting[2];  /* writes waiting for their turn, by kind */
    _Atomic bool writes_through; /* the last write was a layer_write_through() */
    _Atomic uint64_t changes;
    /* space_changes moves after every change of what layer_allocated_bytes
     * reads (layer.h: the rule and its sites); space_bytes is its answer
     * when space_changes was space_seen (space_known), guarded by lock. */
    _Atomic uint64_t space_changes;
    uint64_t space_seen, space_bytes;
    bool space_known;
    /* The times a zeroing pass puts back (zero_ahead): the file's when it
     * began, with what layer_set_times() set since (which zeros written
     * after it would move again), and the tail and changes when they were
     * last set. Guarded by lock. */
    struct timespec keep_times[2];
    uint64_t keep_tail, keep_changes;
    pthread_mutex_t zero_lock;
    pthread_cond_t zero_done;

    _Atomic uint64_t owned;
    _Atomic uint64_t live; /* blocks with data */
    _Atomic uint64_t kicked;
    _Atomic uint64_t last_io_ns;

    /* Its blocks in ahead_host_blocks: changed only by the holder of the
     * compaction claim, and by layer_close(); read by flushes (ahead_stale). */
    _Atomic uint64_t ahead_counted;

    /* Compaction: guarded by the module's compact_lock. */
    struct layer *compact_next;
    bool compact_queued, compact_stop, compacting;
    struct layer *holder_next, *holder_prev; /* in ahead_holders, when holding */
    bool holding;
    bool idle_queued; /* queued by queue_idle_holders: to give its zeros back */
    _Atomic uint64_t compactions, compact_ns, compact_pause_ns, compact_flush_hold_ns, compact_bytes;
};

/* ---- system calls, replaceable by tests -------------------------------------- */

static ssize_t real_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    return pwrite(fd, buf, len, off);
}
static int real_fdatasync(int fd)
{
    return fdatasync(fd);
}
static int real_fallocate(int fd, int mode, off_t off, off_t len)
{
    return fallocate(fd, mode, off, len);
}
static int real_ftruncate(int fd, off_t len)
{
    return ftruncate(fd, len);
}
static int real_open(const char *path, int flags, mode_t mode)
{
    return open(path, flags, mode);
}
struct layer_syscalls layer_syscalls = {real_pwrite,    real_fdatasync, real_fallocate, real_pwrite, real_ftruncate,
                                        real_pwrite,    real_fallocate, real_open,      rename,      unlink,
                                        fsync_dir};

static int put_at(int fd, const void *buf, size_t len, uint64_t off)
{
    return write_full_at_by(layer_syscalls.pwrite, fd, buf, len, (off_t)off);
}

/* A layer's times are those of its file (layer_get_times); a file that
 * replaces it takes them over. Best effort: times are not data. */
static void copy_times(int from, int to)
{
    struct stat st;
    if (fstat(from, &st) == 0)
        futimens(to, (struct timespec[2]){st.st_atim, st.st_mtim});
}

static int sync_fd(int fd)
{
    return layer_syscalls.fdatasync(fd) < 0 ? -errno : 0;
}

/* ---- little-endian fields ------------------------------------------------------- */

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}
static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- the index ------------------------------------------------------------------ */

static uint64_t slot_get(const struct layer *l, uint64_t block)
{
    uintptr_t mid = atomic_load_explicit(&l->top[block / MID_SPAN], memory_order_acquire);
    if (mid <= NODE_ZERO)
        return mid == NODE_ZERO ? SLOT_ZERO : SLOT_NONE;
    _Atomic uintptr_t *m = (_Atomic uintptr_t *)mid;
    uintptr_t leaf = atomic_load_explicit(&m[(block >> LEAF_BITS) % MID_LEN], memory_order_acquire);
    if (leaf <= NODE_ZERO)
        return leaf == NODE_ZERO ? SLOT_ZERO : SLOT_NONE;
    return atomic_load_explicit(&((_Atomic uint64_t *)leaf)[block % LEAF_LEN], memory_order_acquire);
}

/* The leaf that holds block, created (and published) if needed. lock held. */
static _Atomic uint64_t *leaf_for(struct layer *l, uint64_t block)
{
    _Atomic uintptr_t *tp = &l->top[block / MID_SPAN];
    uintptr_t mid = atomic_load_explicit(tp, memory_order_relaxed);
    if (mid <= NODE_ZERO) {
        _Atomic uintptr_t *m = malloc(MID_LEN * sizeof(*m));
        if (!m)
            return NULL;
        for (unsigned i = 0; i < MID_LEN; i++)
            atomic_init(&m[i], mid);
        atomic_store_explicit(tp, (uintptr_t)m, memory_order_release);
        mid = (uintptr_t)m;
    }
    _Atomic uintptr_t *lp = &((_Atomic uintptr_t *)mid)[(block >> LEAF_BITS) % MID_LEN];
    uintptr_t leaf = atomic_load_explicit(lp, memory_order_relaxed);
    if (leaf <= NODE_ZERO) {
        _Atomic uint64_t *f = malloc(LEAF_LEN * sizeof(*f));
        if (!f)
            return NULL;
        for (unsigned i = 0; i < LEAF_LEN; i++)
            atomic_init(&f[i], leaf == NODE_ZERO ? SLOT_ZERO : SLOT_NONE);
        atomic_store_explicit(lp, (uintptr_t)f, memory_order_release);
        leaf = (uintptr_t)f;
    }
    return (_Atomic uint64_t *)leaf;
}

/* Creates the leaves of [first, first+count) ahead of slot_set(). lock held. */
static int reserve_leaves(struct layer *l, uint64_t first, uint64_t count)
{
    for (uint64_t b = first; b < first + count; b = (b / LEAF_LEN + 1) * LEAF_LEN)
        if (!leaf_for(l, b))
            return -ENOMEM;
    return 0;
}

/* Sets one slot (its leaf exists) and keeps the counters. lock held. */
static void slot_set(struct layer *l, uint64_t block, uint64_t value)
{
    _Atomic uint64_t *leaf = leaf_for(l, block);
    uint64_t old = atomic_exchange_explicit(&leaf[block % LEAF_LEN], value, memory_order_release);
    if (old == SLOT_NONE)
        atomic_fetch_add(&l->owned, 1);
    if (old != SLOT_NONE && old != SLOT_ZERO)
        atomic_fetch_sub(&l->live, 1);
    if (value != SLOT_ZERO)
        atomic_fetch_add(&l->live, 1);
}

/* Makes [first, first+count) owned and zero; whole nodes become NODE_ZERO
 * without allocating (so discarding a large disk costs nothing). lock held. */
static int zero_range(struct layer *l, uint64_t first, uint64_t count)
{
    uint64_t end = first + count;
    for (uint64_t b = first; b < end;) {
        uint64_t mid_start = b / MID_SPAN * MID_SPAN;
        _Atomic uintptr_t *tp = &l->top[b / MID_SPAN];
        uintptr_t mid = atomic_load(tp);
        if (mid == NODE_ZERO) {
            b = mid_start + MID_SPAN;
            continue;
        }
        if (b == mid_start && end - b >= MID_SPAN && mid == 0) {
            atomic_store_explicit(tp, NODE_ZERO, memory_order_release);
            atomic_fetch_add(&l->owned, MID_SPAN);
            b += MID_SPAN;
            continue;
        }
        if (mid == 0) {
            if (!leaf_for(l, b)) /* creates the mid node; the leaf is harmless */
                return -ENOMEM;
            mid = atomic_load(tp);
        }
        _Atomic uintptr_t *lp = &((_Atomic uintptr_t *)mid)[(b >> LEAF_BITS) % MID_LEN];
        uint64_t leaf_start = b / LEAF_LEN * LEAF_LEN;
        uintptr_t leaf = atomic_load(lp);
        if (leaf == NODE_ZERO) {
            b = leaf_start + LEAF_LEN;
            continue;
        }
        if (b == leaf_start && end - b >= LEAF_LEN && leaf == 0) {
            atomic_store_explicit(lp, NODE_ZERO, memory_order_release);
            atomic_fetch_add(&l->owned, LEAF_LEN);
            b += LEAF_LEN;
            continue;
        }
        if (!leaf_for(l, b))
            return -ENOMEM;
        uint64_t stop = leaf_start + LEAF_LEN < end ? leaf_start + LEAF_LEN : end;
        for (; b < stop; b++)
            if (slot_get(l, b) != SLOT_ZERO)
                slot_set(l, b, SLOT_ZERO);
    }
    return 0;
}

static void free_index(struct layer *l)
{
    for (size_t t = 0; l->top && t < l->top_len; t++) {
        uintptr_t mid = atomic_load(&l->top[t]);
        if (mid <= NODE_ZERO)
            continue;
        _Atomic uintptr_t *m = (_Atomic uintptr_t *)mid;
        for (unsigned i = 0; i < MID_LEN; i++)
            if (atomic_load(&m[i]) > NODE_ZERO)
                free((void *)atomic_load(&m[i]));
        free((void *)m);
    }
    free((void *)l->top);
}

/* The end of the run of blocks from block (below end) whose slots are all
 * NONE, or all ZERO (kind says which); skips whole nodes. */
static uint64_t run_end_of(const struct layer *l, uint64_t block, uint64_t end, uint64_t kind)
{
    uintptr_t want_node = kind == SLOT_ZERO ? NODE_ZERO : 0;
    while (block < end) {
        uintptr_t mid = atomic_load_explicit(&l->top[block / MID_SPAN], memory_order_acquire);
        if (mid <= NODE_ZERO) {
            if (mid != want_node)
                return block;
            block = (block / MID_SPAN + 1) * MID_SPAN;
            continue;
        }
        uintptr_t leaf =
            atomic_load_explicit(&((_Atomic uintptr_t *)mid)[(block >> LEAF_BITS) % MID_LEN], memory_order_acquire);
        if (leaf <= NODE_ZERO) {
            if (leaf != want_node)
                return block;
            block = (block / LEAF_LEN + 1) * LEAF_LEN;
            continue;
        }
        if (atomic_load_explicit(&((_Atomic uint64_t *)leaf)[block % LEAF_LEN], memory_order_acquire) != kind)
            return block;
        block++;
    }
    return end;
}

/* ---- files ---------------------------------------------------------------------- */

static struct log_file *file_new(int fd, unsigned gen)
{
    struct log_file *f = malloc(sizeof(*f));
    if (!f)
        return NULL;
    *f = (struct log_file){.fd = fd, .gen = gen, .refs = 1};
    atomic_init(&f->dfd, DIRECT_UNOPENED);
    return f;
}

static void file_free(struct log_file *f)
{
    int dfd = atomic_load(&f->dfd);
    if (dfd >= 0)
        close(dfd);
    close(f->fd);
    free(f);
}

static struct log_file *file_get(struct layer *l, unsigned gen)
{
    pthread_mutex_lock(&l->files_lock);
    struct log_file *f = l->files[gen % 4];
    if (f && f->gen == gen)
        f->refs++;
    else
        f = NULL;
    pthread_mutex_unlock(&l->files_lock);
    return f;
}

static void file_put(struct layer *l, struct log_file *f)
{
    pthread_mutex_lock(&l->files_lock);
    bool last = --f->refs == 0;
    if (last && l->files[f->gen % 4] == f)
        l->files[f->gen % 4] = NULL;
    pthread_mutex_unlock(&l->files_lock);
    if (last)
        file_free(f);
}

/* Installs fd as the file of generation gen, referenced once (by cur). */
static int file_install(struct layer *l, int fd, unsigned gen, struct log_file **out)
{
    struct log_file *f = file_new(fd, gen);
    if (!f)
        return -ENOMEM;
    /* A generation four back still pinned by a reader keeps its own
     * reference; it only loses its place in the table (file_put checks). */
    pthread_mutex_lock(&l->files_lock);
    l->files[gen % 4] = f;
    pthread_mutex_unlock(&l->files_lock);
    *out = f;
    return 0;
}

/* ---- records -------------------------------------------------------------------- */

static void encode_entry(uint8_t *p, const struct entry *e)
{
    put64(p, e->block);
    put32(p + 8, e->count);
    put32(p + 12, e->kind);
    put64(p + 16, e->loc);
    put64(p + 24, e->sum);
}

static void decode_entry(const uint8_t *p, struct entry *e)
{
    e->block = get64(p);
    e->count = get32(p + 8);
    e->kind = get32(p + 12);
    e->loc = get64(p + 16);
    e->sum = get64(p + 24);
}

static size_t cont_blocks_for(size_t n)
{
    return n > INLINE_ENTRIES ? (n - INLINE_ENTRIES + CONT_ENTRIES - 1) / CONT_ENTRIES : 0;
}

/* Builds a record for entries[0..n): buf holds 1 + cont_blocks_for(n) blocks,
 * the record block first, its continuation blocks (to be written at cont)
 * after it. The checksum covers all of them. */
static void encode_record(uint8_t *buf, const struct entry *entries, size_t n, uint64_t seq, uint64_t file_id,
                          uint64_t next, uint64_t cont)
{
    size_t cb = cont_blocks_for(n);
    memset(buf, 0, (1 + cb) * BS);
    put32(buf, RECORD_MAGIC);
    put32(buf + 4, (uint32_t)n);
    put64(buf + 8, seq);
    put64(buf + 16, file_id);
    put64(buf + 24, next);
    put64(buf + 32, cont);
    put32(buf + 40, (uint32_t)cb);
    for (size_t i = 0; i < n; i++) {
        uint8_t *p = i < INLINE_ENTRIES ? buf + RECORD_HEADER + i * ENTRY_LEN
                                        : buf + BS + (i - INLINE_ENTRIES) * ENTRY_LEN;
        encode_entry(p, &entries[i]);
    }
    put64(buf + 48, XXH3_64bits(buf, (1 + cb) * BS));
}

/* Writes a record at record_at (continuation blocks at cont). */
static int write_record(int fd, const struct entry *entries, size_t n, uint64_t seq, uint64_t file_id,
                        uint64_t record_at, uint64_t next, uint64_t cont)
{
    size_t cb = cont_blocks_for(n);
    uint8_t *buf = malloc((1 + cb) * BS);
    if (!buf)
        return -ENOMEM;
    encode_record(buf, entries, n, seq, file_id, next, cont);
    int rc = cb ? put_at(fd, buf + BS, cb * BS, cont * BS) : 0;
    if (!rc)
        rc = put_at(fd, buf, BS, record_at * BS);
    free(buf);
    return rc;
}

static int append_entry(struct entry **arr, size_t *n, size_t *cap, const struct entry *e)
{
    if (*n == *cap) {
        size_t grown = *cap ? *cap * 2 : 64;
        struct entry *p = realloc(*arr, grown * sizeof(*p));
        if (!p)
            return -ENOMEM;
        *arr = p;
        *cap = grown;
    }
    (*arr)[(*n)++] = *e;
    return 0;
}

/* ---- the header ----------------------------------------------------------------- */

static void encode_header(uint8_t *buf, uint64_t size, uint64_t file_id)
{
    memset(buf, 0, BS);
    memcpy(buf, LOG_MAGIC, strlen(LOG_MAGIC));
    put64(buf + 24, size);
    put64(buf + 32, file_id);
    put64(buf + 40, XXH3_64bits(buf, 40));
}

static uint64_t random_u64(void)
{
    uint64_t v = 0;
    while (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v) || v == 0)
        ;
    return v;
}

/* ---- a new log file written front to back (conversion, compaction) ------------ */

struct builder {
    int fd;
    uint64_t file_id;
    uint64_t record_at, next, seq;
    struct entry *batch; /* entries of the record being built */
    size_t nbatch, batch_cap;
    uint64_t batch_bytes;
    struct entry *all; /* every entry, in order, when keep_all */
    size_t nall, all_cap;
    bool keep_all;
};

static int builder_start(struct builder *b, int fd, uint64_t size, bool keep_all)
{
    *b = (struct builder){.fd = fd, .file_id = random_u64(), .record_at = 1, .next = 2, .seq = 1,
                          .keep_all = keep_all};
    uint8_t header[BS];
    encode_header(header, size, b->file_id);
    return put_at(fd, header, BS, 0);
}

static int builder_close_record(struct builder *b)
{
    if (b->nbatch == 0)
        return 0;
    uint64_t cont = b->next;
    uint64_t next = cont + cont_blocks_for(b->nbatch);
    int rc = write_record(b->fd, b->batch, b->nbatch, b->seq, b->file_id, b->record_at, next, cont);
    if (rc)
        return rc;
    b->record_at = next;
    b->next = next + 1;
    b->seq++;
    b->nbatch = 0;
    b->batch_bytes = 0;
    return 0;
}

static int builder_add(struct builder *b, const struct entry *e, const void *data, size_t len)
{
    struct entry copy = *e;
    if (e->kind == ENTRY_DATA) {
        copy.loc = b->next;
        copy.sum = XXH3_64bits(data, len);
        int rc = put_at(b->fd, data, len, b->next * BS);
        if (rc)
            return rc;
        b->next += e->count;
        b->batch_bytes += len;
    }
    int rc = append_entry(&b->batch, &b->nbatch, &b->batch_cap, &copy);
    if (!rc && b->keep_all)
        rc = append_entry(&b->all, &b->nall, &b->all_cap, &copy);
    if (!rc && (b->nbatch >= MAX_RECORD_ENTRIES || b->batch_bytes >= MAX_PENDING_BYTES))
        rc = builder_close_record(b);
    return rc;
}

static void builder_free(struct builder *b)
{
    free(b->batch);
    free(b->all);
}

/* ---- paths ---------------------------------------------------------------------- */

enum layer_file_kind { PATH_LOG, PATH_NEW, PATH_TMP, PATH_OLD_DATA, PATH_OLD_MAP };
/* cur's size, allocation or tail changed (after the change: see
 * layer_allocated_bytes). */
static void space_changed(struct layer *l) { atomic_fetch_add(&l->space_changes, 1); }

static int layer_path(const char *dir, const char *id, enum layer_file_kind kind, char *out)
{
    static const char *const suffix[] = {".log", ".log.new", ".log.tmp", ".data", ".map"};
    return path_join(out, PATH_MAX, "%s/%s%s", dir, id, suffix[kind]);
}

/* ---- the pending entries outlive the process (takeover.h) ----------------------------
 *
 * With layer_share_pending(DIR), every pending entry is also written, as it
 * is made, to DIR/ID.pending, a file in a tmpfs that lives as long as the
 * mount's supervisor:
 *   bytes 0-31   magic, the log's file id, flushed, count
 *   then         count entries of 32 bytes (as in a record)
 * Entries [flushed, count) are not yet in a durable record; what follows
 * them is not read. An entry is written before count grows, count before
 * the write returns; a flush sets flushed after its fdatasync and empties
 * the file when nothing came meanwhile, or else moves what came to the
 * front once it fits below the flushed entries (shared_flushed: the file
 * stays small under a steady stream of writes). Entries are appended
 * through a shared mapping of the file (no system call on a write: stores reach the
 * tmpfs pages, which a takeover reads, as they retire), into space
 * allocated beforehand (so a full tmpfs fails an fallocate, never a
 * store); the header is rewritten with one pwrite, which a kill does not
 * tear. A server that opens the layer after a crash of the previous one
 * applies those entries after the replay, in order (the data they name is in
 * the page cache of ID.log, and is checked against their sums like the last
 * record's), and keeps them pending: the flush that the kernel sends again
 * to it makes them durable. Entries that a durable record already holds
 * (a crash between fdatasync and the update of flushed) are applied twice,
 * in the same order, which changes nothing. */

static int apply_entry(struct layer *l, const struct entry *e, unsigned gen);
static size_t entry_bytes(const struct layer *l, const struct entry *e);
static int data_matches(const struct layer *l, int fd, const struct entry *entries, size_t n);

#define SHARED_MAGIC 0x676e69646e657031ull /* "1pending" */
#define SHARED_HEADER 32u

static char shared_pending_dir[PATH_MAX];

void layer_share_pending(const char *dir)
{
    snprintf(shared_pending_dir, sizeof(shared_pending_dir), "%s", dir ? dir : "");
}

static int shared_path(const char *id, char *out)
{
    return path_join(out, PATH_MAX, "%s/%s.pending", shared_pending_dir, id);
}

/* Rewrites the header; lock held (or the layer not yet shared). False
 * when it could not (logged). */
static bool shared_header(struct layer *l, uint64_t flushed)
{
    uint8_t h[SHARED_HEADER];
    put64(h, SHARED_MAGIC);
    put64(h + 8, l->file_id);
    put64(h + 16, flushed);
    put64(h + 24, l->shared_count);
    if (layer_syscalls.shared_pwrite(l->shared_fd, h, sizeof(h), 0) == (ssize_t)sizeof(h))
        return true;
    log_warn("layer %s: cannot update %s/%s.pending: %s", l->id, shared_pending_dir, l->id, strerror(errno));
    return false;
}

#define SHARED_MAP_MIN 4096u         /* the first mapping: 127 entries */
#define SHARED_MAP_KEEP (64u << 10)  /* a larger one goes when the file empties */

/* Empties the shared file (everything is in durable records); lock held.
 * Its space and mapping stay for the next appends, unless a burst of
 * writes made them large (or there is none yet: a file left by an earlier
 * server is cut). When the header cannot be written, the file still names
 * the entries it named, and shared_count stays with it: appends go on
 * after them, and a takeover applies again, in order, some that are
 * durable, which changes nothing. Returns whether the file was emptied. */
static bool shared_reset(struct layer *l)
{
    if (l->shared_fd < 0)
        return true;
    uint64_t count = l->shared_count;
    l->shared_count = 0;
    if (!shared_header(l, 0)) {
        l->shared_count = count;
        return false;
    }
    l->shared_stale = false;
    if (l->shared_map && l->shared_map_len <= SHARED_MAP_KEEP)
        return true;
    if (l->shared_map)
        munmap(l->shared_map, l->shared_map_len);
    l->shared_map = NULL;
    l->shared_map_len = 0;
    if (ftruncate(l->shared_fd, SHARED_HEADER) < 0)
        log_warn("layer %s: cannot truncate its pending file: %s", l->id, strerror(errno));
    return true;
}

/* Maps the shared file with room for at least need bytes, allocated (a
 * store into a hole of a full tmpfs would be SIGBUS); lock held. */
static int shared_map_room(struct layer *l, size_t need)
{
    if (need <= l->shared_map_len)
        return 0;
    size_t len = l->shared_map_len ? l->shared_map_len : SHARED_MAP_MIN;
    while (len < need)
        len *= 2;
    if (layer_syscalls.fallocate(l->shared_fd, 0, 0, (off_t)len) < 0)
        return -errno;
    void *map = l->shared_map ? mremap(l->shared_map, l->shared_map_len, len, MREMAP_MAYMOVE)
                              : mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, l->shared_fd, 0);
    if (map == MAP_FAILED)
        return -errno;
    l->shared_map = map;
    l->shared_map_len = len;
    return 0;
}

/* Adds a new pending entry to the shared file; lock held. The entry's
 * bytes go before the count that covers it, an aligned 8-byte store that a
 * kill cannot tear (release: no store of the entry comes after it). False
 * when the entry could not be kept (a full tmpfs, or a file not known to
 * be ours: shared_stale): a takeover would not have that write, so the
 * caller flushes before the write returns. */
static bool shared_append(struct layer *l, const struct entry *e)
{
    if (l->shared_fd < 0)
        return true;
    if (l->shared_stale)
        return false; /* the next flush tries the reset again */
    size_t at = SHARED_HEADER + (size_t)l->shared_count * ENTRY_LEN;
    int rc = shared_map_room(l, at + ENTRY_LEN);
    if (rc) {
        if (!l->shared_failing)
            log_warn("layer %s: cannot keep pending entries for a takeover: %s", l->id, strerror(-rc));
        l->shared_failing = true;
        return false;
    }
    l->shared_failing = false;
    encode_entry(l->shared_map + at, e);
    l->shared_count++;
    uint8_t count[8];
    put64(count, l->shared_count);
    uint64_t word;
    memcpy(&word, count, sizeof(word));
    atomic_store_explicit((_Atomic uint64_t *)(void *)(l->shared_map + 24), word, memory_order_release);
    return true;
}

/* After a burst of writes, the file and its mapping would keep their peak
 * size for as long as writes keep coming (no flush empties the file then):
 * when a flush leaves a large one mostly empty, both shrink to twice what
 * it holds. Lock held; the header names only entries below the new end. */
static void shared_shrink(struct layer *l)
{
    size_t used = SHARED_HEADER + (size_t)l->shared_count * ENTRY_LEN;
    if (l->shared_map_len <= SHARED_MAP_KEEP || used > l->shared_map_len / 4)
        return;
    size_t len = SHARED_MAP_MIN;
    while (len < 2 * used)
        len *= 2;
    void *map = mremap(l->shared_map, l->shared_map_len, len, 0); /* in place */
    if (map == MAP_FAILED) {
        log_warn("layer %s: cannot shrink the mapping of its pending file: %s", l->id, strerror(errno));
        return;
    }
    l->shared_map_len = len;
    if (ftruncate(l->shared_fd, (off_t)len) < 0) /* the next growth allocates again what it needs */
        log_warn("layer %s: cannot shrink its pending file: %s", l->id, strerror(errno));
}

/* A flush made the shared file's first taken entries durable; lock held.
 * Empties the file when nothing came meanwhile. Otherwise marks them
 * flushed and, once they are at least as many as those that came after
 * (which then fit where the flushed ones were), moves the later ones to
 * the front: a flush under a steady stream of writes always finds some
 * that came during its sync, and the file would otherwise grow by an
 * entry per write for as long as the stream lasts. Crash-safe at every
 * step: the header names [taken, count) until the copies below it are
 * complete, then names only them, each time with one pwrite. */
static void shared_flushed(struct layer *l, uint64_t taken)
{
    if (l->shared_count == taken) {
        shared_reset(l);
        return;
    }
    uint64_t count = l->shared_count, later = count - taken;
    if (!shared_header(l, taken) || later > taken || !l->shared_map ||
        SHARED_HEADER + count * ENTRY_LEN > l->shared_map_len)
        return; /* (the map covers every entry counted since the last append) */
    memcpy(l->shared_map + SHARED_HEADER, l->shared_map + SHARED_HEADER + taken * ENTRY_LEN,
           (size_t)later * ENTRY_LEN);
    l->shared_count = later;
    if (!shared_header(l, 0))
        l->shared_count = count; /* the file still names [taken, count), untouched */
    else
        shared_shrink(l);
}

/* Opens (or creates) the shared file of a layer just opened or created.
 * With inherit, applies what an earlier server left pending and returns in
 * *end the log block after the last data it names (0: none). */
static int shared_open(struct layer *l, bool inherit, uint64_t *end)
{
    *end = 0;
    l->shared_fd = -1;
    char path[PATH_MAX];
    if (!shared_pending_dir[0] || shared_path(l->id, path) != 0)
        return 0;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        log_warn("layer %s: cannot open %s (%s): a takeover after a crash loses its unflushed writes", l->id, path,
                 strerror(errno));
        return 0;
    }
    l->shared_fd = fd;
    uint8_t h[SHARED_HEADER];
    int rc = inherit ? read_full_at(fd, h, sizeof(h), 0) : -ENODATA;
    uint64_t flushed = rc ? 0 : get64(h + 16), count = rc ? 0 : get64(h + 24);
    if (rc || get64(h) != SHARED_MAGIC || get64(h + 8) != l->file_id || flushed > count) {
        l->shared_stale = true; /* until the header says {0, 0} */
        shared_reset(l);
        return 0;
    }
    l->shared_count = count;
    uint64_t kept = 0;
    for (uint64_t i = flushed; i < count; i++) {
        uint8_t buf[ENTRY_LEN];
        struct entry e;
        if ((rc = read_full_at(fd, buf, ENTRY_LEN, (off_t)(SHARED_HEADER + i * ENTRY_LEN))) != 0)
            return rc == -ENODATA ? 0 : rc;
        decode_entry(buf, &e);
        bool sane = e.count > 0 && e.block < l->blocks && e.count <= l->blocks - e.block &&
                    (e.kind == ENTRY_ZERO || (e.kind == ENTRY_DATA && e.loc >= 1));
        if (!sane || (e.kind == ENTRY_DATA && data_matches(l, l->cur->fd, &e, 1) != 1)) {
            log_warn("layer %s: a pending entry of the previous server does not match its data; dropped", l->id);
            continue;
        }
        if ((rc = apply_entry(l, &e, l->cur->gen)) != 0 ||
            (rc = append_entry(&l->pending, &l->npending, &l->pending_cap, &e)) != 0)
            return rc;
        if (e.kind == ENTRY_DATA) {
            l->pending_bytes += entry_bytes(l, &e);
            if (e.loc + e.count > *end)
                *end = e.loc + e.count;
        }
        kept++;
    }
    if (kept)
        log_info("layer %s: took over %" PRIu64 " unflushed writes of the previous server", l->id, kept);
    return 0;
}

/* ---- opening and closing -------------------------------------------------------- */

static struct layer *layer_alloc(const char *dir, const char *id, uint64_t size)
{
    struct layer *l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    snprintf(l->id, sizeof(l->id), "%s", id);
    l->dir = strdup(dir);
    l->size = size;
    l->shared_fd = -1;
    l->flush_taken_below = UINT64_MAX;
    l->blocks = (size + BS - 1) / BS;
    l->top_len = (size_t)((l->blocks + MID_SPAN - 1) / MID_SPAN) + 1;
    l->top = calloc(l->top_len, sizeof(*l->top));
    pthread_mutex_init(&l->files_lock, NULL);
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* A compaction or a zeroing waits for the writes under way, not for
     * all that would follow them. */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&l->swap_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    pthread_mutex_init(&l->flush_serial, NULL);
    pthread_mutex_init(&l->lock, NULL);
    pthread_mutex_init(&l->zero_lock, NULL);
    pthread_cond_init(&l->zero_done, NULL);
    pthread_mutex_init(&l->turn_lock, NULL);
    pthread_cond_init(&l->turn_changed, NULL);
    atomic_init(&l->zeroing_from, NO_ZEROING);
    const char *through = getenv("IMGFS_LAYER_THROUGH");
    l->through_everywhere = through && strcmp(through, "all") == 0;
    atomic_init(&l->no_direct, through && strcmp(through, "0") == 0);
    if (!l->top || !l->dir) {
        free(l->top);
        free(l->dir);
        free(l);
        return NULL;
    }
    return l;
}

static void compact_cancel(struct layer *l);
static void ahead_release(struct layer *l, uint64_t blocks);

void layer_close(struct layer *l)
{
    if (!l)
        return;
    compact_cancel(l);
    ahead_release(l, atomic_load(&l->ahead_counted));
    if (l->cur)
        file_put(l, l->cur);
    for (int i = 0; i < 4; i++)
        if (l->files[i]) { /* a reader that never released its extent: a bug */
            log_error("layer %s: closed with a pinned extent", l->id);
            file_free(l->files[i]);
        }
    free_index(l);
    free(l->pending);
    free(l->changed);
    if (l->shared_map)
        munmap(l->shared_map, l->shared_map_len);
    if (l->shared_fd >= 0)
        close(l->shared_fd); /* the file stays for the next server */
    pthread_mutex_destroy(&l->files_lock);
    pthread_rwlock_destroy(&l->swap_lock);
    pthread_mutex_destroy(&l->flush_serial);
    pthread_mutex_destroy(&l->lock);
    pthread_mutex_destroy(&l->zero_lock);
    pthread_cond_destroy(&l->zero_done);
    pthread_mutex_destroy(&l->turn_lock);
    pthread_cond_destroy(&l->turn_changed);
    free(l->dir);
    free(l);
}

static void new_id(char id[LAYER_ID_LEN + 1])
{
    uint64_t v = random_u64();
    snprintf(id, LAYER_ID_LEN + 1, "%016" PRIx64, v);
}

int layer_create(const char *dir, uint64_t size, struct layer **out)
{
    char id[LAYER_ID_LEN + 1], path[PATH_MAX];
    new_id(id);
    struct layer *l = layer_alloc(dir, id, size);
    if (!l)
        return -ENOMEM;
    int err = layer_path(dir, id, PATH_LOG, path);
    int fd = err ? -1 : layer_syscalls.open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (!err && fd < 0)
        err = -errno;
    l->file_id = random_u64();
    uint8_t header[BS];
    encode_header(header, size, l->file_id);
    if (!err)
        err = put_at(fd, header, BS, 0);
    if (!err)
        err = sync_fd(fd);
    if (!err)
        err = layer_syscalls.fsync_dir(dir);
    if (!err)
        err = file_install(l, fd, 0, &l->cur);
    if (err) {
        if (fd >= 0)
            close(fd);
        layer_close(l);
        layer_remove(dir, id);
        return err;
    }
    l->record_at = 1;
    l->seq = 1;
    atomic_store(&l->tail, 2);
    atomic_store(&l->kicked, 2);
    uint64_t end;
    shared_open(l, false, &end);
    *out = l;
    return 0;
}

/* Applies one entry of a replayed record. */
static int apply_entry(struct layer *l, const struct entry *e, unsigned gen)
{
    if (e->kind == ENTRY_ZERO)
        return zero_range(l, e->block, e->count);
    int rc = reserve_leaves(l, e->block, e->count);
    for (uint32_t i = 0; i < e->count && !rc; i++)
        slot_set(l, e->block + i, SLOT_DATA(gen, e->loc + i));
    return rc;
}

static size_t entry_bytes(const struct layer *l, const struct entry *e)
{
    uint64_t end = (e->block + e->count) * BS < l->size ? (e->block + e->count) * BS : l->size;
    return (size_t)(end - e->block * BS);
}

/* Reads the record at at: 1 when valid (entries in *out, malloc'd), 0 when
 * not a valid record of this file (the end of the log), or an error. */
static int read_record(const struct layer *l, int fd, uint64_t at, uint64_t seq, struct entry **out, size_t *nout,
                       uint64_t *next)
{
    uint8_t head[BS];
    int rc = read_full_at(fd, head, BS, (off_t)(at * BS));
    if (rc == -ENODATA)
        return 0;
    if (rc)
        return rc;
    uint32_t n = get32(head + 4);
    uint64_t cont = get64(head + 32);
    uint32_t cb = get32(head + 40);
    *next = get64(head + 24);
    if (get32(head) != RECORD_MAGIC || get64(head + 8) != seq || get64(head + 16) != l->file_id ||
        n > MAX_RECORD_ENTRIES || cb != cont_blocks_for(n) || *next <= at || (cb && (cont <= at || cont + cb > *next)))
        return 0;
    uint8_t *buf = malloc((1 + (size_t)cb) * BS);
    struct entry *entries = malloc((n ? n : 1) * sizeof(*entries));
    if (!buf || !entries) {
        free(buf);
        free(entries);
        return -ENOMEM;
    }
    memcpy(buf, head, BS);
    rc = cb ? read_full_at(fd, buf + BS, (size_t)cb * BS, (off_t)(cont * BS)) : 0;
    int valid = 0;
    if (rc == 0) {
        uint64_t want = get64(buf + 48);
        put64(buf + 48, 0);
        valid = XXH3_64bits(buf, (1 + (size_t)cb) * BS) == want;
    }
    for (uint32_t i = 0; valid && i < n; i++) {
        const uint8_t *p = i < INLINE_ENTRIES ? buf + RECORD_HEADER + i * ENTRY_LEN
                                              : buf + BS + (i - INLINE_ENTRIES) * ENTRY_LEN;
        decode_entry(p, &entries[i]);
        const struct entry *e = &entries[i];
        /* I3, and the disk's bounds: a record that breaks them is not ours. */
        valid = e->count > 0 && e->block < l->blocks && e->count <= l->blocks - e->block &&
                (e->kind == ENTRY_ZERO || (e->kind == ENTRY_DATA && e->loc >= 1 && e->loc + e->count <= *next));
    }
    free(buf);
    if (rc == -ENODATA || !valid) {
        free(entries);
        return 0;
    }
    if (rc) {
        free(entries);
        return rc;
    }
    *out = entries;
    *nout = n;
    return 1;
}

/* True when the data of every entry matches its checksum. */
static int data_matches(const struct layer *l, int fd, const struct entry *entries, size_t n)
{
    char *buf = NULL;
    size_t cap = 0;
    int rc = 1;
    for (size_t i = 0; i < n && rc == 1; i++) {
        if (entries[i].kind != ENTRY_DATA)
            continue;
        size_t len = entry_bytes(l, &entries[i]);
        if (len > cap) {
            char *p = realloc(buf, len);
            if (!p) {
                rc = -ENOMEM;
                break;
            }
            buf = p;
            cap = len;
        }
        int err = read_full_at(fd, buf, len, (off_t)(entries[i].loc * BS));
        if (err && err != -ENODATA)
            rc = err;
        else if (err || XXH3_64bits(buf, len) != entries[i].sum)
            rc = 0;
    }
    free(buf);
    return rc;
}

/* Replays the records of the open log file cur into the index. */
static int replay(struct layer *l, int fd)
{
    uint64_t at = 1, seq = 1, held_at = 0, held_next = 0;
    struct entry *held = NULL;
    size_t nheld = 0;
    int rc;
    for (;;) {
        struct entry *entries = NULL;
        size_t n = 0;
        uint64_t next = 0;
        rc = read_record(l, fd, at, seq, &entries, &n, &next);
        if (rc <= 0)
            break;
        /* A valid record after it: the held one is durable (I2). */
        for (size_t i = 0; i < nheld && rc > 0; i++)
            rc = apply_entry(l, &held[i], 0) ? -ENOMEM : 1;
        free(held);
        held = entries;
        nheld = n;
        held_at = at;
        held_next = next;
        at = next;
        seq++;
        if (rc < 0)
            break;
    }
    if (rc < 0) {
        free(held);
        return rc;
    }
    l->record_at = at;
    l->seq = seq;
    if (held) {
        rc = data_matches(l, fd, held, nheld);
        if (rc == 1) {
            for (size_t i = 0; i < nheld && rc >= 0; i++)
                rc = apply_entry(l, &held[i], 0);
            l->record_at = held_next;
        } else if (rc == 0) {
            /* Torn before its flush returned: its writes were never promised. */
            log_warn("layer %s: the last record (%" PRIu64 ") names data that did not reach the disk; dropped",
                     l->id, seq - 1);
            l->record_at = held_at;
            l->seq = seq - 1;
        }
        free(held);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Converts a layer of the old format (ID.data + ID.map bitmap) to a log. */
static int convert_old(const char *dir, const char *id, uint64_t size)
{
    char data_path[PATH_MAX], map_path[PATH_MAX], tmp_path[PATH_MAX], log_path[PATH_MAX];
    int rc = layer_path(dir, id, PATH_OLD_DATA, data_path);
    if (!rc)
        rc = layer_path(dir, id, PATH_OLD_MAP, map_path);
    if (!rc)
        rc = layer_path(dir, id, PATH_TMP, tmp_path);
    if (!rc)
        rc = layer_path(dir, id, PATH_LOG, log_path);
    if (rc)
        return rc;
    uint64_t blocks = (size + BS - 1) / BS;
    int data_fd = open(data_path, O_RDONLY | O_CLOEXEC);
    FILE *map = fopen(map_path, "rbe");
    uint8_t *bits = calloc((size_t)(blocks + 7) / 8 + 1, 1);
    int out = -1;
    if (data_fd < 0 || !map || !bits) {
        rc = !bits ? -ENOMEM : -errno;
        goto done;
    }
    char header[OLD_MAP_HEADER_LEN], want[OLD_MAP_HEADER_LEN] = {0};
    snprintf(want, sizeof(want), OLD_MAP_MAGIC "%" PRIu64 "\n", size);
    if (fread(header, 1, sizeof(header), map) != sizeof(header) || memcmp(header, want, sizeof(want)) != 0 ||
        fread(bits, 1, (size_t)(blocks + 7) / 8, map) != (size_t)(blocks + 7) / 8) {
        rc = -EBADMSG;
        goto done;
    }
    out = layer_syscalls.open(tmp_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) {
        rc = -errno;
        goto done;
    }
    struct builder b;
    rc = builder_start(&b, out, size, false);
    char *piece = rc ? NULL : malloc(1u << 20);
    if (!rc && !piece)
        rc = -ENOMEM;
#define OWNED(x) ((bits[(x) / 8] >> ((x) % 8)) & 1)
    for (uint64_t blk = 0; blk < blocks && !rc;) {
        if (!OWNED(blk)) {
            blk++;
            continue;
        }
        uint64_t end = blk;
        while (end < blocks && OWNED(end) && end - blk < 256)
            end++;
        /* In the old format a hole inside an owned block reads as zeros. */
        off_t d = lseek(data_fd, (off_t)(blk * BS), SEEK_DATA);
        bool is_data = d == (off_t)(blk * BS);
        uint64_t edge = is_data ? (uint64_t)lseek(data_fd, (off_t)(blk * BS), SEEK_HOLE)
                                : (d < 0 ? UINT64_MAX : (uint64_t)d);
        uint64_t edge_block = is_data ? (edge + BS - 1) / BS : edge / BS;
        if (edge_block > blk && edge_block < end)
            end = edge_block;
        struct entry e = {.block = blk, .count = (uint32_t)(end - blk), .kind = is_data ? ENTRY_DATA : ENTRY_ZERO};
        size_t len = (size_t)((end * BS < size ? end * BS : size) - blk * BS);
        if (is_data && (rc = read_full_at(data_fd, piece, len, (off_t)(blk * BS))) == -ENODATA)
            rc = -EBADMSG; /* the old data file always has the disk's size */
        if (!rc)
            rc = builder_add(&b, &e, piece, len);
        blk = end;
    }
#undef OWNED
    if (!rc)
        rc = builder_close_record(&b);
    if (!rc)
        rc = sync_fd(out);
    if (!rc)
        copy_times(data_fd, out);
    if (!rc && layer_syscalls.rename(tmp_path, log_path) < 0)
        rc = -errno;
    if (!rc)
        rc = layer_syscalls.fsync_dir(dir);
    if (!rc && (layer_syscalls.unlink(data_path) < 0 || layer_syscalls.unlink(map_path) < 0))
        rc = -errno;
    if (!rc)
        rc = layer_syscalls.fsync_dir(dir);
    free(piece);
    builder_free(&b);
    if (rc)
        layer_syscalls.unlink(tmp_path);
    else
        log_info("layer %s: converted to the log format", id);
done:
    if (out >= 0)
        close(out);
    if (data_fd >= 0)
        close(data_fd);
    if (map)
        fclose(map);
    free(bits);
    return rc;
}

static void maybe_background(struct layer *l);
static void allocate_ahead(struct layer *l, uint64_t bytes);

/* A takeover after a server died between a compaction's switch and its
 * rename: the shared pending file (in a tmpfs, so the page cache is the one
 * the dead server wrote to) names ID.log.new, which holds every write, the
 * flushed ones in its synced records and the rest after them. Sync it and
 * rename it over ID.log, as the compaction would have. Anything else, after
 * a reboot above all, leaves ID.log as the layer. */
static int finish_switch(const char *dir, const char *id, uint64_t size, const char *log_path)
{
    char new_path[PATH_MAX], shared[PATH_MAX];
    if (!shared_pending_dir[0] || shared_path(id, shared) != 0 || layer_path(dir, id, PATH_NEW, new_path) != 0)
        return 0;
    int sfd = open(shared, O_RDONLY | O_CLOEXEC);
    uint8_t h[SHARED_HEADER], header[BS], want[BS];
    int rc = sfd < 0 ? -errno : read_full_at(sfd, h, sizeof(h), 0);
    if (sfd >= 0)
        close(sfd);
    if (rc || get64(h) != SHARED_MAGIC)
        return 0;
    int fd = layer_syscalls.open(new_path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    rc = read_full_at(fd, header, BS, 0);
    encode_header(want, size, get64(h + 8));
    if (rc || memcmp(header, want, 64) != 0) {
        close(fd);
        return 0;
    }
    rc = sync_fd(fd);
    close(fd);
    if (!rc && layer_syscalls.rename(new_path, log_path) < 0)
        rc = -errno;
    if (!rc)
        rc = layer_syscalls.fsync_dir(dir);
    if (rc)
        log_error("layer %s: cannot finish the compaction its previous server had switched to: %s", id,
                  strerror(-rc));
    else
        log_info("layer %s: finished the compaction its previous server had switched to", id);
    return rc;
}

int layer_open(const char *dir, const char *id, uint64_t size, struct layer **out)
{
    char log_path[PATH_MAX], path[PATH_MAX];
    int rc = layer_path(dir, id, PATH_LOG, log_path);
    if (rc)
        return rc;
    /* Leftovers of a compaction or a conversion that did not finish. */
    if ((rc = finish_switch(dir, id, size, log_path)) != 0)
        return rc;
    if (layer_path(dir, id, PATH_NEW, path) == 0)
        layer_syscalls.unlink(path);
    if (layer_path(dir, id, PATH_TMP, path) == 0)
        layer_syscalls.unlink(path);
    int fd = layer_syscalls.open(log_path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0 && errno == ENOENT && layer_path(dir, id, PATH_OLD_MAP, path) == 0 && access(path, F_OK) == 0) {
        if ((rc = convert_old(dir, id, size)) != 0)
            return rc;
        fd = layer_syscalls.open(log_path, O_RDWR | O_CLOEXEC, 0);
    }
    if (fd < 0)
        return -errno;
    /* A conversion that renamed its log but did not remove the old files. */
    bool stale = false;
    for (enum layer_file_kind k = PATH_OLD_DATA; k <= PATH_OLD_MAP; k++)
        if (layer_path(dir, id, k, path) == 0 && layer_syscalls.unlink(path) == 0)
            stale = true;
    if (stale)
        layer_syscalls.fsync_dir(dir);
    struct layer *l = layer_alloc(dir, id, size);
    if (!l) {
        close(fd);
        return -ENOMEM;
    }
    uint8_t header[BS], want[BS];
    rc = read_full_at(fd, header, BS, 0);
    l->file_id = rc ? 0 : get64(header + 32);
    encode_header(want, size, l->file_id);
    if (rc == -ENODATA || (!rc && memcmp(header, want, 64) != 0))
        rc = -EBADMSG;
    if (!rc)
        rc = file_install(l, fd, 0, &l->cur);
    else
        close(fd);
    if (!rc)
        rc = replay(l, fd);
    /* After a takeover, the data of what the previous server left pending
     * follows the last record: it stays, and new data goes after it. */
    uint64_t pending_end = 0;
    if (!rc)
        rc = shared_open(l, true, &pending_end);
    uint64_t keep = pending_end > l->record_at + 1 ? pending_end : l->record_at;
    struct stat st;
    if (!rc && fstat(fd, &st) < 0)
        rc = -errno;
    /* Cut what follows the last record: nothing stale is read again. */
    if (!rc && (uint64_t)st.st_size > keep * BS) {
        if (layer_syscalls.ftruncate(fd, (off_t)(keep * BS)) < 0)
            rc = -errno;
        else
            rc = sync_fd(fd);
    }
    if (rc) {
        layer_close(l);
        return rc;
    }
    uint64_t tail = pending_end > l->record_at + 1 ? pending_end : l->record_at + 1;
    atomic_store(&l->tail, tail);
    atomic_store(&l->kicked, tail);
    maybe_background(l);
    *out = l;
    return 0;
}

int layer_remove(const char *dir, const char *id)
{
    int err = 0;
    char shared[PATH_MAX];
    if (shared_pending_dir[0] && shared_path(id, shared) == 0)
        unlink(shared);
    for (enum layer_file_kind k = PATH_LOG; k <= PATH_OLD_MAP; k++) {
        char path[PATH_MAX];
        int rc = layer_path(dir, id, k, path);
        if (!rc && layer_syscalls.unlink(path) < 0 && errno != ENOENT)
            rc = -errno;
        if (rc && !err)
            err = rc;
    }
    return err;
}

/* ---- queries -------------------------------------------------------------------- */

const char *layer_id(const struct layer *l)
{
    return l->id;
}

uint64_t layer_size(const struct layer *l)
{
    return l->size;
}

bool layer_owns(const struct layer *l, uint64_t block)
{
    return block < l->blocks && slot_get(l, block) != SLOT_NONE;
}

uint64_t layer_owned_blocks(const struct layer *l)
{
    return atomic_load(&l->owned);
}

uint64_t layer_allocated_bytes(const struct layer *cl)
{
    struct layer *l = (struct layer *)cl; /* the cached answer is not the layer's state */
    /* Read before the fstat: a change during it moves the counter past
     * what is cached, and the next call asks again. */
    uint64_t seen = atomic_load(&l->space_changes);
    pthread_mutex_lock(&l->lock); /* cur changes under it */
    if (l->space_known && l->space_seen == seen) {
        uint64_t bytes = l->space_bytes;
        pthread_mutex_unlock(&l->lock);
        return bytes;
    }
    struct stat st;
    int rc = fstat(l->cur->fd, &st);
    uint64_t tail = atomic_load(&l->tail) * BS, bytes = 0;
    if (rc == 0) {
        /* Not what is zeroed ahead of the tail, nor the next record's block
         * (zeroed too, then): they hold nothing yet, as before zeroing. */
        uint64_t used = (uint64_t)st.st_blocks * 512;
        uint64_t ahead = (uint64_t)st.st_size > tail ? (uint64_t)st.st_size - tail + BS : 0;
        bytes = used > ahead ? used - ahead : 0;
        l->space_known = true;
        l->space_seen = seen;
        l->space_bytes = bytes;
    }
    pthread_mutex_unlock(&l->lock);
    return bytes;
}

void layer_stats(const struct layer *l, struct layer_stats *out)
{
    uint64_t tail = atomic_load(&l->tail);
    out->owned_blocks = atomic_load(&l->owned);
    out->data_blocks = atomic_load(&l->live);
    out->log_blocks = tail > 1 ? tail - 1 : 0;
    out->compactions = atomic_load(&l->compactions);
    out->compact_ns = atomic_load(&l->compact_ns);
    out->compact_pause_ns = atomic_load(&l->compact_pause_ns);
    out->compact_flush_hold_ns = atomic_load(&l->compact_flush_hold_ns);
    out->compact_bytes = atomic_load(&l->compact_bytes);
    out->through_blocks = atomic_load(&l->through_blocks);
}

int layer_extent_at(struct layer *l, uint64_t off, uint64_t max_len, struct layer_extent *out)
{
    *out = (struct layer_extent){.kind = LAYER_EXTENT_UNOWNED, .fd = -1};
    if (off >= l->size || max_len == 0)
        return -EINVAL;
    uint64_t end = max_len < l->size - off ? off + max_len : l->size;
    uint64_t block = off / BS, end_block = (end + BS - 1) / BS, run_end;
    for (;;) {
        uint64_t s = slot_get(l, block);
        if (s == SLOT_NONE || s == SLOT_ZERO) {
            out->kind = s == SLOT_NONE ? LAYER_EXTENT_UNOWNED : LAYER_EXTENT_ZERO;
            run_end = run_end_of(l, block + 1, end_block, s);
            break;
        }
        struct log_file *f = file_get(l, SLOT_GEN(s));
        if (!f)
            continue; /* a compaction just moved the block: look again */
        run_end = block + 1;
        while (run_end < end_block && slot_get(l, run_end) == s + (run_end - block))
            run_end++;
        out->kind = LAYER_EXTENT_DATA;
        out->fd = f->fd;
        out->pos = SLOT_LOC(s) * BS + off % BS;
        out->pin = f;
        break;
    }
    out->len = (run_end * BS < end ? run_end * BS : end) - off;
    return 0;
}

void layer_extent_release(struct layer *l, struct layer_extent *e)
{
    if (e->pin)
        file_put(l, e->pin);
    e->pin = NULL;
    e->fd = -1;
}

int layer_read(struct layer *l, void *buf, size_t len, uint64_t off)
{
    if (off > l->size || len > l->size - off)
        return -EINVAL;
    char *p = buf;
    while (len > 0) {
        struct layer_extent e;
        int rc = layer_extent_at(l, off, len, &e);
        if (rc)
            return rc;
        if (e.kind == LAYER_EXTENT_DATA)
            rc = read_full_at(e.fd, p, (size_t)e.len, (off_t)e.pos);
        else if (e.kind == LAYER_EXTENT_ZERO)
            memset(p, 0, (size_t)e.len);
        else
            rc = -EINVAL;
        layer_extent_release(l, &e);
        if (rc)
            return rc == -ENODATA ? -EIO : rc;
        p += e.len;
        off += e.len;
        len -= (size_t)e.len;
    }
    return 0;
}

/* ---- writing -------------------------------------------------------------------- */

/* Starts writeback of what was appended since the last kick, so that data
 * does not wait in the page cache for the next flush. */
static void kick_writeback(struct layer *l, unsigned gen, uint64_t upto)
{
    uint64_t from = atomic_load(&l->kicked);
    if (upto <= from || (upto - from) * BS < KICK_BYTES || !atomic_compare_exchange_strong(&l->kicked, &from, upto))
        return;
    /* Without swap_lock (this may wait for the device queue, and a flush
     * must not wait for it), so the file is pinned. */
    struct log_file *f = file_get(l, gen);
    if (!f)
        return; /* compacted meanwhile: the new file was synced */
    sync_file_range(f->fd, (off_t)(from * BS), (off_t)((upto - from) * BS), SYNC_FILE_RANGE_WRITE);
    file_put(l, f);
}

/* Waits until no zeroing ahead writes below end: the caller reserved log
 * blocks up to end and is about to write them. A zeroing that starts later
 * starts at the tail, above them. */
static void wait_for_zeroing(struct layer *l, uint64_t end)
{
    if (end <= atomic_load(&l->zeroing_from))
        return;
    pthread_mutex_lock(&l->zero_lock);
    while (end > atomic_load(&l->zeroing_from))
        pthread_cond_wait(&l->zero_done, &l->zero_lock);
    pthread_mutex_unlock(&l->zero_lock);
}

/* Notes a changed range for a compaction under way. lock held. */
static int note_changed(struct layer *l, uint64_t first, uint64_t count)
{
    if (!l->tracking)
        return 0;
    struct entry e = {.block = first, .count = (uint32_t)count};
    return append_entry(&l->changed, &l->nchanged, &l->changed_cap, &e);
}

/* ---- write-through ------------------------------------------------------------ */

/* Why: a guest that writes with O_DIRECT has its bytes on the device when a
 * write to a local file returns; through the page cache, all of its data
 * would be written back inside its next fsync, which then costs that write
 * as well as the device's flush. Written with O_DIRECT into blocks zeroed
 * ahead (allocated and synced: an overwrite, which ext4 does under a shared
 * inode lock and with no journal), the data is on the device when the write
 * returns, and a flush writes its record and flushes the device. Not past
 * the zeroed blocks: there an O_DIRECT write allocates, and the file system
 * serializes it with its metadata update.
 *
 * The page cache: the kernel writes back and drops the cached pages of the
 * range of an O_DIRECT write, before and after it; and nothing reads these
 * blocks before the write returned and the index names them (I1), so a read
 * through fd (buffered or spliced) sees the new bytes. */

/* Page-cache and O_DIRECT writes to the log take turns. Why: the kernel
 * drops the cached pages of an O_DIRECT write's range after the write, and
 * cannot drop a page dirtied meanwhile. With large folios (ext4 has them
 * since 6.16, and pages may be over 4 KiB), one folio covers several log
 * blocks: a page-cache write to a neighbour of a block written through (a
 * record, a guest's buffered write) could dirty the folio that a read had
 * just brought in with the block's old bytes, and every later read would
 * get those. Writes of one kind run in parallel; a kind waiting for its
 * turn holds back new writes of the other, so neither starves. */
static void write_turn_enter(struct layer *l, bool direct)
{
    pthread_mutex_lock(&l->turn_lock);
    if (l->turn_writes && (l->turn_direct != direct || l->turn_waiting[!direct])) {
        l->turn_waiting[direct]++;
        while (l->turn_writes && (l->turn_direct != direct || l->turn_waiting[!direct]))
            pthread_cond_wait(&l->turn_changed, &l->turn_lock);
        l->turn_waiting[direct]--;
    }
    l->turn_direct = direct;
    l->turn_writes++;
    pthread_mutex_unlock(&l->turn_lock);
}

static void write_turn_leave(struct layer *l)
{
    pthread_mutex_lock(&l->turn_lock);
    if (--l->turn_writes == 0 && (l->turn_waiting[0] || l->turn_waiting[1]))
        pthread_cond_broadcast(&l->turn_changed);
    pthread_mutex_unlock(&l->turn_lock);
}

/* A page-cache write to cur's log. */
static int put_cached(struct layer *l, int fd, const void *buf, size_t len, uint64_t off)
{
    write_turn_enter(l, false);
    int rc = put_at(fd, buf, len, off);
    write_turn_leave(l);
    return rc;
}

/* The file's O_DIRECT descriptor, opened on first use; -1 when it has none. */
static int direct_fd(struct log_file *f)
{
    int dfd = atomic_load(&f->dfd);
    if (dfd != DIRECT_UNOPENED)
        return dfd;
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", f->fd);
    int fresh = layer_syscalls.open(path, O_WRONLY | O_DIRECT | O_CLOEXEC, 0);
    if (fresh < 0)
        fresh = -1;
    if (!atomic_compare_exchange_strong(&f->dfd, &dfd, fresh)) {
        if (fresh >= 0)
            close(fresh);
        return dfd; /* another writer opened it first */
    }
    return fresh;
}

/* A block-aligned buffer of at least len bytes, one per thread (guest
 * writes come in at any alignment; O_DIRECT wants aligned memory). */
#define BOUNCE_MAX (1u << 20) /* larger writes go through the page cache */
struct bounce {
    char *p;
    size_t cap;
};
static pthread_key_t bounce_key;
static bool bounce_key_made;
static void bounce_free(void *arg)
{
    struct bounce *b = arg;
    free(b->p);
    free(b);
}
static void bounce_make_key(void)
{
    bounce_key_made = pthread_key_create(&bounce_key, bounce_free) == 0;
}
static char *bounce_for(size_t len)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, bounce_make_key);
    if (!bounce_key_made)
        return NULL;
    struct bounce *b = pthread_getspecific(bounce_key);
    if (!b) {
        if (!(b = calloc(1, sizeof(*b))))
            return NULL;
        if (pthread_setspecific(bounce_key, b) != 0) {
            free(b);
            return NULL;
        }
    }
    if (b->cap < len) {
        void *p;
        if (posix_memalign(&p, BS, len) != 0)
            return NULL;
        free(b->p);
        b->p = p;
        b->cap = len;
    }
    return b->p;
}

/* Writes whole blocks at pos with O_DIRECT: 0, -EOPNOTSUPP when this
 * cannot be done here (nothing was written: write them through the page
 * cache), or the write's error. */
static int put_direct(struct layer *l, struct log_file *f, const void *buf, size_t len, uint64_t pos)
{
    int dfd = atomic_load(&l->no_direct) ? -1 : direct_fd(f);
    const char *src = buf;
    if (dfd >= 0 && (uintptr_t)buf % BS) {
        char *b = len <= BOUNCE_MAX ? bounce_for(len) : NULL;
        if (b)
            memcpy(b, buf, len);
        src = b;
    }
    if (dfd < 0 || !src)
        return -EOPNOTSUPP;
    write_turn_enter(l, true);
    int rc = put_at(dfd, src, len, pos);
    write_turn_leave(l);
    if (rc == -EINVAL) {
        /* The file system wants a larger alignment: not for this layer. */
        atomic_store(&l->no_direct, true);
        return -EOPNOTSUPP;
    }
    return rc;
}

/* layer_write and layer_write_through. */
static int write_blocks(struct layer *l, const void *buf, size_t len, uint64_t off, bool through)
{
    if (off % BS || off > l->size || len > l->size - off || len == 0 || (len % BS && off + len != l->size))
        return -EINVAL;
    uint64_t block = off / BS;
    uint64_t count = (len + BS - 1) / BS;
    if (count > MAX_ENTRY_BLOCKS)
        return -EINVAL;
    pthread_rwlock_rdlock(&l->swap_lock);
    struct log_file *f = l->cur;
    uint64_t loc = atomic_fetch_add(&l->tail, count);
    wait_for_zeroing(l, loc + count);
    int rc = l->broken ? -EIO : -EOPNOTSUPP;
    if (rc == -EOPNOTSUPP && through && len % BS == 0 &&
        (l->through_everywhere || loc + count <= atomic_load(&l->ahead)))
        if ((rc = put_direct(l, f, buf, len, loc * BS)) == 0)
            atomic_fetch_add(&l->through_blocks, len / BS);
    if (rc == -EOPNOTSUPP)
        rc = put_cached(l, f->fd, buf, len, loc * BS);
    space_changed(l); /* the tail moved, and the log grew (or failed to) */
    struct entry e = {block, (uint32_t)count, ENTRY_DATA, loc, rc ? 0 : XXH3_64bits(buf, len)};
    bool flush_now = false;
    if (!rc) {
        pthread_mutex_lock(&l->lock);
        rc = reserve_leaves(l, block, count);
        if (!rc)
            rc = note_changed(l, block, count);
        if (!rc)
            rc = append_entry(&l->pending, &l->npending, &l->pending_cap, &e);
        if (!rc) {
            bool shared = shared_append(l, &e);
            for (uint64_t i = 0; i < count; i++)
                slot_set(l, block + i, SLOT_DATA(f->gen, loc + i));
            l->pending_bytes += len;
            flush_now = !shared || l->npending >= MAX_RECORD_ENTRIES || l->pending_bytes >= MAX_PENDING_BYTES;
        }
        pthread_mutex_unlock(&l->lock);
    }
    unsigned gen = f->gen;
    pthread_rwlock_unlock(&l->swap_lock);
    if (!rc && atomic_load_explicit(&l->writes_through, memory_order_relaxed) != through)
        atomic_store_explicit(&l->writes_through, through, memory_order_relaxed);
    if (!rc)
        kick_writeback(l, gen, loc + count);
    atomic_store(&l->last_io_ns, now_ns());
    return !rc && flush_now ? layer_flush(l) : rc;
}

int layer_write(struct layer *l, const void *buf, size_t len, uint64_t off)
{
    return write_blocks(l, buf, len, off, false);
}

int layer_write_through(struct layer *l, const void *buf, size_t len, uint64_t off)
{
    return write_blocks(l, buf, len, off, true);
}

/* Log blocks that a punch made dead, to be given back to the file system. */
struct dead_runs {
    struct entry *runs; /* loc and count */
    size_t n, cap;
};

/* The first log block of cur that may hold data of no closed record:
 * record_at, or the data of a pending entry below it (I3), or that of an
 * entry a flush under way took, which goes back to pending if its record
 * cannot be written. A write still under way has no slot yet, so no caller
 * sees its blocks. lock held. */
static uint64_t closed_below(const struct layer *l)
{
    uint64_t below = l->record_at < l->flush_taken_below ? l->record_at : l->flush_taken_below;
    for (size_t i = 0; i < l->npending; i++)
        if (l->pending[i].kind == ENTRY_DATA && l->pending[i].loc < below)
            below = l->pending[i].loc;
    return below;
}

/* Notes the log data of [first, first+count) that is in records already
 * closed (below closed_below(), given as below), in runs. lock held. */
static void note_dead(struct layer *l, uint64_t first, uint64_t count, uint64_t below, struct dead_runs *d)
{
    unsigned gen = l->cur->gen;
    for (uint64_t b = first; b < first + count;) {
        uint64_t s = slot_get(l, b);
        if (s == SLOT_NONE || s == SLOT_ZERO) {
            b = run_end_of(l, b + 1, first + count, s);
            continue;
        }
        b++;
        if (SLOT_GEN(s) != gen || SLOT_LOC(s) >= below)
            continue;
        struct entry *last = d->n ? &d->runs[d->n - 1] : NULL;
        if (last && last->loc + last->count == SLOT_LOC(s) && last->count < MAX_ENTRY_BLOCKS) {
            last->count++;
        } else {
            struct entry e = {.loc = SLOT_LOC(s), .count = 1};
            if (append_entry(&d->runs, &d->n, &d->cap, &e))
                return; /* out of memory: that space waits for compaction */
        }
    }
}

int layer_punch(struct layer *l, uint64_t first, uint64_t count)
{
    if (first > l->blocks || count > l->blocks - first)
        return -EINVAL;
    int rc = 0;
    struct dead_runs dead = {0};
    pthread_rwlock_rdlock(&l->swap_lock);
    unsigned gen = l->cur->gen;
    atomic_fetch_add(&l->changes, 1);
    pthread_mutex_lock(&l->lock);
    uint64_t below = closed_below(l); /* the punch adds no data entry */
    for (uint64_t b = first; b < first + count && !rc;) {
        uint64_t n = first + count - b < MAX_ENTRY_BLOCKS ? first + count - b : MAX_ENTRY_BLOCKS;
        struct entry e = {.block = b, .count = (uint32_t)n, .kind = ENTRY_ZERO};
        rc = atomic_load(&l->broken) ? -EIO : note_changed(l, b, n);
        if (!rc)
            rc = append_entry(&l->pending, &l->npending, &l->pending_cap, &e);
        if (!rc) {
            shared_append(l, &e); /* the punch flushes before it returns */
            note_dead(l, b, n, below, &dead);
        }
        if (!rc)
            rc = zero_range(l, b, n);
        b += n;
    }
    pthread_mutex_unlock(&l->lock);
    pthread_rwlock_unlock(&l->swap_lock);
    /* The dead data is named by records before the one this punch goes in
     * (closed ones, or the one a flush under way wrote: flush_serial puts
     * the punch's after it; not one it may yet fail to write, whose
     * entries would come back into the punch's). Once the punch is durable, no
     * replay can need those bytes (I2: only the last record's data is
     * checked), so the space can go back to the file system. */
    if (!rc)
        rc = layer_flush(l);
    if (!rc && dead.n) {
        pthread_rwlock_rdlock(&l->swap_lock);
        for (size_t i = 0; i < dead.n && l->cur->gen == gen; i++)
            layer_syscalls.fallocate(l->cur->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(dead.runs[i].loc * BS),
                      (off_t)((uint64_t)dead.runs[i].count * BS)); /* only space: failure loses nothing */
        pthread_rwlock_unlock(&l->swap_lock);
        space_changed(l);
    }
    free(dead.runs);
    return rc;
}

/* Writes a flush's record at at, its continuation blocks at cont
 * (write_record). With O_DIRECT when direct (the guest writes through and
 * the blocks are zeroed ahead): then the record waits for none of the
 * O_DIRECT writes under way, as a page-cache write would (they take turns,
 * and ext4 holds a buffered write until the direct ones end), and the
 * fdatasync after it has nothing to write back. */
static int put_record(struct layer *l, struct log_file *f, bool direct, const struct entry *entries, size_t n,
                      uint64_t seq, uint64_t at, uint64_t next, uint64_t cont)
{
    size_t cb = cont_blocks_for(n);
    uint8_t *buf = direct ? (uint8_t *)bounce_for((1 + cb) * BS) : NULL; /* aligned */
    int rc = -EOPNOTSUPP;
    if (buf) {
        encode_record(buf, entries, n, seq, l->file_id, next, cont);
        rc = cb ? put_direct(l, f, buf + BS, cb * BS, cont * BS) : 0;
        if (!rc)
            rc = put_direct(l, f, buf, BS, at * BS);
    }
    if (rc == -EOPNOTSUPP) {
        write_turn_enter(l, false);
        rc = write_record(f->fd, entries, n, seq, l->file_id, at, next, cont);
        write_turn_leave(l);
    }
    return rc;
}

int layer_flush(struct layer *l)
{
    pthread_mutex_lock(&l->flush_serial);
    /* Shared, as a write takes it: a zeroing ahead, which takes it
     * exclusively to choose where it starts, then sees the blocks this
     * reserves. The writes under way are not waited for: the record holds
     * the writes that returned (their entries are pending), and the others
     * go in a later one (I3). */
    pthread_rwlock_rdlock(&l->swap_lock);
    pthread_mutex_lock(&l->lock);
    int rc = l->broken;
    struct entry *entries = l->pending;
    size_t n = l->npending;
    uint64_t taken = l->shared_count; /* the shared file's entries this record holds */
    uint64_t at = l->record_at, seq = l->seq, cont = 0, next = 0, bytes = l->pending_bytes;
    if (!rc && n > 0) {
        l->pending = NULL;
        l->npending = l->pending_cap = 0;
        l->pending_bytes = 0;
        for (size_t i = 0; i < n; i++)
            if (entries[i].kind == ENTRY_DATA && entries[i].loc < l->flush_taken_below)
                l->flush_taken_below = entries[i].loc;
        /* Continuation blocks and the next record's block come after all
         * data reserved so far (I3). */
        size_t cb = cont_blocks_for(n);
        cont = atomic_fetch_add(&l->tail, cb + 1);
        next = cont + cb;
        l->record_at = next;
        l->seq = seq + 1;
    }
    struct log_file *f = l->cur; /* cur changes only with flush_serial held */
    int fd = f->fd;
    pthread_mutex_unlock(&l->lock);
    pthread_rwlock_unlock(&l->swap_lock);
    if (!rc && n > 0) {
        wait_for_zeroing(l, next + 1);
        /* Blocks reserved below ahead are zeroed, or allocated for large
         * flushes (the tail is never below where a zeroing started): at's
         * was when the last flush took it. */
        bool zeroed = next + 1 <= atomic_load(&l->ahead);
        bool direct = atomic_load(&l->writes_through) && (l->through_everywhere || (l->record_zeroed && zeroed));
        rc = put_record(l, f, direct, entries, n, seq, at, next, cont);
        space_changed(l); /* the record's blocks, past the old tail */
        if (!rc) {
            l->record_zeroed = zeroed;
            pthread_mutex_lock(&l->lock);
            l->flush_taken_below = UINT64_MAX; /* their record is written */
            pthread_mutex_unlock(&l->lock);
        }
        if (rc) {
            /* Nothing was promised yet: put the entries back in front of
             * those that came meanwhile, and write the record here again. */
            pthread_mutex_lock(&l->lock);
            l->flush_taken_below = UINT64_MAX; /* pending again (or the layer broken) */
            int grown = 0;
            size_t cap = n;
            for (size_t i = 0; i < l->npending && !grown; i++)
                grown = append_entry(&entries, &n, &cap, &l->pending[i]);
            if (!grown) {
                free(l->pending);
                l->pending = entries;
                l->npending = n;
                l->pending_cap = cap;
                entries = NULL;
                l->record_at = at;
                l->seq = seq;
            } else {
                atomic_store(&l->broken, -EIO);
            }
            pthread_mutex_unlock(&l->lock);
            free(entries);
            pthread_mutex_unlock(&l->flush_serial);
            return rc;
        }
        if (bytes > AHEAD_FLUSH_MAX && atomic_load(&l->writes_through))
            allocate_ahead(l, bytes); /* made durable by the sync below */
        rc = sync_fd(fd);
        if (rc) {
            /* What reached the disk is unknown: refuse further writes rather
             * than build on it (the data flushed before stays readable). */
            log_error("layer %s: flush failed: %s", l->id, strerror(-rc));
            atomic_store(&l->broken, rc);
        } else if (bytes > 0) {
            atomic_store(&l->small_flushes, bytes <= AHEAD_FLUSH_MAX);
        }
        if (!rc && l->shared_fd >= 0) {
            pthread_mutex_lock(&l->lock);
            shared_flushed(l, taken);
            pthread_mutex_unlock(&l->lock);
        }
    }
    free(entries);
    pthread_mutex_unlock(&l->flush_serial);
    if (!rc && n > 0)
        maybe_background(l);
    return rc;
}

/* ---- compaction ----------------------------------------------------------------- */

static pthread_mutex_t compact_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t compact_cond = PTHREAD_COND_INITIALIZER;
/* Two threads, so that one large layer's compaction does not hold back
 * every other layer's. */
#define COMPACT_THREADS 2
static struct layer *compact_queue; /* guarded by compact_lock */
static unsigned compact_threads;

/* A size in bytes from the environment variable name, or fallback; read
 * once into *cached (UINT64_MAX until then), since it is asked on every
 * flush. For the tests' knobs. */
static uint64_t env_size_once(_Atomic uint64_t *cached, const char *name, uint64_t fallback)
{
    uint64_t v = atomic_load(cached);
    if (v == UINT64_MAX) {
        const char *env = getenv(name);
        if (!env || parse_size(env, &v) != 0)
            v = fallback;
        atomic_store(cached, v);
    }
    return v;
}

static uint64_t compact_min_bytes(void)
{
    static _Atomic uint64_t cached = UINT64_MAX;
    return env_size_once(&cached, "IMGFS_LAYER_COMPACT_MIN", 64ull << 20);
}

/* For the tests: a pause after the switch, before the rename (phase 3),
 * for as long as the file IMGFS_TEST_COMPACT_PAUSE_FILE names exists, so
 * that a test can write while the layer runs on ID.log.new, or kill the
 * daemon while that file is complete but not yet renamed, whatever the
 * machine's speed (a pause of a fixed time could end before the test got
 * there). At most COMPACT_TEST_PAUSE_MAX_NS, so that a failing test does
 * not leave the layer waiting. */
#define COMPACT_TEST_PAUSE_MAX_NS (120ull * 1000000000ull)
static const char *compact_test_pause_file(void)
{
    const char *path = getenv("IMGFS_TEST_COMPACT_PAUSE_FILE");
    return path && access(path, F_OK) == 0 ? path : NULL;
}

static bool wants_compaction(const struct layer *l)
{
    uint64_t log = atomic_load(&l->tail) - 1, live = atomic_load(&l->live);
    uint64_t dead = log > live ? log - live : 0;
    return dead >= live && dead * BS >= compact_min_bytes();
}

/* ---- zeroing ahead ---------------------------------------------------------------- */

/* Why: a flush's fdatasync() of data appended past the end of the file also
 * commits the file system's journal (the new blocks and the size): more
 * ordered writes on the device, where a flush of data written over
 * allocated blocks costs one. So when the guest flushes often and little
 * (a database, a journaling guest file system), the blocks just past the
 * tail are written with zeros and synced beforehand, a window at a time, by
 * the background thread. Nothing reads them: replay rejects zeros as a
 * record, and open cuts the log after the last record. */

/* The zeros that all open layers hold ahead of their tails, in blocks, so
 * that 2,000 VMs that write cannot hold 16 MiB each (32 GB): AHEAD_HOST_MAX
 * at most. Each layer's share is counted when it zeroes and given back as
 * its tail passes it (counted again at its next zeroing or compaction: till
 * then a share may be counted too high, never too low), at a compaction's
 * switch and at close. */
static _Atomic uint64_t ahead_host_blocks;

/* The blocks of l prepared ahead of its tail now. */
static uint64_t ahead_held(const struct layer *l)
{
    uint64_t tail = atomic_load(&l->tail), ahead = atomic_load(&l->ahead);
    return ahead > tail ? ahead - tail : 0;
}

/* Counts what l holds ahead now. The caller holds l's compaction claim, so
 * ahead does not move and the tail only grows: held only shrinks after. */
static void ahead_recount(struct layer *l)
{
    uint64_t held = ahead_held(l), counted = atomic_load(&l->ahead_counted);
    if (held < counted) {
        atomic_fetch_sub(&ahead_host_blocks, counted - held);
        atomic_store(&l->ahead_counted, held);
    }
}

/* AHEAD_HOST_MAX in blocks, or IMGFS_LAYER_AHEAD_HOST_MAX (tests). */
static uint64_t ahead_host_max(void)
{
    static _Atomic uint64_t cached = UINT64_MAX;
    return env_size_once(&cached, "IMGFS_LAYER_AHEAD_HOST_MAX", AHEAD_HOST_MAX) / BS;
}

uint64_t layer_ahead_host_bytes(void) { return atomic_load(&ahead_host_blocks) * BS; }

/* Takes blocks from the host's budget for l: false when they do not fit. */
static bool ahead_reserve(struct layer *l, uint64_t blocks)
{
    uint64_t have = atomic_load(&ahead_host_blocks), max = ahead_host_max();
    do {
        if (have + blocks > max)
            return false;
    } while (!atomic_compare_exchange_weak(&ahead_host_blocks, &have, have + blocks));
    atomic_fetch_add(&l->ahead_counted, blocks);
    return true;
}

static void ahead_release(struct layer *l, uint64_t blocks)
{
    atomic_fetch_sub(&ahead_host_blocks, blocks);
    atomic_fetch_sub(&l->ahead_counted, blocks);
}

/* The window: a quarter of the log, within [AHEAD_MIN, AHEAD_MAX], in
 * blocks; so the space a layer holds ahead grows with what it wrote. */
static uint64_t ahead_window(const struct layer *l)
{
    uint64_t w = atomic_load(&l->tail) * BS / 4;
    w = w < AHEAD_MIN ? AHEAD_MIN : w > AHEAD_MAX ? AHEAD_MAX : w;
    return w / BS;
}

/* True when the tail has passed all the zeros l is counted for, or half a
 * window of them: a background pass then gives them back (ahead_recount). A
 * layer that zeroes again recounts anyway; this is for one whose flushes
 * grew large, which asks for no zeros and would keep its share until it
 * closed. */
static bool ahead_stale(const struct layer *l)
{
    uint64_t held = ahead_held(l), counted = atomic_load(&l->ahead_counted);
    return counted > held && (held == 0 || counted - held >= ahead_window(l) / 2);
}

/* How long a layer that holds zeros ahead may write nothing before they go
 * back (layer_set_ahead_idle). */
static _Atomic uint64_t ahead_idle = AHEAD_IDLE_NS;
static uint64_t ahead_idle_ns(void) { return atomic_load(&ahead_idle); }

/* Gives back the zeros ahead of an idle layer's tail: the log is cut at the
 * tail, where the log of a layer that never zeroed ends (open cuts the
 * zeros anyway, so a crash on either side of the cut opens the same layer),
 * and its share of the host's budget goes back. Its next small flush asks
 * for zeros again. With the compaction claim held (ahead and cur stay) and
 * swap_lock exclusively, so that no write reserves a block or writes data
 * meanwhile; a flush writes its record below the tail. The cut moves the
 * log's times, which are the layer's: they are put back, with lock held
 * from the fstat on, so that a layer_set_times (which takes only lock)
 * comes before the fstat or after the times are back, never lost between
 * (lock across one ftruncate of a few MiB of zeros: stat and utimensat of
 * this layer wait for it, nothing else that takes lock runs meanwhile). */
static void give_back_ahead(struct layer *l)
{
    pthread_rwlock_wrlock(&l->swap_lock);
    pthread_mutex_lock(&l->lock);
    uint64_t tail = atomic_load(&l->tail);
    int fd = l->cur->fd;
    struct stat before;
    if (ahead_held(l) > 0 && fstat(fd, &before) == 0 && (uint64_t)before.st_size > tail * BS) {
        if (layer_syscalls.ftruncate(fd, (off_t)(tail * BS)) == 0) {
            atomic_store(&l->ahead, tail);
            space_changed(l);
            struct timespec times[2] = {before.st_atim, before.st_mtim};
            futimens(fd, times);
        } else {
            log_warn("layer %s: cannot give back its zeros ahead: %s", l->id, strerror(errno));
        }
    }
    pthread_mutex_unlock(&l->lock);
    pthread_rwlock_unlock(&l->swap_lock);
    ahead_recount(l);
}

/* What a pass of zero_ahead would prepare now: [max(tail, ahead), tail +
 * window), empty when from >= to. */
static void ahead_gap(const struct layer *l, uint64_t *from, uint64_t *to)
{
    uint64_t tail = atomic_load(&l->tail), ahead = atomic_load(&l->ahead);
    *from = tail > ahead ? tail : ahead;
    *to = tail + ahead_window(l);
}

static bool ahead_enabled(void)
{
    const char *env = getenv("IMGFS_LAYER_ZERO_AHEAD"); /* read each time: tests switch it */
    return !env || strcmp(env, "0") != 0;
}

/* Whether the log's file system gains from blocks prepared ahead and has
 * room for them (the window's worth, blocks): not on tmpfs (no journal),
 * which stops the layer's zeroing; false too while space is short, since
 * blocks held ahead must never be what fills a disk. */
static bool ahead_fits(struct layer *l, uint64_t window)
{
    struct statfs fs;
    if (fstatfs(l->cur->fd, &fs) != 0 || fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC) {
        atomic_store(&l->no_zeroing, true);
        return false;
    }
    return (uint64_t)fs.f_bavail * fs.f_bsize >= AHEAD_FREE_FACTOR * window * BS;
}

static bool wants_zero_ahead(const struct layer *l)
{
    /* A guest writing through with large flushes gets its blocks allocated
     * ahead by its flushes instead (allocate_ahead). */
    if (!ahead_enabled() || !atomic_load(&l->small_flushes) || atomic_load(&l->no_zeroing) ||
        atomic_load(&l->broken))
        return false;
    return atomic_load(&l->ahead) < atomic_load(&l->tail) + ahead_window(l) / 2;
}

/* 256 KiB of zeros, aligned for O_DIRECT (NULL without memory). */
#define ZERO_PIECE (64 * BS)
static char *zero_piece;
static void zero_piece_make(void)
{
    void *p;
    if (posix_memalign(&p, BS, ZERO_PIECE) == 0)
        zero_piece = memset(p, 0, ZERO_PIECE);
}

/* Writes zeros at [from, to) of the log, in pieces of 256 KiB. For a guest
 * that writes through (O_DIRECT), with O_DIRECT where the file has it:
 * zeros written to the page cache would be written back by its next flush
 * (an fdatasync writes and waits for every dirty page of the file), which
 * would then wait for megabytes of zeros. Not for a guest that writes
 * through the page cache: an O_DIRECT write that allocates holds the file's
 * writes while the device writes it, and those writes wait for it (buffered
 * 4K writes at iodepth 1 ran 0.60-1.01x), where its own flush writes back
 * its data anyway. */
static int write_zeros(struct layer *l, int fd, uint64_t from, uint64_t to)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, zero_piece_make);
    bool direct = zero_piece && atomic_load(&l->writes_through) && !atomic_load(&l->no_direct);
    int dfd = direct ? direct_fd(l->cur) : -1;
    /* Allocated first, so that the zeros overwrite blocks inside the file:
     * an O_DIRECT write that allocates or extends holds the inode lock
     * across its device write (ext4), and every guest write waits meanwhile
     * (one each 256 KiB piece); one that overwrites shares it. Best effort:
     * the zeros are written anyway. */
    if (dfd >= 0)
        layer_syscalls.fallocate(fd, 0, (off_t)(from * BS), (off_t)((to - from) * BS));
    for (uint64_t b = from; b < to; b += ZERO_PIECE / BS) {
        size_t len = (size_t)((to - b < ZERO_PIECE / BS ? to - b : ZERO_PIECE / BS) * BS);
        ssize_t n = -1;
        if (dfd >= 0) {
            write_turn_enter(l, true); /* a flush may write its record meanwhile */
            n = layer_syscalls.zero_pwrite(dfd, zero_piece, len, (off_t)(b * BS));
            bool refused = n < 0 && errno == EINVAL;
            write_turn_leave(l);
            if (refused)
                dfd = -1; /* alignment refused: through the page cache from here */
        }
        if (n < 0 && dfd < 0) {
            static const char zeros[ZERO_PIECE];
            write_turn_enter(l, false);
            n = layer_syscalls.zero_pwrite(fd, zeros, len, (off_t)(b * BS));
            write_turn_leave(l);
        }
        if (n != (ssize_t)len)
            return -EIO;
    }
    return 0;
}

/* Cuts cur's log after its tail and the zeros it has ahead, for a zeroing
 * pass or an allocation ahead that failed. swap_lock held exclusively (no write under way: every
 * block a write reserved is below the tail) and lock. */
static void cut_past_ahead(struct layer *l, int fd)
{
    uint64_t tail = atomic_load(&l->tail), ahead = atomic_load(&l->ahead);
    uint64_t keep = (ahead > tail ? ahead : tail) * BS;
    struct stat st;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size > keep && layer_syscalls.ftruncate(fd, (off_t)keep) != 0)
        log_warn("layer %s: cannot give back what a failed zeroing ahead allocated: %s", l->id, strerror(errno));
}

/* Prepares the gap (ahead_gap) of cur, zeroed or allocated, and syncs it.
 * Runs with the compaction claim held, so cur does not change. Writes and
 * flushes that reserve blocks in that range meanwhile wait for it
 * (zeroing_from). */
static void zero_ahead(struct layer *l)
{
    if (!ahead_fits(l, ahead_window(l)))
        return;
    ahead_recount(l);
    /* A full budget is seen without the write lock, which would first wait
     * for this layer's writes under way (the tail only grows, so what the
     * zeroing would ask for is at least this). */
    uint64_t from, to;
    ahead_gap(l, &from, &to);
    if (from < to && atomic_load(&ahead_host_blocks) + (to - from) > ahead_host_max())
        return;
    pthread_rwlock_wrlock(&l->swap_lock);
    ahead_gap(l, &from, &to); /* writes hold swap_lock: the tail stays */
    int fd = l->cur->fd;
    if (from < to && !ahead_reserve(l, to - from))
        to = from; /* the host holds enough zeros ahead */
    struct stat before;
    bool have_times = false;
    if (from < to) {
        atomic_store(&l->zeroing_from, from);
        /* The times to put back, known before any zero is written. */
        pthread_mutex_lock(&l->lock);
        have_times = fstat(fd, &before) == 0;
        if (have_times) {
            l->keep_times[0] = before.st_atim;
            l->keep_times[1] = before.st_mtim;
            l->keep_tail = atomic_load(&l->tail);
            l->keep_changes = atomic_load(&l->changes);
        }
        pthread_mutex_unlock(&l->lock);
    }
    pthread_rwlock_unlock(&l->swap_lock);
    if (from >= to)
        return;
    /* Guest writes wait for this once they reach it: not at idle priority. */
    syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 4));
    /* Through layer_syscalls like every change of a layer's file (a
     * power-loss model sees them), though no fault test aims at these
     * bytes: a failure only costs the zeros. */
    int rc = write_zeros(l, fd, from, to);
    bool synced = !rc && layer_syscalls.fdatasync(fd) == 0;
    if (!rc && !synced) {
        /* The error was reported to this sync and is gone for the next
         * flush's, which must not succeed over data that did not reach the
         * disk: the layer fails as after a failed flush. */
        rc = -errno;
        log_error("layer %s: sync failed: %s", l->id, strerror(-rc));
        atomic_store(&l->broken, rc);
    }
    syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_PRIO_VALUE(IOPRIO_CLASS_IDLE, 0));
    /* First let the writes that wait go (they hold swap_lock shared). */
    pthread_mutex_lock(&l->zero_lock);
    if (synced) {
        atomic_store(&l->ahead, to);
    } else {
        atomic_store(&l->no_zeroing, true); /* a full disk, most likely: stop trying */
        ahead_release(l, to - from);
    }
    atomic_store(&l->zeroing_from, NO_ZEROING);
    pthread_cond_broadcast(&l->zero_done);
    pthread_mutex_unlock(&l->zero_lock);
    /* Then, with no write under way: a pass that failed gives back what
     * it allocated or wrote past the zeros it had (a crash would cut it at
     * open anyway: see give_back_ahead), which would else stay until the
     * layer is opened again, on a disk that is full, most likely. */
    pthread_rwlock_wrlock(&l->swap_lock);
    pthread_mutex_lock(&l->lock);
    if (!synced)
        cut_past_ahead(l, fd);
    /* And put back the times these writes moved (those of the pass's start,
     * or of a layer_set_times during it), unless a guest write (it moved the
     * tail) or a punch came since they were set: then the times are theirs. */
    if (have_times && atomic_load(&l->tail) == l->keep_tail && atomic_load(&l->changes) == l->keep_changes)
        futimens(fd, l->keep_times);
    pthread_mutex_unlock(&l->lock);
    pthread_rwlock_unlock(&l->swap_lock);
    space_changed(l); /* the zeros, or what a failed pass gave back */
}

/* Copies the current state of blocks [first, first+count) into b. Without
 * swap_lock it may race with writes; those are noted and copied again. */
static int copy_range(struct layer *l, struct builder *b, uint64_t first, uint64_t count, char *piece,
                      uint64_t *copied)
{
    uint64_t end = first + count;
    for (uint64_t blk = first; blk < end;) {
        uint64_t s = slot_get(l, blk);
        uint64_t stop;
        if (s == SLOT_NONE || s == SLOT_ZERO) {
            stop = run_end_of(l, blk + 1, end, s);
            if (s == SLOT_ZERO) {
                for (uint64_t z = blk; z < stop;) {
                    uint64_t n = stop - z < MAX_ENTRY_BLOCKS ? stop - z : MAX_ENTRY_BLOCKS;
                    struct entry e = {.block = z, .count = (uint32_t)n, .kind = ENTRY_ZERO};
                    int rc = builder_add(b, &e, NULL, 0);
                    if (rc)
                        return rc;
                    z += n;
                }
            }
            blk = stop;
            continue;
        }
        /* Up to 256 blocks of data, from wherever they are in the log. */
        stop = blk + 1;
        while (stop < end && stop - blk < 256) {
            uint64_t t = slot_get(l, stop);
            if (t == SLOT_NONE || t == SLOT_ZERO)
                break;
            stop++;
        }
        size_t len = (size_t)((stop * BS < l->size ? stop * BS : l->size) - blk * BS);
        int rc = layer_read(l, piece, len, blk * BS);
        if (rc)
            return rc;
        struct entry e = {.block = blk, .count = (uint32_t)(stop - blk), .kind = ENTRY_DATA};
        rc = builder_add(b, &e, piece, len);
        if (rc)
            return rc;
        *copied += len;
        blk = stop;
    }
    return 0;
}

/* Yields to guest I/O: waits while the layer saw writes in the last 5 ms,
 * at most 50 ms per step, so that compaction still finishes. */
static void yield_to_guest(struct layer *l)
{
    for (int i = 0; i < 50 && now_ns() - atomic_load(&l->last_io_ns) < 5000000ull; i++)
        usleep(1000);
}

/* Copies the ranges noted since the last call; lock taken inside. */
static int copy_changed(struct layer *l, struct builder *b, char *piece, uint64_t *copied, size_t *count)
{
    pthread_mutex_lock(&l->lock);
    struct entry *changed = l->changed;
    size_t n = l->nchanged;
    l->changed = NULL;
    l->nchanged = l->changed_cap = 0;
    pthread_mutex_unlock(&l->lock);
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++)
        rc = copy_range(l, b, changed[i].block, changed[i].count, piece, copied);
    free(changed);
    *count = n;
    return rc;
}

/* Points the slots that still name the old file (generation old_gen) at
 * their copies in the new one (b->all). A slot that a write or punch changed
 * since the switch is left alone. A block copied more than once (it changed
 * while compacting) takes its last copy, so the entries go newest first:
 * after the first, the slot names the new file. Under lock a batch at a
 * time, so that writes are not held for long. */
static void repoint(struct layer *l, const struct builder *b, unsigned old_gen, unsigned gen)
{
    size_t i = b->nall;
    while (i > 0) {
        pthread_mutex_lock(&l->lock);
        for (uint64_t done = 0; i > 0 && done < 65536;) {
            const struct entry *e = &b->all[--i];
            if (e->kind != ENTRY_DATA)
                continue;
            for (uint32_t k = 0; k < e->count; k++) {
                uint64_t s = slot_get(l, e->block + k);
                if (s != SLOT_NONE && s != SLOT_ZERO && SLOT_GEN(s) == old_gen)
                    slot_set(l, e->block + k, SLOT_DATA(gen, e->loc + k));
            }
            done += e->count;
        }
        pthread_mutex_unlock(&l->lock);
    }
}

static int compact(struct layer *l)
{
    uint64_t t0 = now_ns(), copied = 0;
    char new_path[PATH_MAX], log_path[PATH_MAX];
    int rc = layer_path(l->dir, l->id, PATH_NEW, new_path);
    if (!rc)
        rc = layer_path(l->dir, l->id, PATH_LOG, log_path);
    if (rc)
        return rc;
    layer_syscalls.unlink(new_path);
    int fd = layer_syscalls.open(new_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    char *piece = malloc(256 * BS);
    struct builder b;
    rc = piece ? builder_start(&b, fd, l->size, true) : -ENOMEM;
    if (!piece) {
        close(fd);
        layer_syscalls.unlink(new_path);
        return rc;
    }
    pthread_mutex_lock(&l->lock);
    l->tracking = true;
    pthread_mutex_unlock(&l->lock);

    /* Phase 1: everything, a megabyte at a time, behind guest I/O. */
    for (uint64_t blk = 0; blk < l->blocks && !rc; blk += 256) {
        uint64_t n = l->blocks - blk < 256 ? l->blocks - blk : 256;
        rc = copy_range(l, &b, blk, n, piece, &copied);
        if (!rc && copied >= KICK_BYTES) {
            yield_to_guest(l);
            pthread_mutex_lock(&compact_lock);
            if (l->compact_stop)
                rc = -ECANCELED;
            pthread_mutex_unlock(&compact_lock);
        }
    }
    /* Phase 1b: what changed meanwhile, until little is left. */
    size_t changed = SIZE_MAX;
    for (int round = 0; round < 16 && !rc && changed > 64; round++)
        rc = copy_changed(l, &b, piece, &copied, &changed);
    /* The bulk reaches the disk here, behind guest I/O; phase 3 then syncs
     * only what phase 2 added. */
    if (!rc)
        rc = sync_fd(fd);

    /* Phase 2, the switch: writes and flushes held while the last changes
     * are copied and the layer moves to the new file (no sync in here). */
    pthread_mutex_lock(&l->flush_serial);
    pthread_rwlock_wrlock(&l->swap_lock);
    uint64_t t_pause = now_ns();
    if (!rc && l->broken)
        rc = -EIO;
    if (!rc)
        rc = copy_changed(l, &b, piece, &copied, &changed);
    if (!rc)
        rc = builder_close_record(&b);
    if (!rc)
        copy_times(l->cur->fd, fd); /* compaction changes no byte of the disk */
    unsigned gen = (l->cur->gen + 1) % GEN_LIMIT;
    struct log_file *old = l->cur, *fresh = rc ? NULL : file_new(fd, gen);
    if (!rc && !fresh)
        rc = -ENOMEM;
    bool switched = !rc;
    if (switched) {
        pthread_mutex_lock(&l->files_lock);
        l->files[gen % 4] = fresh; /* see file_install */
        pthread_mutex_unlock(&l->files_lock);
        pthread_mutex_lock(&l->lock);
        l->cur = fresh;
        l->file_id = b.file_id;
        l->record_at = b.record_at;
        l->record_zeroed = false; /* the new file has no zeros ahead */
        l->seq = b.seq;
        /* Every pending write is in the new file's records, which are
         * durable before any flush can return again (phase 3). */
        free(l->pending);
        l->pending = NULL;
        l->npending = l->pending_cap = 0;
        l->pending_bytes = 0;
        /* The shared file now names the new file: a takeover finishes the
         * switch (finish_switch) and keeps the writes that follow it. If
         * its header cannot say so, it still names the old file, where a
         * takeover would drop them: they flush, until a reset succeeds. */
        if (!shared_reset(l))
            l->shared_stale = true;
        atomic_store(&l->tail, b.next);
        atomic_store(&l->kicked, b.next);
        atomic_store(&l->ahead, 0); /* nothing is zeroed in the new file */
        space_changed(l);
        pthread_mutex_unlock(&l->lock);
    }
    pthread_mutex_lock(&l->lock);
    l->tracking = false;
    free(l->changed);
    l->changed = NULL;
    l->nchanged = l->changed_cap = 0;
    pthread_mutex_unlock(&l->lock);
    uint64_t t_resume = now_ns();
    pthread_rwlock_unlock(&l->swap_lock);

    /* Phase 3: writes go on, into the new file; flushes wait until it is
     * durable under the name ID.log, the file a crash opens. Until then
     * ID.log holds every flushed write, and the new file only adds writes
     * that no flush has promised. A failure here leaves the layer refusing
     * writes (it runs on a file that a crash would not open). */
    if (switched) {
        const char *pause = compact_test_pause_file();
        if (pause) {
            log_info("layer %s: compaction switched to its new log, paused before its sync and rename while %s "
                     "exists", l->id, pause);
            for (uint64_t until = now_ns() + COMPACT_TEST_PAUSE_MAX_NS; compact_test_pause_file() && now_ns() < until;)
                usleep(10000);
        }
        rc = sync_fd(fd);
        if (!rc && layer_syscalls.rename(new_path, log_path) < 0)
            rc = -errno;
        if (!rc)
            rc = layer_syscalls.fsync_dir(l->dir);
        if (rc) {
            log_error("layer %s: cannot make its compacted log durable: %s", l->id, strerror(-rc));
            atomic_store(&l->broken, rc);
        }
    }
    uint64_t t_end = now_ns();
    pthread_mutex_unlock(&l->flush_serial);
    if (switched) {
        repoint(l, &b, old->gen, fresh->gen);
        file_put(l, old); /* closed once the last reader lets go (I5) */
        fd = -1;
    }
    if (fd >= 0) {
        close(fd);
        layer_syscalls.unlink(new_path);
    }
    if (switched && !rc) {
        atomic_fetch_add(&l->compactions, 1);
        atomic_store(&l->compact_ns, now_ns() - t0);
        atomic_store(&l->compact_pause_ns, t_resume - t_pause);
        atomic_store(&l->compact_flush_hold_ns, t_end - t_pause);
        atomic_fetch_add(&l->compact_bytes, copied);
        log_info("layer %s: compacted, %" PRIu64 " KiB copied in %.1f ms (writes held %.2f ms, flushes %.2f ms)",
                 l->id, copied / 1024, (double)(now_ns() - t0) / 1e6, (double)(t_resume - t_pause) / 1e6,
                 (double)(t_end - t_pause) / 1e6);
    }
    builder_free(&b);
    free(piece);
    return rc;
}

/* ---- giving back the zeros of idle layers (compact_lock held) -------------------
 *
 * The layers counted for zeros ahead, so that the background threads find
 * those that stopped writing (give_back_ahead) with no pass over every open
 * layer. A layer joins when its claim is released holding zeros, and
 * leaves when it is found holding none, and at close. holders_since is no
 * later than the last write of any of them (writes only move that later),
 * so the list is looked at only once the idle time has passed since. */
static struct layer *ahead_holders;
static uint64_t holders_since = UINT64_MAX;

static void holder_remove(struct layer *l)
{
    if (!l->holding)
        return;
    if (l->holder_prev)
        l->holder_prev->holder_next = l->holder_next;
    else
        ahead_holders = l->holder_next;
    if (l->holder_next)
        l->holder_next->holder_prev = l->holder_prev;
    l->holding = false;
}

/* After l's claim: in the list while it holds zeros ahead. */
static void holder_note(struct layer *l)
{
    if (atomic_load(&l->ahead_counted) == 0 || l->compact_stop) {
        holder_remove(l);
        return;
    }
    if (!l->holding) {
        l->holder_prev = NULL;
        l->holder_next = ahead_holders;
        if (ahead_holders)
            ahead_holders->holder_prev = l;
        ahead_holders = l;
        l->holding = true;
    }
    uint64_t last = atomic_load(&l->last_io_ns);
    if (last < holders_since)
        holders_since = last;
}

static void queue_for_background(struct layer *l)
{
    l->compact_next = compact_queue;
    compact_queue = l;
    l->compact_queued = true;
}

/* Queues the holders that wrote nothing for the idle time, once one may
 * have, and sets holders_since again. */
static void queue_idle_holders(uint64_t now)
{
    uint64_t idle = ahead_idle_ns();
    if (holders_since == UINT64_MAX || now < holders_since + idle)
        return;
    holders_since = UINT64_MAX;
    for (struct layer *l = ahead_holders, *next; l; l = next) {
        next = l->holder_next;
        if (l->compact_queued || l->compacting) /* holder_note sees it again after */
            continue;
        uint64_t last = atomic_load(&l->last_io_ns);
        if (now >= last + idle) {
            queue_for_background(l);
            l->idle_queued = true;
        } else if (last < holders_since) {
            holders_since = last;
        }
    }
}

void layer_set_ahead_idle(uint64_t ns)
{
    pthread_mutex_lock(&compact_lock);
    atomic_store(&ahead_idle, ns);
    pthread_cond_broadcast(&compact_cond); /* the background threads wait for the old time */
    pthread_mutex_unlock(&compact_lock);
}

/* Waits for compact_cond until a holder may be idle (or a signal). */
static void wait_for_background(void)
{
    if (holders_since == UINT64_MAX) {
        pthread_cond_wait(&compact_cond, &compact_lock);
        return;
    }
    uint64_t due = holders_since + ahead_idle_ns(), now = now_ns(), wait = due > now ? due - now : 0;
    struct timespec at;
    clock_gettime(CLOCK_REALTIME, &at); /* compact_cond's clock */
    uint64_t ns = (uint64_t)at.tv_nsec + wait % 1000000000ull;
    at.tv_sec += (time_t)(wait / 1000000000ull + ns / 1000000000ull);
    at.tv_nsec = (long)(ns % 1000000000ull);
    pthread_cond_timedwait(&compact_cond, &compact_lock, &at);
}

/* Marks l as compacting, waiting for a compaction of it under way (only
 * its owner calls this: l cannot be closed meanwhile); false when the layer
 * is closing. compact_lock held. */
static bool compact_claim(struct layer *l)
{
    while (l->compacting)
        pthread_cond_wait(&compact_cond, &compact_lock);
    if (l->compact_stop)
        return false;
    l->compacting = true;
    return true;
}

static void compact_release(struct layer *l)
{
    pthread_mutex_lock(&compact_lock);
    holder_note(l);
    l->compacting = false;
    pthread_cond_broadcast(&compact_cond);
    pthread_mutex_unlock(&compact_lock);
}

/* A guest that writes through (O_DIRECT) and flushes more than
 * AHEAD_FLUSH_MAX: its flush, which wrote bytes of data, allocates the log
 * ahead of the tail (fallocate, mode 0) for the next ones, three flushes'
 * worth (AHEAD_ALLOC_MAX at most) once less than two are left, so that
 * their O_DIRECT writes and records land in allocated, unwritten blocks
 * inside the file's size (ext4 runs an O_DIRECT write that extends the file
 * one at a time, under its inode lock; one inside it shares the lock).
 * Zeros would double what those flushes write; without either, the writes
 * would go through the page cache and be written back inside the next
 * fsync (1 MiB O_DIRECT writes with 32 MiB flushes ran at 0.35-0.80x of a
 * FUSE passthrough). The writes convert the extents they fill; the caller's
 * fdatasync, which follows, makes the allocation durable with its record,
 * so it needs no sync of its own. Here, not in the background thread: the
 * guest's queue is drained at its fsync most of the time, and fallocate
 * waits for every O_DIRECT write under way (ext4), as a background pass
 * would too (its swap_lock), while holding back the new ones. With the
 * compaction claim, if it is free (the flush waits for no compaction),
 * since ahead changes only under it; the budget, free-space and tmpfs rules
 * are those of the zeros. Called with flush_serial held. */
static void allocate_ahead(struct layer *l, uint64_t bytes)
{
    uint64_t tail = atomic_load(&l->tail), want = (bytes + BS - 1) / BS;
    uint64_t window = 3 * want < AHEAD_ALLOC_MAX / BS ? 3 * want : AHEAD_ALLOC_MAX / BS;
    if (atomic_load(&l->ahead) >= tail + 2 * window / 3 || !ahead_enabled() || atomic_load(&l->no_zeroing) ||
        atomic_load(&l->no_direct))
        return;
    pthread_mutex_lock(&compact_lock);
    bool claimed = !l->compacting && !l->compact_stop;
    if (claimed)
        l->compacting = true;
    pthread_mutex_unlock(&compact_lock);
    if (!claimed)
        return;
    if (ahead_fits(l, window)) {
        ahead_recount(l);
        tail = atomic_load(&l->tail);
        uint64_t ahead = atomic_load(&l->ahead);
        uint64_t from = tail > ahead ? tail : ahead, to = tail + window;
        if (from < to && ahead_reserve(l, to - from)) {
            if (layer_syscalls.ahead_fallocate(l->cur->fd, 0, (off_t)(from * BS), (off_t)((to - from) * BS)) == 0) {
                atomic_store(&l->ahead, to);
            } else {
                atomic_store(&l->no_zeroing, true); /* a full disk, most likely: stop trying */
                ahead_release(l, to - from);
                /* What it allocated before it failed (ext4 keeps that, and
                 * the size with it) goes back now, not at the next open. */
                pthread_rwlock_wrlock(&l->swap_lock);
                pthread_mutex_lock(&l->lock);
                cut_past_ahead(l, l->cur->fd);
                pthread_mutex_unlock(&l->lock);
                pthread_rwlock_unlock(&l->swap_lock);
            }
            space_changed(l); /* the space allocated, or what a failure gave back */
        }
    }
    compact_release(l);
}

int layer_compact(struct layer *l)
{
    pthread_mutex_lock(&compact_lock);
    bool claimed = compact_claim(l);
    pthread_mutex_unlock(&compact_lock);
    if (!claimed)
        return -ECANCELED;
    int rc = compact(l);
    ahead_recount(l); /* as in compact_main: the new file holds no zeros */
    compact_release(l);
    return rc;
}

static void *compact_main(void *arg)
{
    (void)arg;
    /* Below the guests' I/O where the I/O scheduler knows classes. */
    syscall(SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_PRIO_VALUE(IOPRIO_CLASS_IDLE, 0));
    pthread_mutex_lock(&compact_lock);
    for (;;) {
        for (queue_idle_holders(now_ns()); !compact_queue; queue_idle_holders(now_ns()))
            wait_for_background();
        struct layer *l = compact_queue;
        compact_queue = l->compact_next;
        l->compact_queued = false;
        bool idle = l->idle_queued;
        l->idle_queued = false;
        /* Never wait here for l: it may be closed meanwhile. A layer that
         * is compacting already needs no second compaction now. */
        if (l->compacting || l->compact_stop)
            continue;
        l->compacting = true;
        pthread_mutex_unlock(&compact_lock);
        if (idle) /* it may have written since it was queued: then it keeps them */
            idle = now_ns() >= atomic_load(&l->last_io_ns) + ahead_idle_ns();
        if (idle)
            give_back_ahead(l);
        else if (wants_zero_ahead(l))
            zero_ahead(l);
        int rc = wants_compaction(l) ? compact(l) : 0;
        if (rc && rc != -ECANCELED)
            log_warn("layer %s: compaction failed: %s", l->id, strerror(-rc));
        ahead_recount(l); /* a compaction's new file holds none */
        compact_release(l);
        pthread_mutex_lock(&compact_lock);
    }
    return NULL;
}

/* A child forked while the threads run has none of them (the crash tests
 * fork after zeroing started them): it starts its own, on a fresh lock and
 * condition, whose waiters were the parent's threads. */
static void compact_after_fork(void)
{
    pthread_mutex_init(&compact_lock, NULL);
    pthread_cond_init(&compact_cond, NULL);
    for (struct layer *q = compact_queue; q; q = q->compact_next)
        q->compact_queued = q->idle_queued = false;
    compact_queue = NULL;
    for (struct layer *h = ahead_holders; h; h = h->holder_next)
        h->holding = false;
    ahead_holders = NULL;
    holders_since = UINT64_MAX;
    compact_threads = 0;
}

static void compact_register_fork(void) { pthread_atfork(NULL, NULL, compact_after_fork); }

static void maybe_background(struct layer *l)
{
    if (!wants_compaction(l) && !wants_zero_ahead(l) && !ahead_stale(l))
        return;
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, compact_register_fork);
    pthread_mutex_lock(&compact_lock);
    if (!l->compact_queued && !l->compacting && !l->compact_stop) {
        while (compact_threads < COMPACT_THREADS) {
            pthread_t t;
            if (pthread_create(&t, NULL, compact_main, NULL) != 0)
                break;
            pthread_detach(t);
            compact_threads++;
        }
        if (compact_threads > 0) {
            queue_for_background(l);
            pthread_cond_broadcast(&compact_cond);
        }
    }
    pthread_mutex_unlock(&compact_lock);
}

static void compact_cancel(struct layer *l)
{
    pthread_mutex_lock(&compact_lock);
    l->compact_stop = true;
    holder_remove(l);
    if (l->compact_queued) {
        for (struct layer **p = &compact_queue; *p; p = &(*p)->compact_next)
            if (*p == l) {
                *p = l->compact_next;
                break;
            }
        l->compact_queued = l->idle_queued = false;
    }
    while (l->compacting)
        pthread_cond_wait(&compact_cond, &compact_lock);
    pthread_mutex_unlock(&compact_lock);
}

/* ---- times ------------------------------------------------------------------------ */

/* The log file's times are the layer's: each write appends to it. Compaction
 * and conversion carry them over to the file they make (copy_times). */
int layer_get_times(const struct layer *layer, struct timespec *atime, struct timespec *mtime)
{
    struct layer *l = (struct layer *)layer;
    struct stat st;
    pthread_mutex_lock(&l->lock); /* cur changes under it */
    int rc = fstat(l->cur->fd, &st) < 0 ? -errno : 0;
    pthread_mutex_unlock(&l->lock);
    if (!rc) {
        *atime = st.st_atim;
        *mtime = st.st_mtim;
    }
    return rc;
}

int layer_set_times(struct layer *layer, const struct timespec times[2])
{
    pthread_mutex_lock(&layer->lock); /* cur changes under it */
    int rc = futimens(layer->cur->fd, times) < 0 ? -errno : 0;
    /* What a zeroing pass under way puts back: these times (UTIME_NOW as
     * the file took it; a zero written meanwhile moves it to about now
     * too), as of this tail. */
    struct stat st;
    if (!rc && fstat(layer->cur->fd, &st) == 0) {
        const struct timespec now[2] = {st.st_atim, st.st_mtim};
        for (int i = 0; i < 2; i++)
            if (times[i].tv_nsec != UTIME_OMIT)
                layer->keep_times[i] = times[i].tv_nsec == UTIME_NOW ? now[i] : times[i];
        layer->keep_tail = atomic_load(&layer->tail);
        layer->keep_changes = atomic_load(&layer->changes);
    }
    pthread_mutex_unlock(&layer->lock);
    return rc;
}
