/* Power-loss tests of layer.c: a simulated power cut at a random system
 * call of a random workload, then the layer opened again from what the cut
 * left on "disk" and checked against the promises of layer.h.
 *
 * THE MODEL is power_model.h's, through layer_syscalls, which every
 * change of a layer's file or directory goes through. The directory is the
 * layers' one. The shared pending file of takeovers (layer_share_pending)
 * lives in a tmpfs: a power cut loses it whole, as the test does.
 *
 * THE WORKLOAD: writes of 1 to 32 blocks (layer_write and
 * layer_write_through, from aligned and unaligned buffers, with
 * IMGFS_LAYER_THROUGH=all so that they go with O_DIRECT), overwrites,
 * punches, flushes, compactions (layer_compact, in the test's thread) and
 * reads, then a cut at a random system call (inside a write, a flush
 * between its record and its sync, a punch's give-back, a compaction
 * between its sync, rename and directory sync, an open's cut of the log),
 * or after the last operation. Then the layer is opened from the cut's
 * state and checked: it opens (no repair by anyone); each block whose last
 * write before a completed flush (or punch) was W reads W or a later
 * write; every other block reads one of the values it had since (a write
 * made to it, or what was there before), never other bytes; and what it
 * read is what it reads after any later cut that no write changed. Each
 * iteration runs several epochs of workload, cut and reopen on the same
 * layer (so cuts also hit the open after a cut, and its cut of the log).
 * Zeroing ahead is off (a background thread would make the cut point
 * depend on timing).
 *
 * The seed is printed; IMGFS_POWER_SEED=N replays from N (iteration k
 * runs seed N+k), IMGFS_POWER_ITERATIONS=K runs K iterations. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "layer.h"
#include "power_model.h"
#include "test_files.h"
#include "util.h"

#define BS LAYER_BLOCK_SIZE
#define BLOCKS 160u
#define DISK_SIZE ((uint64_t)BLOCKS * BS)
#define NAME_MAX_LEN 64

/* ---- layer_syscalls through the power model ------------------------------------ */

static struct layer_syscalls real;

static ssize_t m_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    return power_pwrite(real.pwrite, fd, buf, len, off);
}
static ssize_t m_zero_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    return power_pwrite(real.zero_pwrite, fd, buf, len, off);
}
static int m_fdatasync(int fd)
{
    return power_fdatasync(real.fdatasync, fd);
}
static int m_fallocate(int fd, int mode, off_t off, off_t len)
{
    return power_fallocate(real.fallocate, fd, mode, off, len);
}
static int m_ahead_fallocate(int fd, int mode, off_t off, off_t len)
{
    return power_fallocate(real.ahead_fallocate, fd, mode, off, len);
}
static int m_ftruncate(int fd, off_t len)
{
    return power_ftruncate(real.ftruncate, fd, len);
}
static int m_open(const char *path, int flags, mode_t mode)
{
    return power_open(real.open, path, flags, mode);
}
static int m_rename(const char *from, const char *to)
{
    return power_rename(real.rename, from, to);
}
static int m_unlink(const char *path)
{
    return power_unlink(real.unlink, path);
}
static int m_fsync_dir(const char *dir)
{
    return power_fsync_dir(real.fsync_dir, dir);
}

static uint64_t below(uint64_t n)
{
    return power_below(n);
}
static uint64_t blocks_new, blocks_old; /* after a cut: blocks showing a write not flushed, or an older value */


/* ---- the workload and what the layer must show ----------------------------------- */

/* A write's bytes in block b: its tag, the block, then bytes of both. Tag 0
 * ("write 0" in messages) is zeros: never written, or punched. */
static void block_bytes(uint64_t tag, uint64_t b, unsigned char *out)
{
    if (tag == 0) {
        memset(out, 0, BS);
        return;
    }
    uint64_t x = tag * 0x2545f4914f6cdd1dull ^ (b + 1) * 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < BS; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(out + i, &x, 8);
    }
    memcpy(out, &tag, 8);
    memcpy(out + 8, &b, 8);
}

/* Per block: the value a completed flush made durable (or the one read after
 * the last cut), and the values written since, in order. */
struct oracle {
    uint64_t durable[BLOCKS];
    uint64_t *since[BLOCKS];
    size_t nsince[BLOCKS], capsince[BLOCKS];
    uint64_t next_tag;
};

static void oracle_written(struct oracle *o, uint64_t b, uint64_t tag)
{
    if (o->nsince[b] == o->capsince[b]) {
        o->capsince[b] = o->capsince[b] ? 2 * o->capsince[b] : 8;
        o->since[b] = power_xrealloc(o->since[b], o->capsince[b] * sizeof(uint64_t));
    }
    o->since[b][o->nsince[b]++] = tag;
}
static void oracle_flushed(struct oracle *o)
{
    for (uint64_t b = 0; b < BLOCKS; b++) {
        if (o->nsince[b])
            o->durable[b] = o->since[b][o->nsince[b] - 1];
        o->nsince[b] = 0;
    }
}
static uint64_t oracle_latest(const struct oracle *o, uint64_t b)
{
    return o->nsince[b] ? o->since[b][o->nsince[b] - 1] : o->durable[b];
}

