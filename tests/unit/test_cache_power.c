/* Power-loss tests of cache.c: a simulated power cut at a random system
 * call of a random workload of the chunk cache, then the cache opened
 * again from what the cut left on "disk" and checked against the promises
 * of cache.h.
 *
 * THE MODEL is power_model.h's, through cache_syscalls, which every change
 * of the files under packs/ (the modelled directory) goes through. The
 * cache syncs nothing on its way (cache.h): what reaches the disk is what
 * the kernel writes back, which the workload does at random, per file
 * (power_writeback) and for the directory (power_writeback_dir).
 *
 * THE WORKLOAD: reads and fills of 48 chunks of 8 KiB (whole, or a range
 * checked by block), under a limit of about 24 of them (so fills evict),
 * packs of 16 chunks (so they roll over, go when their last chunk does,
 * and are compacted), readers' pins kept across operations, pre-copy holds,
 * evictions by a lowered limit, clean reopens, and the kernel's writeback
 * of random pack files and of the directory; then a cut at a random system
 * call (inside a fill, an eviction's record or punch, a pack's creation or
 * removal, a compaction, an open's cut of a torn log), or after the last
 * operation. Then the cache is opened from the cut's state (that open may
 * be cut too: the next epoch's open then checks) and checked:
 *   - no hit, ever, serves other bytes than the chunk's;
 *   - every chunk whose insert was durable (cache.h: its fill returned,
 *     then its pack, its index log and the directory were written back)
 *     and that the cache did not drop since (evicted) is a hit;
 *   - packs/ holds only whole packs (.pack, .idx and .sums of one number),
 *     as many as cache_get_usage counts, and its used is exactly the index
 *     logs, the sums files (in 4 KiB blocks) and the chunks it counts;
 *   - the chunks that hit are those it counts, and a second open counts
 *     the same.
 * What survived a cut is durable at the next epoch (the model starts from
 * the disk as it is). Each iteration runs EPOCHS epochs on one cache.
 *
 * The seed is printed; IMGFS_CACHE_POWER_SEED=N replays from N (iteration
 * k runs seed N+k), IMGFS_CACHE_POWER_ITERATIONS=K runs K iterations. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache.h"
#include "check.h"
#include "hash.h"
#include "power_model.h"
#include "test_files.h"
#include "util.h"

#define CS (8u * 1024)
#define NCHUNK 48
#define LIMIT (24ull * CS)
#define PACK_LIMIT (16ull * CS)
#define MAX_PINS 4
#define MAX_HELD 3
#define EPOCHS 4
#define NAME_LEN 64

static int epoch;
static bool tracing; /* IMGFS_CACHE_POWER_TRACE=1: every operation on stderr, to follow a replay */

__attribute__((format(printf, 1, 2))) static void trace(const char *fmt, ...)
{
    if (!tracing)
        return;
    fprintf(stderr, "[epoch %d call %" PRIu64 "%s] ", epoch, power_calls(), power_cut_done() ? " cut" : "");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* ---- cache_syscalls through the power model ----------------------------------- */

static struct cache_syscalls real;

static int m_open(const char *path, int flags, mode_t mode)
{
    return power_open(real.open, path, flags, mode);
}
static ssize_t m_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    return power_pwrite(real.pwrite, fd, buf, len, off);
}
static ssize_t m_write(int fd, const void *buf, size_t len)
{
    return power_write(real.write, fd, buf, len);
}
static int m_fallocate(int fd, int mode, off_t off, off_t len)
{
    return power_fallocate(real.fallocate, fd, mode, off, len);
}
static int m_ftruncate(int fd, off_t len)
{
    return power_ftruncate(real.ftruncate, fd, len);
}
static int m_fdatasync(int fd)
{
    return power_fdatasync(real.fdatasync, fd);
}
static int m_fsync_dir(const char *dir)
{
    return power_fsync_dir(real.fsync_dir, dir);
}
static int m_unlink(const char *path)
{
    trace("unlink %s", strrchr(path, '/') + 1);
    return power_unlink(real.unlink, path);
}

