#include "cache.h"

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

#include <xxhash.h>

#define CACHE_MARKER "imgfs-cache 2\n"
#define CACHE_MARKER_V1 "imgfs-cache 1\n" /* one file per chunk under chunks/ */
#define SHARD_COUNT 64
#define INITIAL_BUCKETS 1024
#define PACK_ALIGN 4096u /* chunks start on file system blocks: holes punch whole */
#define DEFAULT_PACK_LIMIT (256ull << 20)
#define SUM_BLOCK 4096u     /* a block sum covers this much of a pack */
#define MAX_SUMMED_BLOCKS 64 /* chunks of up to 64 blocks are checked per block */
/* How long the drop of a damaged chunk waits for the readers of its good
 * blocks: they hold it for one reply. A reader that also waits for it (the
 * same content twice in one read) makes this the bound; that read fails. */
#define READERS_WAIT_NS (10ull * 1000000000ull)

/* ---- the on-disk index record ---------------------------------------------- */

#define RECORD_MAGIC "ICR1"
enum record_kind { RECORD_ADD = 1, RECORD_DROP = 2 };

/* One line of a pack's index log, in host byte order (the cache is local to
 * the host). check is the xxh3-128 of the 48 bytes before it, so a torn or
 * garbled record is recognised and the log is cut there. */
struct pack_record {
    char magic[4];
    uint32_t kind;
    uint8_t hash[CHUNK_HASH_BYTES];
    uint64_t off;
    uint32_t len;
    uint32_t reserved;
    uint64_t time; /* unix seconds of the fill: the LRU age after a restart */
    uint8_t check[CHUNK_HASH_BYTES];
};
_Static_assert(sizeof(struct pack_record) == 64, "index records are 64 bytes");

static void record_seal(struct pack_record *r)
{
    struct chunk_hash h;
    chunk_hash_compute(r, offsetof(struct pack_record, check), &h);
    memcpy(r->check, h.bytes, sizeof(r->check));
}

static bool record_sound(const struct pack_record *r)
{
    struct chunk_hash h;
    chunk_hash_compute(r, offsetof(struct pack_record, check), &h);
    return memcmp(r->magic, RECORD_MAGIC, 4) == 0 && memcmp(r->check, h.bytes, sizeof(r->check)) == 0 &&
           (r->kind == RECORD_ADD || r->kind == RECORD_DROP) && r->len > 0 && r->off % PACK_ALIGN == 0;
}

/* ---- system calls --------------------------------------------------------- */

static int real_open(const char *path, int flags, mode_t mode) { return open(path, flags, mode); }

struct cache_syscalls cache_syscalls = {
    .open = real_open,
    .pwrite = pwrite,
    .write = write,
    .fallocate = fallocate,
    .ftruncate = ftruncate,
    .fdatasync = fdatasync,
    .unlink = unlink,
    .fsync_dir = fsync_dir,
};

/* write_full_at through cache_syscalls. */
static int put_at(int fd, const void *buf, size_t len, uint64_t off)
{
    return write_full_at_by(cache_syscalls.pwrite, fd, buf, len, (off_t)off);
}

/* ---- packs ------------------------------------------------------------------- */

/* A pack: packs/NNNNNNNN.pack holds chunk bytes, packs/NNNNNNNN.idx is its
 * append-only index log. fd and idx_fd stay open, and the struct stays
 * allocated, as long as live > 0 or the pack is the active one; that is
 * what keeps a pin's fd valid. id and the fds never change; end and live
 * are guarded by cache->pack_lock. */
struct pack {
    uint32_t id;
    int fd;          /* chunk bytes, read and written with pread/pwrite */
    int idx_fd;      /* O_APPEND: a 64-byte write() is one record */
    int sums_fd;     /* block sums: 8 bytes per 4 KiB block of fd, 0 = unknown */
    uint64_t end;    /* next free offset (the active pack only appends) */
    uint64_t live;   /* chunks resident in it, or being written into it */
    atomic_uint_fast64_t idx_bytes; /* length of the index log, counted in cache->used */
    /* Disk space of the sums file, counted in cache->used. It is not given
     * back when chunks go (2 MiB of chunks share one 4 KiB block of sums),
     * only with the pack: at most 1/512 of the pack's length. */
    atomic_uint_fast64_t sums_bytes;
    uint64_t scan_bytes; /* compact_sparse_pack()'s count of its live bytes; under evict_lock */
    atomic_bool sums_read_ahead; /* read_sums() asked for the whole sums file in this run */
    bool synced_at_open; /* add_loaded() made it durable before punching an older copy (open only) */
    struct pack *next;
};

/* A dropped copy of a chunk whose bytes stay until the readers that pinned
 * it before it was found damaged are done (their pins name fd and off). It
 * keeps its place in the pack's live count until then. */
struct stale_copy {
    struct pack *pack;
    uint64_t off, size;
    uint32_t pins; /* of the entry's pins, those on this copy */
};

enum entry_state {
    ENTRY_ABSENT,   /* not on disk (new entry, or dropped after damage) */
    ENTRY_BUSY,     /* one caller is filling, verifying or evicting it; others wait */
    ENTRY_RESIDENT, /* its bytes are at (pack, off); readable once verified */
};

/* Entry states and their transitions (shard lock held for each):
 *   ABSENT   -> BUSY      cache_acquire() hands out the fill (CACHE_MUST_FILL)
 *   BUSY     -> RESIDENT  cache_fill() stored it (verified: the caller checked)
 *   BUSY     -> ABSENT    cache_abandon(), or a failed cache_fill()
 *   RESIDENT -> BUSY      first use in this run: verify (-> RESIDENT, or drop
 *                         and hand the fill to that caller), or eviction
 *                         (-> ABSENT once its record is dropped and its
 *                         bytes punched out)
 * An entry is counted in resident_* and in its pack's live from the fill or
 * the index load until it is dropped (and in held_bytes too meanwhile,
 * while a pin set holds it). A pinned or held entry is never
 * evicted, so its pack, and the bytes at its offset, stay. */
struct cache_entry {
    struct chunk_hash hash;
    struct cache_entry *next; /* bucket chain */
    uint64_t size;            /* bytes on disk when resident */
    struct pack *pack;        /* where it is, when resident */
    uint64_t off;
    uint64_t last_use;        /* LRU clock value of the last acquire */
    uint32_t pins;            /* readers using it right now */
    uint32_t holds;           /* pre-copy pin sets that include it */
    uint8_t state;
    bool verified;            /* the whole chunk checked during this run */
    uint64_t verified_blocks; /* bit i: 4 KiB block i checked against its sum in this run */
    struct stale_copy *stale; /* a damaged copy still pinned by readers of its good blocks */
};

/* All fields of a shard, and of the entries hashed to it, are guarded by
 * its lock, which is never held across I/O. changed is broadcast whenever
 * an entry leaves ENTRY_BUSY. */
struct shard {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    struct cache_entry **buckets;
    size_t bucket_count;
    size_t entry_count;
    uint64_t resident_chunks;
    uint64_t resident_bytes;
    uint64_t held_bytes; /* of the entries counted in resident_* that a pin set holds */
    uint64_t changes;    /* counts every change of resident_chunks (cache_generation) */
};

struct cache {
    char dir[PATH_MAX - 128]; /* leaves room for "/packs/NNNNNNNN.pack" */
    uint64_t limit;                /* bytes, 0 for none; set before use */
    uint64_t pack_limit;           /* roll the active pack over beyond this; set before use */
    atomic_uint_fast64_t used;     /* resident bytes plus fills in progress */
    atomic_uint_fast64_t clock;    /* LRU clock; starts above every record time */
    atomic_uint_fast64_t evictions;
    atomic_uint_fast64_t dropped_damaged;
    atomic_uint_fast64_t charged; /* cache_charge()'s bytes, also counted in used */
    uint64_t (*reclaim)(void *ctx, uint64_t want); /* set before use */
    void *reclaim_ctx;
    /* One eviction pass at a time. Held across its punches and record
     * writes, and across a compaction's copies (at most 1/16 of a pack):
     * a fill that must evict waits for them; a read never takes it. */
    pthread_mutex_t evict_lock;
    /* pack_lock guards the pack list, active, next_id and every pack's end
     * and live. It is taken after a shard lock is released, never with one
     * held, and never held across I/O except the creation of the next pack
     * file when the active one is full (once per pack_limit bytes). */
    pthread_mutex_t pack_lock;
    struct pack *packs;
    struct pack *active; /* fills append here; never removed while active */
    uint32_t next_id;
    uint64_t pack_count;
    struct shard shards[SHARD_COUNT];
};

const char *cache_dir(const struct cache *cache) { return cache->dir; }