static uint64_t iter_seed;
static int epoch;

/* The value block b shows: its tag, or UINT64_MAX for bytes no write made. */
static uint64_t read_tag(struct layer *l, uint64_t b)
{
    static unsigned char buf[BS], want[BS];
    if (!layer_owns(l, b))
        return 0;
    if (layer_read(l, buf, BS, b * BS) != 0)
        return UINT64_MAX;
    uint64_t tag;
    memcpy(&tag, buf, 8);
    for (size_t i = 0; tag == 0 && i < BS; i++)
        if (buf[i])
            tag = UINT64_MAX;
    if (tag == UINT64_MAX)
        return tag;
    block_bytes(tag, b, want);
    return memcmp(buf, want, BS) == 0 ? tag : UINT64_MAX;
}

/* After a cut: every block shows an allowed value, which is then durable. */
static bool check_after_cut(struct layer *l, struct oracle *o)
{
    bool ok = true;
    for (uint64_t b = 0; b < BLOCKS; b++) {
        uint64_t tag = read_tag(l, b);
        bool allowed = tag == o->durable[b];
        for (size_t i = 0; i < o->nsince[b] && !allowed; i++)
            allowed = tag == o->since[b][i];
        if (!allowed) {
            if (ok)
                fprintf(stderr, "seed %" PRIu64 " epoch %d: ", iter_seed, epoch);
            fprintf(stderr,
                    "block %" PRIu64 " reads %s%" PRIu64 ", not the flushed %" PRIu64 " nor one of the %zu written since%s",
                    b, tag == UINT64_MAX ? "bytes of no write " : "write ", tag == UINT64_MAX ? 0 : tag, o->durable[b],
                    o->nsince[b], o->nsince[b] ? " (" : "\n");
            for (size_t i = 0; i < o->nsince[b]; i++)
                fprintf(stderr, "%" PRIu64 "%s", o->since[b][i], i + 1 < o->nsince[b] ? " " : ")\n");
            ok = false;
        }
        if (allowed && o->nsince[b] && tag != o->since[b][o->nsince[b] - 1])
            blocks_old++;
        else if (allowed && o->nsince[b] && tag != o->durable[b])
            blocks_new++;
        o->durable[b] = tag;
        o->nsince[b] = 0;
    }
    return ok;
}

static bool do_write(struct layer *l, struct oracle *o, bool single)
{
    uint64_t b = below(BLOCKS), n = single ? 1 : 1 + below(below(4) == 0 ? 32 : 4);
    if (b + n > BLOCKS)
        n = BLOCKS - b;
    bool through = below(2), aligned = below(2);
    unsigned char *mem = NULL;
    if (posix_memalign((void **)&mem, BS, n * BS + 8) != 0)
        abort();
    unsigned char *p = aligned ? mem : mem + 8;
    uint64_t tag = ++o->next_tag;
    for (uint64_t i = 0; i < n; i++) {
        block_bytes(tag, b + i, p + i * BS);
        oracle_written(o, b + i, tag);
    }
    int rc = through ? layer_write_through(l, p, n * BS, b * BS) : layer_write(l, p, n * BS, b * BS);
    free(mem);
    if (rc)
        fprintf(stderr, "seed %" PRIu64 ": a write failed: %s\n", iter_seed, strerror(-rc));
    return rc == 0;
}

/* One epoch's operations, until the cut. False when one failed. */
static bool workload(struct layer *l, struct oracle *o, int ops)
{
    for (int k = 0; k < ops && !power_cut_done(); k++) {
        uint64_t what = below(100);
        int rc = 0;
        if (what < 45) {
            if (!do_write(l, o, false))
                return false;
        } else if (what < 50) {
            /* A burst of scattered one-block writes: a record of many
             * entries, over several sectors and continuation blocks. */
            for (uint64_t i = 0, n = 8 + below(below(3) == 0 ? 200 : 40); i < n && !power_cut_done(); i++)
                if (!do_write(l, o, true))
                    return false;
        } else if (what < 70) {
            rc = layer_flush(l);
            if (!rc && !power_cut_done())
                oracle_flushed(o);
        } else if (what < 80) {
            uint64_t b = below(BLOCKS), n = 1 + below(16);
            if (b + n > BLOCKS)
                n = BLOCKS - b;
            for (uint64_t i = 0; i < n; i++)
                oracle_written(o, b + i, 0);
            rc = layer_punch(l, b, n);
            if (!rc && !power_cut_done())
                oracle_flushed(o); /* a punch flushes */
        } else if (what < 86) {
            rc = layer_compact(l);
        } else {
            uint64_t b = below(BLOCKS);
            uint64_t tag = read_tag(l, b);
            if (tag != oracle_latest(o, b)) {
                fprintf(stderr, "seed %" PRIu64 ": block %" PRIu64 " reads %" PRIu64 " before any cut, not %" PRIu64 "\n",
                        iter_seed, b, tag, oracle_latest(o, b));
                return false;
            }
        }
        if (rc) {
            fprintf(stderr, "seed %" PRIu64 ": operation %" PRIu64 " failed: %s\n", iter_seed, what, strerror(-rc));
            return false;
        }
    }
    return true;
}