/* ---- the chunks and what the test knows of them -------------------------------- */

static unsigned char data[NCHUNK][CS];
static struct chunk_hash hashes[NCHUNK];

static void make_chunks(void)
{
    for (unsigned id = 0; id < NCHUNK; id++) {
        uint64_t x = (id + 1) * 0x9e3779b97f4a7c15ull;
        for (size_t i = 0; i < CS; i += 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            memcpy(&data[id][i], &x, 8);
        }
        chunk_hash_compute(data[id], CS, &hashes[id]);
    }
}

/* Per chunk: durable (its insert reached the disk, and it was not dropped
 * since), or pending (filled, waiting for the writeback of its pack, its
 * index log and the directory, at the place it was when filled). */
struct known {
    bool durable, pending;
    bool need_pack, need_idx, need_dir;
    char pack[PATH_MAX]; /* where it was when the need_* were set */
    uint64_t off;
};
static struct known known[NCHUNK];

static struct cache *cache;
static char base[PATH_MAX - 256], cache_dir_path[PATH_MAX - 128], packs[PATH_MAX - 64], cut[PATH_MAX - 64];
static uint64_t iter_seed;
static bool failed_now;

static struct cache_pin pins[MAX_PINS];
static int pin_ids[MAX_PINS], npins;
static int held_ids[MAX_HELD], nheld;

static uint64_t hits, fills, durable_checked, cuts_in_open;

__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
    fprintf(stderr, "seed %" PRIu64 " epoch %d: ", iter_seed, epoch);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    failed_now = true;
}

static void open_cache(void)
{
    char err[256];
    int rc = cache_open(cache_dir_path, &cache, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "seed %" PRIu64 " epoch %d: the cache does not open: %s\n", iter_seed, epoch, err);
        abort();
    }
    cache_set_pack_limit(cache, PACK_LIMIT);
}

static void release_all(void)
{
    for (int i = 0; i < npins; i++)
        cache_release(cache, &pins[i]);
    npins = 0;
    for (int i = 0; i < nheld; i++)
        cache_hold(cache, &hashes[held_ids[i]], false);
    nheld = 0;
}

/* True when the hit's bytes [off, off + len) are the chunk's. */
static bool hit_is_right(const struct cache_pin *pin, int id, uint32_t off, uint32_t len)
{
    if (!len)
        len = CS;
    const char *mem = cache_pin_bytes(pin, off, len);
    static unsigned char buf[CS];
    if (!mem) {
        if (pread(pin->fd, buf, len, (off_t)(pin->off + off)) != (ssize_t)len)
            return false;
        mem = (const char *)buf;
    }
    return memcmp(mem, data[id] + off, len) == 0;
}

/* One read of chunk id (a random range of it, or all), filled when
 * missing; the pin is kept when keep and there is room. */
static void read_chunk(int id, bool keep)
{
    uint32_t off = 0, len = 0;
    if (power_below(2)) {
        off = (uint32_t)power_below(CS);
        len = 1 + (uint32_t)power_below(CS - off);
    }
    struct cache_pin pin;
    int rc = cache_acquire(cache, &hashes[id], CS, off, len, now_ns() + 60000000000ull, &pin);
    if (rc == CACHE_HIT) {
        hits++;
        if (!hit_is_right(&pin, id, off, len))
            fail("a hit of chunk %d serves other bytes", id);
    } else if (rc == CACHE_MUST_FILL) {
        known[id].durable = false; /* it was not there */
        rc = cache_fill(cache, &pin, data[id], CS);
        if (rc == -ENOSPC)
            return;
        if (rc) {
            fprintf(stderr, "seed %" PRIu64 ": a fill failed: %s\n", iter_seed, strerror(-rc));
            failed_now = true;
            return;
        }
        fills++;
        trace("filled chunk %d", id);
        known[id].pending = true;
        known[id].pack[0] = '\0'; /* its place is taken after the operation */
    } else {
        fprintf(stderr, "seed %" PRIu64 ": an acquire failed: %s\n", iter_seed, strerror(-rc));
        failed_now = true;
        return;
    }
    if (keep && npins < MAX_PINS) {
        pins[npins] = pin;
        pin_ids[npins++] = id;
    } else {
        cache_release(cache, &pin);
    }
}

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* After each operation: what the cache dropped is no longer promised, and
 * a pending chunk that moved waits for the writeback of its new place. */