static struct shard *shard_of(struct cache *cache, const struct chunk_hash *hash)
{
    /* Use bits the bucket index does not use. */
    return &cache->shards[(chunk_hash_bucket(hash) >> 56) % SHARD_COUNT];
}

static struct cache_entry **bucket_of(struct shard *s, const struct chunk_hash *hash)
{
    return &s->buckets[chunk_hash_bucket(hash) & (s->bucket_count - 1)];
}

static struct cache_entry *find_entry(struct shard *s, const struct chunk_hash *hash)
{
    for (struct cache_entry *e = *bucket_of(s, hash); e; e = e->next)
        if (chunk_hash_equal(&e->hash, hash))
            return e;
    return NULL;
}

static int grow_buckets(struct shard *s)
{
    size_t count = s->bucket_count * 2;
    struct cache_entry **buckets = calloc(count, sizeof(*buckets));
    if (!buckets)
        return -ENOMEM;
    for (size_t i = 0; i < s->bucket_count; i++) {
        struct cache_entry *e = s->buckets[i];
        while (e) {
            struct cache_entry *next = e->next;
            struct cache_entry **b = &buckets[chunk_hash_bucket(&e->hash) & (count - 1)];
            e->next = *b;
            *b = e;
            e = next;
        }
    }
    free(s->buckets);
    s->buckets = buckets;
    s->bucket_count = count;
    return 0;
}

static struct cache_entry *insert_entry(struct shard *s, const struct chunk_hash *hash)
{
    if (s->entry_count >= s->bucket_count && grow_buckets(s) < 0)
        return NULL;
    struct cache_entry *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->hash = *hash;
    e->state = ENTRY_ABSENT;
    struct cache_entry **b = bucket_of(s, hash);
    e->next = *b;
    *b = e;
    s->entry_count++;
    return e;
}

static void pack_path(const struct cache *cache, uint32_t id, const char *ext, char *out, size_t len)
{
    snprintf(out, len, "%s/packs/%08x.%s", cache->dir, id, ext);
}

static void pack_free(struct pack *p)
{
    if (p->fd >= 0)
        close(p->fd);
    if (p->idx_fd >= 0)
        close(p->idx_fd);
    if (p->sums_fd >= 0)
        close(p->sums_fd);
    free(p);
}

/* Opens (create: makes, and refuses to reuse) the files of pack id. A pack
 * of a build before block sums gets an empty sums file: every sum unknown. */
static int pack_open(struct cache *cache, uint32_t id, bool create, struct pack **out)
{
    char pack[PATH_MAX], idx[PATH_MAX], sums[PATH_MAX];
    pack_path(cache, id, "pack", pack, sizeof(pack));
    pack_path(cache, id, "idx", idx, sizeof(idx));
    pack_path(cache, id, "sums", sums, sizeof(sums));
    struct pack *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    p->id = id;
    p->sums_fd = -1;
    int flags = O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0);
    /* The index first: a pack file without one is a leftover and removed. */
    p->idx_fd = cache_syscalls.open(idx, O_RDWR | O_APPEND | flags, 0600);
    p->fd = p->idx_fd < 0 ? -1 : cache_syscalls.open(pack, O_RDWR | flags, 0600);
    if (p->fd >= 0 &&
        (p->sums_fd = cache_syscalls.open(sums, O_RDWR | O_CLOEXEC | O_CREAT | (create ? O_TRUNC : 0), 0600)) < 0) {
        int rc = -errno;
        if (create) {
            cache_syscalls.unlink(pack);
            cache_syscalls.unlink(idx);
        }
        pack_free(p);
        return rc;
    }
    if (p->fd < 0) {
        int rc = -errno;
        if (create && p->idx_fd >= 0)
            cache_syscalls.unlink(idx);
        pack_free(p);
        return rc;
    }
    *out = p;
    return 0;
}

/* Removes an empty pack that is no longer in the list. */
static void pack_remove(struct cache *cache, struct pack *p)
{
    atomic_fetch_sub(&cache->used, atomic_load(&p->idx_bytes) + atomic_load(&p->sums_bytes));
    char path[PATH_MAX];
    pack_path(cache, p->id, "pack", path, sizeof(path));
    cache_syscalls.unlink(path);
    pack_path(cache, p->id, "idx", path, sizeof(path));
    cache_syscalls.unlink(path);
    pack_path(cache, p->id, "sums", path, sizeof(path));
    cache_syscalls.unlink(path);
    pack_free(p);
}

/* Unlinks p from the pack list if it is empty and not active (pack_lock
 * held); returns it for pack_remove() once the lock is dropped. */
static struct pack *unlist_if_empty(struct cache *cache, struct pack *p)
{
    if (p->live || p == cache->active)
        return NULL;
    for (struct pack **pp = &cache->packs; *pp; pp = &(*pp)->next) {
        if (*pp == p) {
            *pp = p->next;
            cache->pack_count--;
            return p;
        }
    }
    return NULL;
}

/* One chunk fewer in p: the last one out of a full pack removes it. */
static void pack_unref(struct cache *cache, struct pack *p)
{
    pthread_mutex_lock(&cache->pack_lock);
    assert(p->live > 0);
    p->live--;
    struct pack *gone = unlist_if_empty(cache, p);
    pthread_mutex_unlock(&cache->pack_lock);
    if (gone)
        pack_remove(cache, gone);
}

/* Makes a fresh active pack (pack_lock held; the only I/O done under it). */
static int roll_pack_locked(struct cache *cache, struct pack **old_empty)
{
    struct pack *p = NULL;
    int rc;
    do
        rc = pack_open(cache, cache->next_id++, true, &p);
    while (rc == -EEXIST); /* another process's pack: never share one */
    if (rc)
        return rc;
    p->next = cache->packs;
    cache->packs = p;
    cache->pack_count++;
    struct pack *old = cache->active;
    cache->active = p;
    *old_empty = old ? unlist_if_empty(cache, old) : NULL;
    return 0;
}

/* Reserves len bytes at the end of the active pack, rolling it over when
 * full. The pack counts the chunk as live from now on. */
static int pack_alloc(struct cache *cache, uint64_t len, struct pack **pack, uint64_t *off)
{
    uint64_t span = (len + PACK_ALIGN - 1) / PACK_ALIGN * PACK_ALIGN;
    struct pack *old_empty = NULL;
    int rc = 0;
    pthread_mutex_lock(&cache->pack_lock);
    if (!cache->active || (cache->active->end && cache->active->end + span > cache->pack_limit))
        rc = roll_pack_locked(cache, &old_empty);
    if (!rc) {
        *pack = cache->active;
        *off = cache->active->end;
        cache->active->end += span;
        cache->active->live++;
    }
    pthread_mutex_unlock(&cache->pack_lock);
    if (old_empty)
        pack_remove(cache, old_empty);
    return rc;
}

/* Appends one record to p's index log. Its bytes count against the limit
 * like the chunks' (reserved: the caller's reserve() included them). */
static int append_record(struct cache *cache, struct pack *p, enum record_kind kind, const struct chunk_hash *hash,
                         uint64_t off, uint64_t len, uint64_t when, bool reserved)
{
    struct pack_record r = {.kind = kind, .off = off, .len = (uint32_t)len, .time = when};
    memcpy(r.magic, RECORD_MAGIC, 4);
    memcpy(r.hash, hash->bytes, sizeof(r.hash));
    record_seal(&r);
    ssize_t n = cache_syscalls.write(p->idx_fd, &r, sizeof(r));
    if (n == (ssize_t)sizeof(r)) {
        atomic_fetch_add(&p->idx_bytes, sizeof(r));
        if (!reserved)
            atomic_fetch_add(&cache->used, sizeof(r));
        return 0;
    }
    return n < 0 ? -errno : -EIO;
}

/* Gives the disk blocks of a dropped chunk back. Best effort: on a file
 * system without hole punching the space returns when the pack goes. */
static void punch(struct pack *p, uint64_t off, uint64_t len)
{
    uint64_t span = (len + PACK_ALIGN - 1) / PACK_ALIGN * PACK_ALIGN;
    cache_syscalls.fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)span);
}

/* ---- block sums ---------------------------------------------------------------
 *
 * packs/NNNNNNNN.sums holds an xxh3-64 of every 4 KiB block of the pack
 * (block b's sum at byte 8 * b; 0 means unknown), written with the chunk from
 * the verified bytes. They let a chunk that is read a block at a time be
 * checked a block at a time: a random 4 KiB read of a cached base reads 4 KiB
 * and its sum, not the whole chunk. They are not synced either. A sum that
 * is unknown or does not match never fails a read: the whole chunk is then
 * checked against its hash, which decides, and the sums are written anew.
 * A sum is seeded with its chunk's hash and the block's place in it, so a
 * sum left over from other bytes (another chunk, a stale file) never
 * vouches for a block. */