static char dir[PATH_MAX - NAME_MAX_LEN], cut_dir[PATH_MAX - NAME_MAX_LEN], shared_dir[PATH_MAX - NAME_MAX_LEN];

/* The cut's state becomes the layer directory; the shared pending file
 * (a tmpfs's) is gone. */
static void restart(void)
{
    power_on(dir, cut_dir);
    power_empty_dir(shared_dir);
}

#define EPOCHS 4

/* One layer through EPOCHS cuts. */
static bool run_iteration(uint64_t seed)
{
    power_seed(seed);
    iter_seed = seed;
    struct oracle *o = calloc(1, sizeof(*o));
    if (!o)
        abort();
    char id[LAYER_ID_LEN + 1] = "";
    bool ok = true;
    /* Epochs 0 to EPOCHS-1 write and cut; the last one only opens and checks. */
    for (epoch = 0; epoch <= EPOCHS && ok; epoch++) {
        bool last = epoch == EPOCHS;
        int ops = last ? 0 : 4 + (int)below(40);
        /* The cut: before one of the next system calls, or after them. */
        power_arm(dir, cut_dir, last ? 0 : 1 + below((uint64_t)ops * 3));
        struct layer *l = NULL;
        int rc;
        if (epoch == 0) {
            power_set_cut_at(0); /* no cut inside the creation: nothing is promised before it returns */
            rc = layer_create(dir, DISK_SIZE, &l);
            if (!rc)
                snprintf(id, sizeof(id), "%s", layer_id(l));
            power_set_cut_at(power_calls() + 1 + below((uint64_t)ops * 3));
        } else {
            rc = layer_open(dir, id, DISK_SIZE, &l);
        }
        if (rc) {
            fprintf(stderr, "seed %" PRIu64 " epoch %d: the layer does not open: %s\n", seed, epoch, strerror(-rc));
            ok = false;
            break;
        }
        if (epoch > 0 && !power_cut_done())
            ok = check_after_cut(l, o);
        if (ok && !last && !power_cut_done())
            ok = workload(l, o, ops);
        if (!last)
            power_cut_at_end();
        layer_close(l);
        if (!last)
            restart();
    }
    for (uint64_t b = 0; b < BLOCKS; b++)
        free(o->since[b]);
    free(o);
    power_clear();
    power_empty_dir(dir);
    power_empty_dir(cut_dir);
    power_empty_dir(shared_dir);
    return ok;
}

int main(void)
{
    setenv("IMGFS_LAYER_ZERO_AHEAD", "0", 1);
    setenv("IMGFS_LAYER_COMPACT_MIN", "1G", 1); /* compactions only when asked */
    setenv("IMGFS_LAYER_THROUGH", "all", 1);    /* write-through with O_DIRECT, records too */
    log_set_level(LOG_LEVEL_ERROR); /* not every compaction, nor every record a cut tore */

    char base[] = "/tmp/imgfs-test-power-XXXXXX";
    if (!mkdtemp(base)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(dir, sizeof(dir), "%s/layers", base);
    snprintf(cut_dir, sizeof(cut_dir), "%s/cut", base);
    snprintf(shared_dir, sizeof(shared_dir), "%s/shm", base);
    if (mkdir(dir, 0700) != 0 || mkdir(cut_dir, 0700) != 0 || mkdir(shared_dir, 0700) != 0) {
        perror(base);
        return 1;
    }
    layer_share_pending(shared_dir);

    real = layer_syscalls;
    layer_syscalls.pwrite = m_pwrite;
    layer_syscalls.fdatasync = m_fdatasync;
    layer_syscalls.fallocate = m_fallocate;
    layer_syscalls.zero_pwrite = m_zero_pwrite;
    layer_syscalls.ahead_fallocate = m_ahead_fallocate;
    layer_syscalls.ftruncate = m_ftruncate;
    layer_syscalls.open = m_open;
    layer_syscalls.rename = m_rename;
    layer_syscalls.unlink = m_unlink;
    layer_syscalls.fsync_dir = m_fsync_dir;

    CHECK(power_run("test_layer_power", "IMGFS_POWER_SEED", "IMGFS_POWER_ITERATIONS", run_iteration) == 0);
    CHECK(power_errors() == 0);
    printf("cuts: %" PRIu64 " at a system call, %" PRIu64 " after the workload; blocks that showed the last write, "
           "not flushed: %" PRIu64 ", an older value: %" PRIu64 "\n",
           power_cuts_inside(), power_cuts_after(), blocks_new, blocks_old);
    layer_syscalls = real;
    remove_tree(base);
    return check_summary();
}