static void after_op(void)
{
    for (int id = 0; id < NCHUNK; id++) {
        struct known *k = &known[id];
        if (!cache_stores(cache, &hashes[id])) {
            if (k->durable || k->pending)
                trace("chunk %d dropped", id);
            k->durable = k->pending = false;
            continue;
        }
        if (!k->pending)
            continue;
        char path[PATH_MAX];
        uint64_t off, len;
        if (cache_locate(cache, &hashes[id], path, sizeof(path), &off, &len) != 0)
            continue; /* busy: not after an operation of this thread */
        if (strcmp(path, k->pack) != 0 || off != k->off) {
            snprintf(k->pack, sizeof(k->pack), "%s", path);
            k->off = off;
            trace("chunk %d is at %s %" PRIu64, id, base_name(path), off);
            k->need_pack = k->need_idx = k->need_dir = true;
        }
    }
}

/* The kernel writes back some of the files of packs/, and maybe the directory. */
static void writeback(void)
{
    char names[256][NAME_LEN];
    size_t n = 0;
    DIR *d = opendir(packs);
    struct dirent *de;
    while (d && (de = readdir(d)) && n < 256)
        if (de->d_name[0] != '.' && power_below(2))
            snprintf(names[n++], NAME_LEN, "%.63s", de->d_name);
    if (d)
        closedir(d);
    bool dir = power_below(2);
    for (size_t i = 0; i < n; i++) {
        power_writeback(names[i]);
        trace("writeback %s", names[i]);
    }
    if (dir)
        power_writeback_dir();
    trace("writeback%s", dir ? " of the directory" : " not of the directory");
    for (int id = 0; id < NCHUNK; id++) {
        struct known *k = &known[id];
        if (!k->pending || !k->pack[0])
            continue;
        char idx[NAME_LEN];
        snprintf(idx, sizeof(idx), "%.8s.idx", base_name(k->pack));
        for (size_t i = 0; i < n; i++) {
            k->need_pack &= strcmp(names[i], base_name(k->pack)) != 0;
            k->need_idx &= strcmp(names[i], idx) != 0;
        }
        k->need_dir &= !dir;
        if (!k->need_pack && !k->need_idx && !k->need_dir) {
            trace("chunk %d durable", id);
            k->pending = false;
            k->durable = true;
        }
    }
}

/* One epoch's operations, until the cut. */
static void workload(int ops)
{
    for (int k = 0; k < ops && !power_cut_done() && !failed_now; k++) {
        uint64_t what = power_below(100);
        if (what < 50) {
            read_chunk((int)power_below(NCHUNK), power_below(5) == 0);
        } else if (what < 58) {
            if (npins) {
                int i = (int)power_below((uint64_t)npins);
                cache_release(cache, &pins[i]);
                pins[i] = pins[--npins];
                pin_ids[i] = pin_ids[npins];
            }
        } else if (what < 65) {
            if (nheld < MAX_HELD && power_below(2)) {
                held_ids[nheld] = (int)power_below(NCHUNK);
                cache_hold(cache, &hashes[held_ids[nheld++]], true);
            } else if (nheld) {
                int i = (int)power_below((uint64_t)nheld);
                cache_hold(cache, &hashes[held_ids[i]], false);
                held_ids[i] = held_ids[--nheld];
            }
        } else if (what < 85) {
            writeback();
        } else if (what < 92) {
            trace("evict");
            cache_set_limit(cache, LIMIT / 2 + power_below(LIMIT / 2));
            cache_set_limit(cache, LIMIT);
        } else {
            trace("reopen");
            release_all(); /* a clean restart */
            cache_close(cache);
            open_cache();
            cache_set_limit(cache, LIMIT);
        }
        after_op();
    }
}

/* ---- after a cut ------------------------------------------------------------- */