static uint64_t block_sum(const struct chunk_hash *chunk, size_t index, const void *block)
{
    uint64_t h = XXH3_64bits_withSeed(block, SUM_BLOCK, chunk_hash_bucket(chunk) + index);
    return h ? h : 1; /* 0 is "unknown" */
}

/* Counts the sums file up to written_end (rounded up to a whole block) in
 * cache->used before or as its blocks are written. It only grows: sums are
 * written at the pack's end as it fills, so every block below is in use
 * (a sums file of an older build is counted whole as its chunks are
 * checked: at most too much, never too little). */
static void count_sums_space(struct cache *cache, struct pack *p, uint64_t written_end)
{
    uint64_t need = (written_end + SUM_BLOCK - 1) / SUM_BLOCK * SUM_BLOCK;
    uint64_t have = atomic_load(&p->sums_bytes);
    while (need > have) {
        if (atomic_compare_exchange_weak(&p->sums_bytes, &have, need)) {
            atomic_fetch_add(&cache->used, need - have);
            return;
        }
    }
}

/* Where in its sums file the sum of block `block` of a chunk stored at off is. */
static uint64_t sum_pos(uint64_t off, uint64_t block)
{
    return (off / SUM_BLOCK + block) * sizeof(uint64_t);
}

/* Where the sums of a chunk of len bytes stored at off end in its file. */
static uint64_t sums_end(uint64_t off, uint64_t len)
{
    return sum_pos(off, len / SUM_BLOCK);
}

/* How many of `left` blocks' sums one batch handles. */
static size_t sums_batch(size_t left)
{
    return left < MAX_SUMMED_BLOCKS ? left : MAX_SUMMED_BLOCKS;
}

/* Writes the sums of the whole blocks of data (chunk's bytes), stored at off in p. */
static int write_sums(struct pack *p, uint64_t off, const struct chunk_hash *chunk, const char *data, size_t len)
{
    uint64_t sums[MAX_SUMMED_BLOCKS];
    size_t blocks = len / SUM_BLOCK;
    for (size_t done = 0; done < blocks;) {
        size_t n = sums_batch(blocks - done);
        for (size_t i = 0; i < n; i++)
            sums[i] = block_sum(chunk, done + i, data + (done + i) * SUM_BLOCK);
        int rc = put_at(p->sums_fd, sums, n * sizeof(*sums), sum_pos(off, done));
        if (rc)
            return rc;
        done += n;
    }
    return 0;
}

/* Reads the sums of blocks [first, first + n) of a chunk stored at off in p
 * (at most MAX_SUMMED_BLOCKS); past the end of the sums file they are 0.
 * The first call for a pack in this run also starts reading its whole sums
 * file into the page cache (1/512 of the pack, in one large read): after a
 * reboot, random 4 KiB reads would otherwise wait for two disk reads each,
 * the block's sum and then the block, as long as most of its sums pages
 * (one per 2 MiB of pack) were not read yet. */
static int read_sums(struct pack *p, uint64_t off, size_t first, size_t n, uint64_t *sums)
{
    if (!atomic_exchange(&p->sums_read_ahead, true))
        (void)posix_fadvise(p->sums_fd, 0, 0, POSIX_FADV_WILLNEED); /* a hint: reads work without it */
    size_t len = n * sizeof(*sums);
    ssize_t got = pread(p->sums_fd, sums, len, (off_t)sum_pos(off, first));
    if (got < 0)
        return -errno;
    memset((char *)sums + got, 0, len - (size_t)got);
    return 0;
}

/* Copies the sums of a chunk of len bytes moved from (from, from_off) to
 * (to, to_off) as they are: bytes not checked in this run keep the sums
 * they were stored with, so a damaged block is still caught. */
static int copy_sums(struct pack *from, uint64_t from_off, struct pack *to, uint64_t to_off, size_t len)
{
    uint64_t sums[MAX_SUMMED_BLOCKS];
    size_t blocks = len / SUM_BLOCK;
    int rc = 0;
    for (size_t done = 0; done < blocks && !rc;) {
        size_t n = sums_batch(blocks - done);
        rc = read_sums(from, from_off, done, n, sums);
        if (!rc)
            rc = put_at(to->sums_fd, sums, n * sizeof(*sums), sum_pos(to_off, done));
        done += n;
    }
    return rc;
}

/* The blocks of a chunk that a read of [off, off + len) needs, as a bit
 * mask, or 0 when the chunk can only be checked whole. */
static uint64_t blocks_wanted(uint32_t chunk_size, uint32_t off, uint32_t len)
{
    if (len == 0 || chunk_size % SUM_BLOCK || chunk_size / SUM_BLOCK > MAX_SUMMED_BLOCKS || off >= chunk_size)
        return 0;
    uint32_t end = len > chunk_size - off ? chunk_size : off + len;
    unsigned first = off / SUM_BLOCK, last = (end - 1) / SUM_BLOCK;
    uint64_t upto = last == 63 ? ~0ull : (1ull << (last + 1)) - 1;
    return upto & ~((1ull << first) - 1);
}

static uint64_t all_blocks(uint64_t size)
{
    uint64_t n = size / SUM_BLOCK;
    return size % SUM_BLOCK || n > MAX_SUMMED_BLOCKS ? 0 : n == 64 ? ~0ull : (1ull << n) - 1;
}

void *(*cache_check_alloc)(size_t len) = malloc;

/* Reads the blocks in want of a resident chunk (one run: a read's range)
 * and checks those in check against their sums. Returns 0 with *out (the
 * bytes of the run, malloc'd; *out_off is its first byte in the chunk),
 * -EAGAIN when a sum is unknown or does not match (the whole chunk must be
 * checked), or an I/O error. The entry is BUSY. */
static int verify_blocks(const struct cache_entry *e, uint64_t want, uint64_t check, char **out, uint32_t *out_off,
                         uint32_t *out_len)
{
    unsigned first = 0;
    while (!(want >> first & 1))
        first++;
    unsigned n = 0;
    while (first + n < MAX_SUMMED_BLOCKS && (want >> (first + n) & 1))
        n++;
    /* Sized to the run (one block for a 4 KiB read): a chunk-sized
     * buffer would be an mmap and munmap per read. */
    char *buf = cache_check_alloc((size_t)n * SUM_BLOCK);
    if (!buf)
        return -ENOMEM;
    uint64_t sums[MAX_SUMMED_BLOCKS];
    int rc = read_sums(e->pack, e->off, first, n, sums);
    if (!rc)
        rc = read_full_at(e->pack->fd, buf, (size_t)n * SUM_BLOCK, (off_t)(e->off + (uint64_t)first * SUM_BLOCK));
    for (unsigned i = 0; !rc && i < n; i++)
        if ((check >> (first + i) & 1) &&
            (sums[i] == 0 || block_sum(&e->hash, first + i, buf + (size_t)i * SUM_BLOCK) != sums[i]))
            rc = -EAGAIN;
    if (rc) {
        free(buf);
        return rc == -ENODATA ? -EAGAIN : rc;
    }
    *out = buf;
    *out_off = first * SUM_BLOCK;
    *out_len = n * SUM_BLOCK;
    return 0;
}

/* Forgets the copy of a chunk at (p, off): a DROP record so that a restart
 * does not bring it back, then its blocks. */
static void discard_copy(struct cache *cache, struct pack *p, const struct chunk_hash *hash, uint64_t off,
                         uint64_t size)
{
    append_record(cache, p, RECORD_DROP, hash, off, size, 0, false);
    punch(p, off, size);
}

/* Forgets the on-disk copy of a resident entry. No lock held (the entry is
 * BUSY); the caller then calls drop_resident() and pack_unref(). */
static void discard_bytes(struct cache *cache, struct cache_entry *e)
{
    discard_copy(cache, e->pack, &e->hash, e->off, e->size);
}

/* Forgets the on-disk copy of an entry that was counted as resident (shard
 * lock held). Returns its pack, for pack_unref() once the lock is dropped. */
static struct pack *drop_resident(struct cache *cache, struct shard *s, struct cache_entry *e)
{
    struct pack *p = e->pack;
    s->resident_chunks--;
    s->resident_bytes -= e->size;
    s->held_bytes -= e->holds ? e->size : 0;
    s->changes++;
    atomic_fetch_sub(&cache->used, e->size);
    e->size = 0;
    e->pack = NULL;
    e->off = 0;
    e->verified = false;
    e->verified_blocks = 0;
    return p;
}