static uint64_t file_size(const char *name)
{
    char path[PATH_MAX];
    struct stat st;
    snprintf(path, sizeof(path), "%s/%s", packs, name);
    return stat(path, &st) == 0 ? (uint64_t)st.st_size : 0;
}

static void trace_dir(void)
{
    if (!tracing)
        return;
    DIR *d = opendir(packs);
    struct dirent *de;
    while (d && (de = readdir(d)))
        if (de->d_name[0] != '.')
            trace("on disk: %s, %" PRIu64 " bytes", de->d_name, file_size(de->d_name));
    if (d)
        closedir(d);
}

/* packs/ holds whole packs only, as many as the cache counts, and used is
 * exactly their index logs and sums files and the chunks counted. */
static void check_files(void)
{
    struct cache_usage u;
    cache_get_usage(cache, &u);
    uint64_t on_disk = 0, whole = 0;
    DIR *d = opendir(packs);
    struct dirent *de;
    while (d && (de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        unsigned id;
        char ext[8], tail, name[NAME_LEN];
        if (sscanf(de->d_name, "%8x.%4[a-z]%c", &id, ext, &tail) != 2 || strlen(de->d_name) < 12 ||
            (strcmp(ext, "pack") && strcmp(ext, "idx") && strcmp(ext, "sums"))) {
            fail("a stray file %s", de->d_name);
            continue;
        }
        const char *exts[] = {"pack", "idx", "sums"};
        for (int i = 0; i < 3; i++) {
            snprintf(name, sizeof(name), "%08x.%s", id, exts[i]);
            struct stat st;
            char path[PATH_MAX];
            snprintf(path, sizeof(path), "%s/%s", packs, name);
            if (stat(path, &st) != 0)
                fail("%s is left without %s", de->d_name, name);
        }
        if (strcmp(ext, "pack") == 0)
            whole++;
        else if (strcmp(ext, "idx") == 0)
            on_disk += file_size(de->d_name);
        else
            on_disk += (file_size(de->d_name) + 4095) / 4096 * 4096;
    }
    if (d)
        closedir(d);
    on_disk += u.bytes;
    if (whole != u.packs)
        fail("%" PRIu64 " packs on disk, %" PRIu64 " counted", whole, u.packs);
    if (u.used != on_disk)
        fail("used is %" PRIu64 ", the disk holds %" PRIu64, u.used, on_disk);
}

static void check_after_cut(void)
{
    trace_dir();
    check_files();
    uint64_t hit_count = 0;
    for (int id = 0; id < NCHUNK; id++) {
        bool stored = cache_stores(cache, &hashes[id]);
        if (known[id].durable && !stored) {
            fail("durable chunk %d is gone", id);
            continue;
        }
        if (!stored)
            continue;
        /* A range first (checked by block, against sums a cut may have
         * torn), then the whole chunk. */
        bool hit = true;
        for (int pass = 0; pass < 2 && hit; pass++) {
            uint32_t off = 0, len = 0;
            if (pass == 0) {
                off = (uint32_t)power_below(CS);
                len = 1 + (uint32_t)power_below(CS - off);
            }
            struct cache_pin pin;
            int rc = cache_acquire(cache, &hashes[id], CS, off, len, now_ns() + 60000000000ull, &pin);
            if (rc == CACHE_HIT) {
                if (!hit_is_right(&pin, id, off, len))
                    fail("after the cut, a hit of chunk %d serves other bytes", id);
                cache_release(cache, &pin);
            } else {
                hit = false;
                if (rc == CACHE_MUST_FILL)
                    cache_abandon(cache, &pin);
                if (known[id].durable)
                    fail("durable chunk %d is damaged", id);
            }
        }
        if (known[id].durable)
            durable_checked++;
        hit_count += hit;
        known[id].durable = hit; /* what survived is on disk now */
        known[id].pending = false;
    }
    check_files(); /* the checks' drops and sums are counted too */
    struct cache_usage before, after;
    cache_get_usage(cache, &before);
    if (before.chunks != hit_count || before.bytes != hit_count * CS)
        fail("the cache counts %" PRIu64 " chunks, %" PRIu64 " hit", before.chunks, hit_count);
    cache_close(cache);
    open_cache();
    cache_get_usage(cache, &after);
    if (after.chunks != before.chunks || after.bytes != before.bytes || after.used != before.used ||
        after.packs != before.packs)
        fail("a second open counts %" PRIu64 " chunks, %" PRIu64 " used, %" PRIu64 " packs, not %" PRIu64 ", %" PRIu64
             ", %" PRIu64, after.chunks, after.used, after.packs, before.chunks, before.used, before.packs);
}

/* ---- iterations ---------------------------------------------------------------- */

static bool run_iteration(uint64_t seed)
{
    power_seed(seed);
    iter_seed = seed;
    failed_now = false;
    memset(known, 0, sizeof(known));
    npins = nheld = 0;
    for (epoch = 0; epoch <= EPOCHS && !failed_now; epoch++) {
        bool last = epoch == EPOCHS;
        int ops = last ? 0 : 10 + (int)power_below(120);
        /* Now and then a cut inside the open after a cut. */
        power_arm(packs, cut, !last && epoch > 0 && power_below(4) == 0 ? 1 + power_below(12) : 0);
        open_cache();
        if (power_cut_done()) {
            cuts_in_open++; /* checked by the next epoch's open */
        } else {
            power_set_cut_at(0); /* the check is not cut */
            if (epoch > 0)
                check_after_cut();
            /* The disk as the check left it is where the next cut starts. */
            if (!last)
                power_arm(packs, cut, 1 + power_below((uint64_t)ops * 4));
            /* The limit only now: a cut may leave more than it (evictions
             * whose records it lost), and an eviction is no loss. */
            cache_set_limit(cache, LIMIT);
            after_op();
            if (!last && !failed_now)
                workload(ops);
        }
        release_all();
        cache_close(cache);
        cache = NULL;
        if (!last) {
            power_cut_at_end();
            power_on(packs, cut);
        }
    }
    power_clear();
    power_empty_dir(packs);
    power_empty_dir(cut);
    return !failed_now;
}

int main(void)
{
    tracing = getenv("IMGFS_CACHE_POWER_TRACE") && atoi(getenv("IMGFS_CACHE_POWER_TRACE"));
    log_set_level(LOG_LEVEL_ERROR); /* not every damaged chunk nor every torn log */
    make_chunks();

    snprintf(base, sizeof(base), "/tmp/imgfs-test-cache-power-XXXXXX");
    if (!mkdtemp(base)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(cache_dir_path, sizeof(cache_dir_path), "%s/cache", base);
    snprintf(packs, sizeof(packs), "%s/packs", cache_dir_path);
    snprintf(cut, sizeof(cut), "%s/cut", base);
    if (mkdir(cache_dir_path, 0700) != 0 || mkdir(packs, 0700) != 0 || mkdir(cut, 0700) != 0) {
        perror(base);
        return 1;
    }

    real = cache_syscalls;
    cache_syscalls.open = m_open;
    cache_syscalls.pwrite = m_pwrite;
    cache_syscalls.write = m_write;
    cache_syscalls.fallocate = m_fallocate;
    cache_syscalls.ftruncate = m_ftruncate;
    cache_syscalls.fdatasync = m_fdatasync;
    cache_syscalls.unlink = m_unlink;
    cache_syscalls.fsync_dir = m_fsync_dir;

    CHECK(power_run("test_cache_power", "IMGFS_CACHE_POWER_SEED", "IMGFS_CACHE_POWER_ITERATIONS", run_iteration) == 0);
    CHECK(power_errors() == 0);
    printf("cuts: %" PRIu64 " at a system call (%" PRIu64 " of them in an open), %" PRIu64
           " after the workload; hits %" PRIu64 ", fills %" PRIu64 ", durable chunks found after a cut %" PRIu64 "\n",
           power_cuts_inside(), cuts_in_open, power_cuts_after(), hits, fills, durable_checked);
    cache_syscalls = real;
    remove_tree(base);
    return check_summary();
}