/* Whether the copy of a chunk at (p, off) holds its bytes. */
static bool copy_sound(struct pack *p, const struct chunk_hash *hash, uint64_t off, uint64_t len)
{
    char *buf = malloc(len);
    struct chunk_hash got;
    bool sound = buf && read_full_at(p->fd, buf, len, (off_t)off) == 0;
    if (sound) {
        chunk_hash_compute(buf, len, &got);
        sound = chunk_hash_equal(&got, hash);
    }
    free(buf);
    return sound;
}

/* Records an entry found on disk at open (single-threaded). When an
 * earlier record already brought the chunk in, there are two copies, and
 * one goes (a DROP record, then its blocks): this later one wins unless
 * its bytes are wrong and the older one's right (both are read and checked
 * then: this happens only after a crash). After a power cut the older one
 * may be the copy that an eviction punched but whose DROP record was lost,
 * before the chunk was filled again: keeping it would punch the good
 * refill with no record, and the verification would drop the punched one
 * too. Or the later one is a compaction's copy that the cut lost before
 * its sync, when the older is the good one. */
static int sync_copies(struct cache *cache, struct pack **dests, size_t count);

static int add_loaded(struct cache *cache, const struct chunk_hash *hash, struct pack *p, uint64_t off,
                      uint64_t len, uint64_t when)
{
    struct shard *s = shard_of(cache, hash);
    struct cache_entry *e = find_entry(s, hash);
    if (e && e->state == ENTRY_RESIDENT) {
        bool later_wins = copy_sound(p, hash, off, len) || !copy_sound(e->pack, hash, e->off, e->size);
        /* The later copy may be sound only in the page cache (a compaction
         * killed before its sync): it is made durable before the older one
         * is punched, or a power cut could keep the punch and lose both. */
        if (later_wins && !p->synced_at_open) {
            int rc = sync_copies(cache, &p, 1);
            if (rc) {
                log_warn("cache: pack %08x: cannot sync it (%s): the older copy of a chunk stays", p->id,
                         strerror(-rc));
                later_wins = false;
            } else {
                p->synced_at_open = true;
            }
        }
        if (!later_wins) {
            discard_copy(cache, p, hash, off, len);
            return 0;
        }
        struct pack *older = e->pack;
        discard_bytes(cache, e);
        drop_resident(cache, s, e);
        older->live--; /* an emptied pack goes at the end of load_packs() */
    }
    if (!e && !(e = insert_entry(s, hash)))
        return -ENOMEM;
    e->state = ENTRY_RESIDENT;
    e->size = len;
    e->pack = p;
    e->off = off;
    /* Across restarts, the fill time stands in for the last use. */
    e->last_use = when;
    p->live++;
    s->resident_chunks++;
    s->resident_bytes += len;
    s->held_bytes += e->holds ? len : 0;
    s->changes++;
    atomic_fetch_add(&cache->used, len);
    return 0;
}

/* ---- opening: the index logs, and the old layout ---------------------------- */

static int by_offset(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Replays one pack's index log. A torn or garbled record ends the log (it
 * is cut there, so later appends line up); a record that points past the
 * end of the pack file is ignored (its bytes never made it). */
static int load_pack(struct cache *cache, struct pack *p)
{
    struct stat st;
    if (fstat(p->fd, &st) < 0)
        return -errno;
    uint64_t pack_size = (uint64_t)st.st_size;
    p->end = (pack_size + PACK_ALIGN - 1) / PACK_ALIGN * PACK_ALIGN;
    /* The log is cut first and its DROP records gathered, then it is
     * replayed: an ADD record whose chunk a DROP record anywhere in the log
     * removes (offsets in a pack are never reused) never counts, so that
     * the DROP that add_loaded() gives a losing later copy holds. The replay
     * may append DROP records (add_loaded), counted as they are written. */
    struct pack_record r;
    off_t idx_end = 0;
    uint64_t *drops = NULL;
    size_t ndrops = 0, cap = 0;
    for (;; idx_end += sizeof(r)) {
        ssize_t n = pread(p->idx_fd, &r, sizeof(r), idx_end);
        if (n < 0) {
            int e = errno;
            free(drops);
            return -e;
        }
        if (n == 0)
            break;
        if (n != (ssize_t)sizeof(r) || !record_sound(&r)) {
            log_warn("cache: pack %08x: index cut at a damaged record (byte %lld)", p->id, (long long)idx_end);
            if (cache_syscalls.ftruncate(p->idx_fd, idx_end) < 0) {
                free(drops);
                return -errno;
            }
            break;
        }
        if (r.kind == RECORD_DROP) {
            if (ndrops == cap) {
                uint64_t *more = realloc(drops, (cap = cap ? cap * 2 : 64) * sizeof(*drops));
                if (!more) {
                    free(drops);
                    return -ENOMEM;
                }
                drops = more;
            }
            drops[ndrops++] = r.off;
        }
    }
    if (ndrops)
        qsort(drops, ndrops, sizeof(*drops), by_offset);
    int rc = 0;
    for (off_t at = 0; at < idx_end && !rc; at += sizeof(r)) {
        if (pread(p->idx_fd, &r, sizeof(r), at) != (ssize_t)sizeof(r)) {
            rc = -EIO;
            break;
        }
        atomic_fetch_add(&p->idx_bytes, sizeof(r));
        atomic_fetch_add(&cache->used, sizeof(r));
        struct chunk_hash hash;
        memcpy(hash.bytes, r.hash, sizeof(hash.bytes));
        struct shard *s = shard_of(cache, &hash);
        struct cache_entry *e = find_entry(s, &hash);
        if (r.kind == RECORD_DROP) {
            if (e && e->state == ENTRY_RESIDENT && e->pack == p && e->off == r.off) {
                drop_resident(cache, s, e);
                e->state = ENTRY_ABSENT;
                p->live--;
            }
            continue;
        }
        if (r.off + r.len > pack_size || (ndrops && bsearch(&r.off, drops, ndrops, sizeof(*drops), by_offset)))
            continue;
        rc = add_loaded(cache, &hash, p, r.off, r.len, r.time);
    }
    free(drops);
    return rc;
}

static int by_id(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Loads every pack in id order (fill order), drops empty ones and leftovers
 * of a crash between creating or removing a pack's files. */
static int load_packs(struct cache *cache)
{
    char path[PATH_MAX];
    int rc = path_join(path, sizeof(path), "%s/packs", cache->dir);
    if (rc)
        return rc;
    DIR *d = opendir(path);
    if (!d)
        return -errno;
    uint32_t *ids = NULL;
    size_t count = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        unsigned id;
        char ext[8], tail;
        if (sscanf(de->d_name, "%8x.%4[a-z]%c", &id, ext, &tail) != 2 || strlen(de->d_name) < 12)
            continue;
        if (id + 1 > cache->next_id)
            cache->next_id = id + 1;
        if (strcmp(ext, "idx") != 0) {
            char idx[PATH_MAX], leftover[PATH_MAX];
            pack_path(cache, id, "idx", idx, sizeof(idx));
            pack_path(cache, id, ext, leftover, sizeof(leftover));
            if ((strcmp(ext, "pack") == 0 || strcmp(ext, "sums") == 0) && access(idx, F_OK) < 0 && errno == ENOENT)
                cache_syscalls.unlink(leftover); /* no index: nothing in it counts */
            continue;
        }
        if (count == cap) {
            size_t grown = cap ? cap * 2 : 64;
            uint32_t *more = realloc(ids, grown * sizeof(*ids));
            if (!more) {
                rc = -ENOMEM;
                break;
            }
            ids = more;
            cap = grown;
        }
        ids[count++] = id;
    }
    closedir(d);
    if (count)
        qsort(ids, count, sizeof(*ids), by_id);
    for (size_t i = 0; i < count && !rc; i++) {
        struct pack *p;
        rc = pack_open(cache, ids[i], false, &p);
        if (rc == -ENOENT) { /* an index without its pack, maybe with its sums: both go */
            pack_path(cache, ids[i], "idx", path, sizeof(path));
            cache_syscalls.unlink(path);
            pack_path(cache, ids[i], "sums", path, sizeof(path));
            cache_syscalls.unlink(path);
            rc = 0;
            continue;
        }
        if (rc)
            break;
        p->next = cache->packs;
        cache->packs = p;
        cache->pack_count++;
        struct stat st;
        if (fstat(p->sums_fd, &st) == 0)
            count_sums_space(cache, p, (uint64_t)st.st_size);
        rc = load_pack(cache, p);
    }
    free(ids);
    for (struct pack **pp = &cache->packs; !rc && *pp;) {
        struct pack *p = *pp;
        if (p->live == 0) {
            *pp = p->next;
            cache->pack_count--;
            pack_remove(cache, p);
        } else {
            pp = &p->next;
        }
    }
    return rc;
}

/* Copies one chunk file of the old layout into the active pack. */
static int import_file(struct cache *cache, int dirfd, const char *name, const struct chunk_hash *hash,
                       const struct stat *st)
{
    struct shard *s = shard_of(cache, hash);
    struct cache_entry *e = find_entry(s, hash);
    if (e && e->state == ENTRY_RESIDENT)
        return 0; /* imported before a crash, or also in a pack */
    int in = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return -errno;
    uint64_t len = (uint64_t)st->st_size;
    struct pack *p;
    uint64_t off;
    int rc = pack_alloc(cache, len, &p, &off);
    if (rc) {
        close(in);
        return rc;
    }
    loff_t src = 0, dst = (loff_t)off;
    while (!rc && (uint64_t)src < len) {
        ssize_t n = copy_file_range(in, &src, p->fd, &dst, (size_t)(len - (uint64_t)src), 0);
        rc = n < 0 ? -errno : n == 0 ? -EIO : 0;
    }
    close(in);
    if (!rc)
        rc = append_record(cache, p, RECORD_ADD, hash, off, len, (uint64_t)st->st_mtime, false);
    if (rc) {
        punch(p, off, len);
        pack_unref(cache, p);
        return rc;
    }
    p->live--; /* add_loaded counts it again */
    return add_loaded(cache, hash, p, off, len, (uint64_t)st->st_mtime);
}

/* The old layout (imgfs-cache 1): one file per chunk under chunks/XY/. Each
 * file is copied into a pack and then removed, so a crash half-way only
 * leaves files to import at the next open. Imported chunks are verified on
 * first use like every other; a file that cannot be imported is dropped
 * (it is fetched again when needed). */
static int import_old_layout(struct cache *cache)
{
    char path[PATH_MAX];
    int rc = path_join(path, sizeof(path), "%s/chunks", cache->dir);
    if (rc)
        return rc;
    struct stat st;
    if (stat(path, &st) < 0)
        return errno == ENOENT ? 0 : -errno;
    uint64_t imported = 0, dropped = 0;
    for (int i = 0; i < 256 && !rc; i++) {
        char sub[PATH_MAX];
        if ((rc = path_join(sub, sizeof(sub), "%s/chunks/%02x", cache->dir, i)))
            break;
        DIR *d = opendir(sub);
        if (!d)
            continue;
        struct dirent *de;
        while ((de = readdir(d)) && !rc) {
            if (de->d_name[0] == '.')
                continue;
            struct chunk_hash hash;
            bool is_chunk = strlen(de->d_name) == CHUNK_HASH_HEX && chunk_hash_from_hex(de->d_name, &hash) == 0 &&
                            fstatat(dirfd(d), de->d_name, &st, 0) == 0 && S_ISREG(st.st_mode) && st.st_size > 0;
            int err = is_chunk ? import_file(cache, dirfd(d), de->d_name, &hash, &st) : -EINVAL;
            if (err == -ENOMEM)
                rc = err;
            else if (err)
                dropped++;
            else
                imported++;
            unlinkat(dirfd(d), de->d_name, 0);
        }
        closedir(d);
        rmdir(sub);
    }
    if (!rc && rmdir(path) < 0 && errno != ENOENT)
        log_warn("cache: cannot remove %s after the import: %s", path, strerror(errno));
    if (!rc && (imported || dropped))
        log_info("cache: imported %llu chunk files of the old layout into packs (%llu dropped)",
                 (unsigned long long)imported, (unsigned long long)dropped);
    return rc;
}

static int prepare_dir(const char *dir, char *err, size_t errlen)
{
    struct stat st;
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "cache directory %s does not exist or is not a directory", dir);
        return -ENOENT;
    }
    char path[PATH_MAX];
    int rc = path_join(path, sizeof(path), "%s/imgfs-cache", dir);
    if (rc) {
        snprintf(err, errlen, "cache directory path is too long");
        return rc;
    }
    rc = check_marker_file(path, CACHE_MARKER);
    if (rc == -EBADMSG && check_marker_file(path, CACHE_MARKER_V1) == 0)
        rc = 0; /* the old layout: imported once the packs are loaded */
    if (rc == -EBADMSG) {
        snprintf(err, errlen, "cache directory %s has an unsupported imgfs-cache marker", dir);
        return rc;
    }
    if (rc && rc != -ENOENT) {
        snprintf(err, errlen, "cannot read the imgfs-cache marker in %s: %s", dir, strerror(-rc));
        return rc;
    }
    char packs[PATH_MAX];
    rc = path_join(packs, sizeof(packs), "%s/packs", dir);
    if (!rc)
        rc = mkdir_p(packs);
    if (rc)
        snprintf(err, errlen, "cannot set up cache directory %s: %s", dir, strerror(-rc));
    return rc;
}

int cache_open(const char *dir, struct cache **out, char *err, size_t errlen)
{
    if (strlen(dir) >= sizeof(((struct cache *)0)->dir)) {
        snprintf(err, errlen, "cache directory path is too long");
        return -ENAMETOOLONG;
    }
    int rc = prepare_dir(dir, err, errlen);
    if (rc)
        return rc;
    struct cache *cache = calloc(1, sizeof(*cache));
    if (!cache) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    snprintf(cache->dir, sizeof(cache->dir), "%s", dir);
    cache->pack_limit = DEFAULT_PACK_LIMIT;
    /* Each pack keeps three descriptors open for the life of the cache. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    atomic_store(&cache->clock, (uint64_t)time(NULL) + 1);
    pthread_mutex_init(&cache->evict_lock, NULL);
    pthread_mutex_init(&cache->pack_lock, NULL);
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        pthread_mutex_init(&s->lock, NULL);
        cond_init_monotonic(&s->changed);
        s->bucket_count = INITIAL_BUCKETS;
        s->buckets = calloc(s->bucket_count, sizeof(*s->buckets));
        if (!s->buckets) {
            cache_close(cache);
            snprintf(err, errlen, "out of memory");
            return -ENOMEM;
        }
    }
    rc = load_packs(cache);
    if (!rc)
        rc = import_old_layout(cache);
    char marker[PATH_MAX];
    if (!rc && (rc = path_join(marker, sizeof(marker), "%s/imgfs-cache", dir)) == 0 &&
        check_marker_file(marker, CACHE_MARKER) != 0)
        rc = write_file_atomic(marker, CACHE_MARKER, strlen(CACHE_MARKER));
    if (rc) {
        snprintf(err, errlen, "cannot load cache directory %s: %s", dir, strerror(-rc));
        cache_close(cache);
        return rc;
    }
    *out = cache;
    return 0;
}

void cache_close(struct cache *cache)
{
    if (!cache)
        return;
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        for (size_t b = 0; s->buckets && b < s->bucket_count; b++) {
            struct cache_entry *e = s->buckets[b];
            while (e) {
                struct cache_entry *next = e->next;
                free(e->stale); /* no pins are left at close */
                free(e);
                e = next;
            }
        }
        free(s->buckets);
        pthread_mutex_destroy(&s->lock);
        pthread_cond_destroy(&s->changed);
    }
    while (cache->packs) {
        struct pack *p = cache->packs;
        cache->packs = p->next;
        if (p->live == 0 && p->end == 0)
            pack_remove(cache, p); /* the active pack of a run that stored nothing */
        else
            pack_free(p);
    }
    pthread_mutex_destroy(&cache->evict_lock);
    pthread_mutex_destroy(&cache->pack_lock);
    free(cache);
}

void cache_set_pack_limit(struct cache *cache, uint64_t bytes) { cache->pack_limit = bytes ? bytes : 1; }

/* ---- acquire / fill / release ---------------------------------------------- */

/* Checks a resident chunk's bytes against its hash, the first time in this
 * run, and writes its block sums anew when they are not those of its bytes:
 * when a block check failed (sums_failed: sums a crash left behind, or
 * damage), or a sum is unknown (a pack of an older build). Otherwise the
 * sums, written with the verified bytes, are not computed again. Runs
 * without the shard lock (the entry is BUSY). */
static int verify_resident(struct cache *cache, struct cache_entry *e, uint32_t chunk_size, bool sums_failed,
                           char **out)
{
    if (e->size != chunk_size)
        return -EBADMSG;
    char *buf = cache_check_alloc(chunk_size);
    if (!buf)
        return -ENOMEM;
    int rc = read_full_at(e->pack->fd, buf, chunk_size, (off_t)e->off);
    if (!rc) {
        struct chunk_hash got;
        chunk_hash_compute(buf, chunk_size, &got);
        if (!chunk_hash_equal(&got, &e->hash))
            rc = -EBADMSG;
    }
    uint64_t stored[MAX_SUMMED_BLOCKS];
    size_t blocks = chunk_size / SUM_BLOCK;
    bool rewrite = sums_failed;
    if (!rc && all_blocks(chunk_size) && !rewrite && read_sums(e->pack, e->off, 0, blocks, stored) == 0)
        for (size_t i = 0; i < blocks && !rewrite; i++)
            rewrite = stored[i] == 0;
    if (!rc && all_blocks(chunk_size) && rewrite) {
        /* Best effort: without them the chunk is checked whole next run. */
        count_sums_space(cache, e->pack, sums_end(e->off, chunk_size));
        if (write_sums(e->pack, e->off, &e->hash, buf, chunk_size) != 0)
            log_warn("cache: cannot write block sums in pack %08x: %s", e->pack->id, strerror(errno));
    }
    if (rc) {
        free(buf);
        return rc == -ENODATA ? -EBADMSG : rc; /* short: cut off by a crash */
    }
    *out = buf;
    return 0;
}

static int wait_until(struct shard *s, uint64_t deadline_ns)
{
    return cond_wait_until(&s->changed, &s->lock, deadline_ns) == ETIMEDOUT ? -ETIMEDOUT : 0;
}

static void pin_resident(struct cache *cache, struct cache_entry *e, struct cache_pin *pin)
{
    e->last_use = atomic_fetch_add(&cache->clock, 1);
    pin->entry = e;
    pin->fd = e->pack->fd;
    pin->off = e->off;
}

int cache_acquire(struct cache *cache, const struct chunk_hash *hash, uint32_t chunk_size, uint32_t want_off,
                  uint32_t want_len, uint64_t deadline_ns, struct cache_pin *pin)
{
    const uint64_t want = blocks_wanted(chunk_size, want_off, want_len); /* 0: the whole chunk */
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    if (!e && !(e = insert_entry(s, hash))) {
        pthread_mutex_unlock(&s->lock);
        return -ENOMEM;
    }
    pin->waited = false;
    pin->bytes = NULL;
    for (;;) {
        if (e->state == ENTRY_RESIDENT && (e->verified || (want && (e->verified_blocks & want) == want))) {
            e->pins++;
            pin_resident(cache, e, pin);
            pthread_mutex_unlock(&s->lock);
            return CACHE_HIT;
        }
        if (e->state == ENTRY_ABSENT) {
            e->state = ENTRY_BUSY;
            e->pins++;
            pin->entry = e;
            pin->fd = -1;
            pin->off = 0;
            pthread_mutex_unlock(&s->lock);
            return CACHE_MUST_FILL;
        }
        if (e->state == ENTRY_RESIDENT) {
            /* In a pack but (the wanted blocks) not checked in this run:
             * verify without the lock, by block when the sums allow. Readers
             * of blocks checked before may hold pins meanwhile. */
            e->state = ENTRY_BUSY;
            e->pins++;
            /* A chunk of another size than asked is checked whole (and found bad). */
            uint64_t missing = e->size == chunk_size ? want & ~e->verified_blocks : 0;
            pthread_mutex_unlock(&s->lock);
            char *bytes = NULL;
            uint32_t bytes_off = 0, bytes_len = chunk_size;
            int rc = missing ? verify_blocks(e, want, missing, &bytes, &bytes_off, &bytes_len) : -EAGAIN;
            bool whole = rc == -EAGAIN;
            if (whole)
                rc = verify_resident(cache, e, chunk_size, missing != 0, &bytes);
            pthread_mutex_lock(&s->lock);
            if (rc == 0) {
                e->state = ENTRY_RESIDENT;
                e->verified_blocks |= whole ? all_blocks(chunk_size) : missing;
                e->verified = whole || e->verified_blocks == all_blocks(chunk_size);
                pin_resident(cache, e, pin);
                pin->bytes = bytes;
                pin->bytes_off = bytes_off;
                pin->bytes_len = bytes_len;
                pthread_cond_broadcast(&s->changed);
                pthread_mutex_unlock(&s->lock);
                return CACHE_HIT;
            }
            if (rc == -ENOMEM) { /* says nothing about its bytes: they stay */
                e->state = ENTRY_RESIDENT;
                e->pins--;
                pthread_cond_broadcast(&s->changed);
                pthread_mutex_unlock(&s->lock);
                return rc;
            }
            /* Its bytes go. Readers of its good blocks may hold pins on
             * them (nobody new pins a BUSY entry): then the copy stays,
             * remembered as stale, until the last of them is done. Only
             * when that cannot be (a second stale copy, no memory) does
             * this wait for them, bounded. */
            struct stale_copy *stale = NULL;
            if (e->pins > 1 && !e->stale && (stale = malloc(sizeof(*stale))) != NULL) {
                *stale = (struct stale_copy){e->pack, e->off, e->size, e->pins - 1};
                e->stale = stale;
            }
            const uint64_t drop_deadline = now_ns() + READERS_WAIT_NS;
            while (!stale && e->pins > 1 && wait_until(s, drop_deadline) == 0)
                ;
            if (!stale && e->pins > 1) {
                e->state = ENTRY_RESIDENT; /* checked again by the next reader */
                e->pins--;
                pthread_cond_broadcast(&s->changed);
                pthread_mutex_unlock(&s->lock);
                return -EIO;
            }
            pthread_mutex_unlock(&s->lock);
            if (rc == -EBADMSG) {
                atomic_fetch_add(&cache->dropped_damaged, 1);
                char hex[CHUNK_HASH_HEX + 1];
                chunk_hash_to_hex(&e->hash, hex);
                log_warn("cache: dropped damaged chunk %s (pack %08x, offset %llu)", hex, e->pack->id,
                         (unsigned long long)e->off);
            }
            if (stale)
                append_record(cache, e->pack, RECORD_DROP, &e->hash, e->off, e->size, 0, false);
            else
                discard_bytes(cache, e);
            pthread_mutex_lock(&s->lock);
            struct pack *p = drop_resident(cache, s, e);
            if (stale)
                p = NULL; /* the stale copy keeps its place in the pack */
            pin->fd = -1;
            pin->off = 0;
            if (rc == -EBADMSG) {
                /* Damaged: this caller fetches it afresh (the entry stays BUSY). */
                pin->entry = e;
                pthread_mutex_unlock(&s->lock);
                if (p)
                    pack_unref(cache, p);
                return CACHE_MUST_FILL;
            }
            e->state = ENTRY_ABSENT;
            e->pins--;
            pthread_cond_broadcast(&s->changed);
            pthread_mutex_unlock(&s->lock);
            if (p)
                pack_unref(cache, p);
            return rc;
        }
        /* ENTRY_BUSY: somebody else is filling, verifying or evicting it. */
        pin->waited = true;
        if (wait_until(s, deadline_ns) == -ETIMEDOUT && e->state == ENTRY_BUSY) {
            pthread_mutex_unlock(&s->lock);
            return -ETIMEDOUT;
        }
    }
}

/* ---- size limit and eviction ------------------------------------------------ */

struct eviction_candidate {
    struct chunk_hash hash;
    uint64_t last_use;
};

static int by_last_use(const void *a, const void *b)
{
    const struct eviction_candidate *x = a, *y = b;
    return x->last_use < y->last_use ? -1 : x->last_use > y->last_use;
}

static void compact_sparse_pack(struct cache *cache);

/* Removes least recently used, unpinned chunks until at most target bytes
 * are used: each gets a DROP record and its blocks punched out of its pack,
 * and a full pack whose last chunk goes is removed. Returns the number
 * evicted. Caller holds evict_lock. */
static uint64_t evict_to(struct cache *cache, uint64_t target)
{
    size_t cap = 0, count = 0;
    struct eviction_candidate *list = NULL;
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        pthread_mutex_lock(&s->lock);
        for (size_t b = 0; b < s->bucket_count; b++) {
            for (struct cache_entry *e = s->buckets[b]; e; e = e->next) {
                if (e->state != ENTRY_RESIDENT || e->pins || e->holds)
                    continue;
                if (count == cap) {
                    size_t grown_cap = cap ? cap * 2 : 1024;
                    struct eviction_candidate *grown = realloc(list, grown_cap * sizeof(*grown));
                    if (!grown)
                        break;
                    list = grown;
                    cap = grown_cap;
                }
                list[count++] = (struct eviction_candidate){e->hash, e->last_use};
            }
        }
        pthread_mutex_unlock(&s->lock);
    }
    if (count)
        qsort(list, count, sizeof(*list), by_last_use);
    uint64_t evicted = 0;
    for (size_t i = 0; i < count && atomic_load(&cache->used) > target; i++) {
        struct shard *s = shard_of(cache, &list[i].hash);
        pthread_mutex_lock(&s->lock);
        struct cache_entry *e = find_entry(s, &list[i].hash);
        /* Skip anything that was used or pinned since the list was made. */
        if (!e || e->state != ENTRY_RESIDENT || e->pins || e->holds || e->last_use != list[i].last_use) {
            pthread_mutex_unlock(&s->lock);
            continue;
        }
        e->state = ENTRY_BUSY; /* readers wait while its bytes go */
        pthread_mutex_unlock(&s->lock);
        discard_bytes(cache, e);
        pthread_mutex_lock(&s->lock);
        struct pack *p = drop_resident(cache, s, e);
        e->state = ENTRY_ABSENT;
        pthread_cond_broadcast(&s->changed);
        pthread_mutex_unlock(&s->lock);
        pack_unref(cache, p);
        evicted++;
    }
    free(list);
    atomic_fetch_add(&cache->evictions, evicted);
    if (evicted)
        compact_sparse_pack(cache);
    return evicted;
}

/* Reserves len bytes under the limit, evicting down to 90% of it (the
 * hysteresis) when needed. -ENOSPC when everything left is in use. */
static int reserve(struct cache *cache, uint64_t len)
{
    if (!cache->limit) {
        atomic_fetch_add(&cache->used, len);
        return 0;
    }
    for (int attempt = 0;; attempt++) {
        uint64_t used = atomic_load(&cache->used);
        while (used + len <= cache->limit) {
            if (atomic_compare_exchange_weak(&cache->used, &used, used + len))
                return 0;
        }
        if (attempt == 2)
            return -ENOSPC;
        uint64_t low = cache->limit / 10 * 9;
        uint64_t target = low > len ? low - len : 0;
        if (cache->reclaim && atomic_load(&cache->charged)) { /* charged space gives way first */
            used = atomic_load(&cache->used);
            if (used > target)
                cache->reclaim(cache->reclaim_ctx, used - target);
            if (atomic_load(&cache->used) + len <= cache->limit)
                continue;
        }
        pthread_mutex_lock(&cache->evict_lock);
        evict_to(cache, low > len ? low - len : 0);
        pthread_mutex_unlock(&cache->evict_lock);
    }
}

int cache_charge(struct cache *cache, uint64_t len)
{
    uint64_t room = cache->limit / 10 * 9;
    uint64_t used = atomic_load(&cache->used);
    do {
        if (cache->limit && used + len > room)
            return -ENOSPC;
    } while (!atomic_compare_exchange_weak(&cache->used, &used, used + len));
    atomic_fetch_add(&cache->charged, len);
    return 0;
}

void cache_uncharge(struct cache *cache, uint64_t len)
{
    atomic_fetch_sub(&cache->charged, len);
    atomic_fetch_sub(&cache->used, len);
}

void cache_set_reclaim(struct cache *cache, uint64_t (*reclaim)(void *ctx, uint64_t want), void *ctx)
{
    cache->reclaim = reclaim;
    cache->reclaim_ctx = ctx;
}

void cache_set_limit(struct cache *cache, uint64_t limit)
{
    cache->limit = limit;
    if (limit && atomic_load(&cache->used) > limit) {
        pthread_mutex_lock(&cache->evict_lock);
        evict_to(cache, limit / 10 * 9);
        pthread_mutex_unlock(&cache->evict_lock);
    }
}

/* Appends a chunk to the active pack (moved: the entry whose copy it is, for
 * a compaction): its bytes and block sums, then its ADD record. The record
 * is written only once the bytes are, so after a kill -9 a record never
 * points at a half-written chunk; after a power loss it might (no fsync),
 * which the verification on first use catches. */
static int store(struct cache *cache, const struct chunk_hash *hash, const void *data, size_t len,
                 const struct cache_entry *moved, struct pack **pack, uint64_t *off)
{
    int rc = pack_alloc(cache, len, pack, off);
    if (rc)
        return rc;
    rc = put_at((*pack)->fd, data, len, *off);
    /* Sums come from verified bytes only: a fill's. A moved chunk keeps
     * its sums, since its bytes were read again for the move unchecked. */
    if (!rc) {
        count_sums_space(cache, *pack, sums_end(*off, len));
        rc = moved ? copy_sums(moved->pack, moved->off, *pack, *off, len) : write_sums(*pack, *off, hash, data, len);
    }
    if (!rc)
        rc = append_record(cache, *pack, RECORD_ADD, hash, *off, len, (uint64_t)time(NULL), true);
    if (rc) {
        punch(*pack, *off, len);
        pack_unref(cache, *pack);
    }
    return rc;
}

/* ---- compaction ------------------------------------------------------------- */

/* A pack stays while any chunk in it is live. Eviction punches the others
 * out, so its disk space is small, but a pack that a few hot chunks keep
 * alive still costs its index log (up to two records per slot) and two
 * descriptors. So after an eviction pass, a full pack whose live bytes are
 * at most 1/16 of its length has its chunks copied into the active pack and
 * goes: at most one pack per pass, and at most 1/16 of a pack copied.
 *
 * Crash safety: the moved chunks' copies (bytes, sums, ADD records) are
 * written first, and the entries point at them; then their packs and
 * packs/ are synced, and only then do the old copies get their DROP
 * records and punches. Without the sync a power cut could keep the drops
 * and lose the copies of chunks that had long been on disk (the one sync
 * of the cache: once per compaction, at most once per eviction pass). A
 * crash before the drops leaves two copies of correct bytes; cache_open
 * keeps the later one (add_loaded) and drops the other; a failed sync
 * leaves them so too, until the next open. Pinned chunks are skipped
 * (their pack stays until a later pass). Caller holds evict_lock. */

/* An old copy of a moved chunk, dropped once its new copy is synced. */
struct moved_copy {
    struct chunk_hash hash;
    uint64_t off, size;
};

/* Syncs the packs the copies went to (each kept by a live count of ours)
 * and the directory that names them. */
static int sync_copies(struct cache *cache, struct pack **dests, size_t count)
{
    int rc = 0;
    for (size_t i = 0; i < count && !rc; i++)
        if (cache_syscalls.fdatasync(dests[i]->fd) < 0 || cache_syscalls.fdatasync(dests[i]->sums_fd) < 0 ||
            cache_syscalls.fdatasync(dests[i]->idx_fd) < 0)
            rc = -errno;
    char dir[PATH_MAX];
    if (!rc && (rc = path_join(dir, sizeof(dir), "%s/packs", cache->dir)) == 0)
        rc = cache_syscalls.fsync_dir(dir);
    return rc;
}

static void compact_sparse_pack(struct cache *cache)
{
    pthread_mutex_lock(&cache->pack_lock);
    for (struct pack *p = cache->packs; p; p = p->next)
        p->scan_bytes = 0;
    pthread_mutex_unlock(&cache->pack_lock);
    /* A resident entry's pack is in the list, so its scan_bytes is ours to count. */
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        pthread_mutex_lock(&s->lock);
        for (size_t b = 0; b < s->bucket_count; b++)
            for (struct cache_entry *e = s->buckets[b]; e; e = e->next)
                if (e->pack)
                    e->pack->scan_bytes += e->size;
        pthread_mutex_unlock(&s->lock);
    }
    struct pack *victim = NULL;
    pthread_mutex_lock(&cache->pack_lock);
    for (struct pack *p = cache->packs; p && !victim; p = p->next) {
        if (p != cache->active && p->live && p->end >= cache->pack_limit / 2 && p->scan_bytes * 16 <= p->end) {
            victim = p;
            victim->live++; /* keeps it while we work on it */
        }
    }
    pthread_mutex_unlock(&cache->pack_lock);
    if (!victim)
        return;
    char *buf = NULL;
    size_t buf_len = 0;
    struct moved_copy *olds = NULL;
    size_t nolds = 0, cap_olds = 0;
    struct pack *dests[8]; /* the active pack rolls over at most a few times in 1/16 of a pack */
    size_t ndests = 0;
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        pthread_mutex_lock(&s->lock);
        for (size_t b = 0; b < s->bucket_count; b++) {
            for (struct cache_entry *e = s->buckets[b]; e; e = e->next) {
                if (e->state != ENTRY_RESIDENT || e->pack != victim || e->pins || ndests == 8)
                    continue;
                e->state = ENTRY_BUSY; /* readers wait while it moves */
                pthread_mutex_unlock(&s->lock);
                struct pack *to = NULL;
                uint64_t off = 0;
                int rc = 0;
                if (buf_len < e->size) {
                    char *grown = realloc(buf, e->size);
                    rc = grown ? 0 : -ENOMEM;
                    if (grown) {
                        buf = grown;
                        buf_len = e->size;
                    }
                }
                if (!rc && nolds == cap_olds) {
                    size_t grown_cap = cap_olds ? cap_olds * 2 : 64;
                    struct moved_copy *grown = realloc(olds, grown_cap * sizeof(*grown));
                    rc = grown ? 0 : -ENOMEM;
                    if (grown) {
                        olds = grown;
                        cap_olds = grown_cap;
                    }
                }
                if (!rc)
                    rc = read_full_at(victim->fd, buf, e->size, (off_t)e->off);
                atomic_fetch_add(&cache->used, e->size + sizeof(struct pack_record));
                if (!rc)
                    rc = store(cache, &e->hash, buf, e->size, e, &to, &off);
                if (rc) {
                    atomic_fetch_sub(&cache->used, e->size + sizeof(struct pack_record));
                    pthread_mutex_lock(&s->lock);
                    e->state = ENTRY_RESIDENT;
                    pthread_cond_broadcast(&s->changed);
                    continue; /* it stays where it is */
                }
                olds[nolds++] = (struct moved_copy){e->hash, e->off, e->size};
                if (ndests == 0 || dests[ndests - 1] != to) {
                    pthread_mutex_lock(&cache->pack_lock);
                    to->live++; /* kept until it is synced */
                    pthread_mutex_unlock(&cache->pack_lock);
                    dests[ndests++] = to;
                }
                pthread_mutex_lock(&s->lock);
                e->pack = to;
                e->off = off;
                /* The new copy was read and written unchecked: checked again at its next use. */
                e->verified = false;
                e->verified_blocks = 0;
                e->state = ENTRY_RESIDENT;
                pthread_cond_broadcast(&s->changed);
            }
        }
        pthread_mutex_unlock(&s->lock);
    }
    free(buf);
    int rc = nolds ? sync_copies(cache, dests, ndests) : 0;
    if (rc)
        log_warn("cache: cannot sync the chunks moved out of pack %08x: %s (it stays until the next open)", victim->id,
                 strerror(-rc));
    for (size_t i = 0; i < nolds && !rc; i++) {
        discard_copy(cache, victim, &olds[i].hash, olds[i].off, olds[i].size);
        atomic_fetch_sub(&cache->used, olds[i].size); /* the old copy's bytes */
        pack_unref(cache, victim); /* a chunk fewer in it */
    }
    free(olds);
    for (size_t i = 0; i < ndests; i++)
        pack_unref(cache, dests[i]);
    pack_unref(cache, victim); /* removes it when nothing pinned stayed */
}

int cache_fill(struct cache *cache, struct cache_pin *pin, const void *data, size_t len)
{
    struct cache_entry *e = pin->entry;
    struct pack *pack = NULL;
    uint64_t off = 0;
    /* The chunk, its ADD record, and a block its sums may add (counted as
     * it is, by store(), and given back below). */
    const uint64_t need = len + sizeof(struct pack_record) + SUM_BLOCK;
    int rc = reserve(cache, need);
    if (!rc) {
        rc = store(cache, &e->hash, data, len, NULL, &pack, &off);
        if (rc == -ENOSPC || rc == -EDQUOT) {
            /* The cache's file system is full: make room (flat files
             * first) and retry once. */
            uint64_t used = atomic_load(&cache->used);
            if (cache->reclaim && atomic_load(&cache->charged))
                cache->reclaim(cache->reclaim_ctx, used / 10);
            pthread_mutex_lock(&cache->evict_lock);
            evict_to(cache, used - used / 10);
            pthread_mutex_unlock(&cache->evict_lock);
            rc = store(cache, &e->hash, data, len, NULL, &pack, &off);
        }
        if (rc)
            atomic_fetch_sub(&cache->used, need);
    }
    if (rc) {
        cache_abandon(cache, pin);
        return rc;
    }
    atomic_fetch_sub(&cache->used, SUM_BLOCK);
    struct shard *s = shard_of(cache, &e->hash);
    pthread_mutex_lock(&s->lock);
    e->state = ENTRY_RESIDENT;
    e->verified = true; /* the caller verified the bytes it gave us */
    e->verified_blocks = all_blocks(len);
    e->size = len;
    e->pack = pack;
    e->off = off;
    s->resident_chunks++;
    s->resident_bytes += len;
    s->held_bytes += e->holds ? len : 0;
    s->changes++;
    pin_resident(cache, e, pin);
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void cache_abandon(struct cache *cache, struct cache_pin *pin)
{
    struct cache_entry *e = pin->entry;
    struct shard *s = shard_of(cache, &e->hash);
    pthread_mutex_lock(&s->lock);
    e->state = ENTRY_ABSENT;
    e->pins--;
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->lock);
    pin->entry = NULL;
    pin->fd = -1;
    pin->off = 0;
}

void cache_release(struct cache *cache, struct cache_pin *pin)
{
    struct cache_entry *e = pin->entry;
    if (!e)
        return;
    struct shard *s = shard_of(cache, &e->hash);
    pthread_mutex_lock(&s->lock);
    e->pins--;
    struct stale_copy *gone = NULL;
    if (e->stale && pin->fd == e->stale->pack->fd && pin->off == e->stale->off && --e->stale->pins == 0) {
        gone = e->stale;
        e->stale = NULL;
    }
    if (e->state == ENTRY_BUSY)
        pthread_cond_broadcast(&s->changed); /* a damaged chunk's drop may wait for its readers */
    pthread_mutex_unlock(&s->lock);
    if (gone) {
        punch(gone->pack, gone->off, gone->size);
        pack_unref(cache, gone->pack);
        free(gone);
    }
    free(pin->bytes);
    pin->bytes = NULL;
    pin->entry = NULL;
    pin->fd = -1;
    pin->off = 0;
}

bool cache_contains(struct cache *cache, const struct chunk_hash *hash)
{
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    bool resident = e && (e->state == ENTRY_RESIDENT);
    pthread_mutex_unlock(&s->lock);
    return resident;
}

bool cache_stores(struct cache *cache, const struct chunk_hash *hash)
{
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    bool stored = e && e->pack; /* counted in resident_* (drop_resident clears pack) */
    pthread_mutex_unlock(&s->lock);
    return stored;
}

bool cache_stores_held(struct cache *cache, const struct chunk_hash *hash)
{
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    bool held = e && e->pack && e->holds;
    pthread_mutex_unlock(&s->lock);
    return held;
}

uint64_t cache_generation(struct cache *cache)
{
    uint64_t sum = 0; /* of counts that only grow: it changes when one does */
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        pthread_mutex_lock(&s->lock);
        sum += s->changes;
        pthread_mutex_unlock(&s->lock);
    }
    return sum;
}

int cache_prefetch(struct cache *cache, const struct chunk_hash *hash)
{
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    if (!e || e->state != ENTRY_RESIDENT) {
        pthread_mutex_unlock(&s->lock);
        return -ENOENT;
    }
    /* Pinned while the advice is given, so that its pack stays open. */
    e->pins++;
    struct cache_pin pin = {.entry = e, .fd = e->pack->fd, .off = e->off};
    uint64_t size = e->size;
    pthread_mutex_unlock(&s->lock);
    int rc = posix_fadvise(pin.fd, (off_t)pin.off, (off_t)size, POSIX_FADV_WILLNEED);
    cache_release(cache, &pin);
    return -rc;
}

int cache_hold(struct cache *cache, const struct chunk_hash *hash, bool hold)
{
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    if (!e && hold)
        e = insert_entry(s, hash);
    bool was_held = e && e->holds;
    if (e && hold)
        e->holds++;
    else if (e && e->holds)
        e->holds--;
    if (e && e->pack && was_held != (e->holds > 0)) /* counted resident: held_bytes follows */
        s->held_bytes += was_held ? -e->size : e->size;
    pthread_mutex_unlock(&s->lock);
    return e || !hold ? 0 : -ENOMEM;
}

void cache_get_usage(struct cache *cache, struct cache_usage *out)
{
    memset(out, 0, sizeof(*out));
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        pthread_mutex_lock(&s->lock);
        out->chunks += s->resident_chunks;
        out->bytes += s->resident_bytes;
        out->held_bytes += s->held_bytes;
        pthread_mutex_unlock(&s->lock);
    }
    out->charged_bytes = atomic_load(&cache->charged);
    out->used = atomic_load(&cache->used);
    pthread_mutex_lock(&cache->pack_lock);
    out->packs = cache->pack_count;
    pthread_mutex_unlock(&cache->pack_lock);
    out->open_fds = out->packs * 3;
    out->dropped_damaged = atomic_load(&cache->dropped_damaged);
    out->limit = cache->limit;
    out->evictions = atomic_load(&cache->evictions);
}

int cache_locate(struct cache *cache, const struct chunk_hash *hash, char *path, size_t path_len, uint64_t *off,
                 uint64_t *len)
{
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    int rc = -ENOENT;
    if (e && e->state == ENTRY_RESIDENT) {
        pack_path(cache, e->pack->id, "pack", path, path_len);
        *off = e->off;
        *len = e->size;
        rc = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}
