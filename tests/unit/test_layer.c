/* Unit tests for layer.c, below the mount: writes, punches, extents and
 * reopening checked against a model of the disk; torn and garbled records;
 * the conversion of an old-format layer; compaction, also with concurrent
 * writers; and crashes (a child process killed with SIGKILL at every write
 * of a flush and of a compaction) and faults (EIO, ENOSPC) injected through
 * layer_syscalls. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "layer.h"
#include "test_files.h"
#include "util.h"

#define BS LAYER_BLOCK_SIZE
#define DISK_SIZE (8ull * 1024 * 1024 + 1234) /* the last block is short */
#define BLOCKS ((DISK_SIZE + BS - 1) / BS)

static char dir[256];

/* The model: what the layer must show. owned[b]: 0 no, 1 data, 2 zero. */
struct model {
    unsigned char *bytes;
    unsigned char *owned;
};

static void model_init(struct model *m)
{
    m->bytes = calloc(1, DISK_SIZE);
    m->owned = calloc(1, BLOCKS);
}
static void model_copy(struct model *dst, const struct model *src)
{
    memcpy(dst->bytes, src->bytes, DISK_SIZE);
    memcpy(dst->owned, src->owned, BLOCKS);
}
static void model_free(struct model *m)
{
    free(m->bytes);
    free(m->owned);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static size_t block_len(uint64_t b, uint64_t count)
{
    uint64_t end = (b + count) * BS < DISK_SIZE ? (b + count) * BS : DISK_SIZE;
    return (size_t)(end - b * BS);
}

/* How write_blocks writes: layer_write_through (as for a guest's O_DIRECT
 * writes) instead of layer_write, and from a 4 KiB-aligned buffer. */
static bool through, aligned;

/* Writes count blocks at b with fresh random bytes, into layer and model
 * (either may be NULL: a replay of what a child process wrote). */
static int write_blocks(struct layer *l, struct model *m, uint64_t b, uint64_t count)
{
    size_t len = block_len(b, count);
    void *mem = NULL;
    if (posix_memalign(&mem, BS, len + 8) != 0)
        return -ENOMEM;
    unsigned char *buf = (unsigned char *)mem + (aligned ? 0 : 8);
    for (size_t i = 0; i < len; i++)
        buf[i] = (unsigned char)next_rand();
    int rc = !l ? 0 : through ? layer_write_through(l, buf, len, b * BS) : layer_write(l, buf, len, b * BS);
    if (rc == 0 && m) {
        memcpy(m->bytes + b * BS, buf, len);
        memset(m->owned + b, 1, count);
    }
    free(mem);
    return rc;
}

/* Random blocks [*b, *b + *n) with *b below max_b and 1 <= *n <= max_n,
 * inside the disk (in this order, so that a replay gets the same). */
static void rand_range(uint64_t max_b, uint64_t max_n, uint64_t *b, uint64_t *n)
{
    *b = next_rand() % max_b;
    *n = 1 + next_rand() % max_n;
    if (*b + *n > BLOCKS)
        *n = BLOCKS - *b;
}

static int write_random(struct layer *l, struct model *m, uint64_t max_b, uint64_t max_n)
{
    uint64_t b, n;
    rand_range(max_b, max_n, &b, &n);
    return write_blocks(l, m, b, n);
}

static int punch_blocks(struct layer *l, struct model *m, uint64_t b, uint64_t count)
{
    int rc = layer_punch(l, b, count);
    if (rc == 0 && m) {
        memset(m->bytes + b * BS, 0, block_len(b, count));
        memset(m->owned + b, 2, count);
    }
    return rc;
}

/* True when the layer shows exactly the model, through reads and extents. */
static bool matches(struct layer *l, const struct model *m)
{
    unsigned char *buf = malloc(BS);
    bool ok = true;
    for (uint64_t b = 0; b < BLOCKS && ok; b++) {
        ok = layer_owns(l, b) == (m->owned[b] != 0);
        if (ok && m->owned[b]) {
            size_t len = block_len(b, 1);
            ok = layer_read(l, buf, len, b * BS) == 0 && memcmp(buf, m->bytes + b * BS, len) == 0;
        }
        if (!ok)
            fprintf(stderr, "block %" PRIu64 " differs (model: %d)\n", b, m->owned[b]);
    }
    /* Extents agree with the kinds, and cover the disk exactly. */
    for (uint64_t off = 0; off < DISK_SIZE && ok;) {
        struct layer_extent e;
        ok = layer_extent_at(l, off, DISK_SIZE, &e) == 0 && e.len > 0;
        for (uint64_t b = off / BS; ok && b * BS < off + e.len; b++)
            ok = (int)e.kind == (m->owned[b] == 0 ? LAYER_EXTENT_UNOWNED
                                 : m->owned[b] == 1 ? LAYER_EXTENT_DATA
                                                    : LAYER_EXTENT_ZERO);
        off += ok ? e.len : 0;
        layer_extent_release(l, &e);
    }
    free(buf);
    return ok;
}

static char *log_path(const char *id)
{
    static char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/%s.log", dir, id);
    return path;
}

static struct layer *reopen(struct layer *l)
{
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(l));
    layer_close(l);
    struct layer *again = NULL;
    int rc = layer_open(dir, id, DISK_SIZE, &again);
    CHECK(rc == 0);
    return again;
}

/* Closes a layer and removes its files. */
static void close_and_remove(struct layer *l)
{
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(l));
    layer_close(l);
    layer_remove(dir, id);
}

/* ---- the basics ------------------------------------------------------------------ */

static void test_basics(void)
{
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    struct model m;
    model_init(&m);
    CHECK(matches(l, &m));
    CHECK(write_blocks(l, &m, 0, 1) == 0);
    CHECK(write_blocks(l, &m, 10, 300) == 0);  /* more than one record's worth of blocks */
    CHECK(write_blocks(l, &m, BLOCKS - 1, 1) == 0); /* the short last block */
    CHECK(punch_blocks(l, &m, 100, 50) == 0);
    CHECK(write_blocks(l, &m, 120, 2) == 0); /* data inside the punched range */
    CHECK(layer_write(l, "x", 1, 5) == -EINVAL); /* not whole blocks */
    CHECK(layer_read(l, m.bytes, BS, 5 * BS) == -EINVAL); /* not owned */
    CHECK(matches(l, &m));
    CHECK(layer_owned_blocks(l) == 1 + 300 + 1);
    /* Unflushed writes are not promised; flushed ones come back. */
    CHECK(layer_flush(l) == 0);
    l = reopen(l);
    CHECK(l && matches(l, &m));
    /* Many small flushes, then reopen. */
    for (int i = 0; i < 200; i++) {
        CHECK(write_random(l, &m, BLOCKS, 1) == 0);
        if (i % 7 == 0)
            CHECK(layer_flush(l) == 0);
    }
    CHECK(layer_flush(l) == 0);
    l = reopen(l);
    CHECK(l && matches(l, &m));
    /* A punch of the whole disk costs no index nodes and reads as zeros. */
    CHECK(punch_blocks(l, &m, 0, BLOCKS) == 0);
    CHECK(layer_flush(l) == 0);
    CHECK(matches(l, &m));
    l = reopen(l);
    CHECK(l && matches(l, &m));
    CHECK(layer_owned_blocks(l) == BLOCKS);
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(l));
    layer_close(l);
    CHECK(layer_remove(dir, id) == 0);
    CHECK(access(log_path(id), F_OK) != 0);
    model_free(&m);
}

/* ---- torn records ---------------------------------------------------------------- */

/* Where the second record goes: the block that the first record (block 1)
 * names as the next (layer.h), in bytes. Not the file's size: blocks past
 * the tail may be zeroed ahead. */
static off_t next_record_after_first(const char *id)
{
    int fd = open(log_path(id), O_RDONLY);
    uint8_t next[8] = {0};
    CHECK(fd >= 0 && pread(fd, next, sizeof(next), BS + 24) == (ssize_t)sizeof(next));
    if (fd >= 0)
        close(fd);
    uint64_t block = 0;
    for (int i = 7; i >= 0; i--)
        block = block << 8 | next[i];
    return (off_t)(block * BS);
}

/* A layer with two flushes; returns the model after the first, and where
 * the second record starts. */
static struct layer *two_flushes(struct model *first, struct model *second, off_t *first_end)
{
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    model_init(first);
    model_init(second);
    for (int i = 0; i < 20; i++)
        CHECK(write_random(l, first, BLOCKS, 4) == 0);
    CHECK(layer_flush(l) == 0);
    *first_end = next_record_after_first(layer_id(l));
    model_copy(second, first);
    for (int i = 0; i < 20; i++)
        CHECK(write_random(l, second, BLOCKS, 4) == 0);
    CHECK(punch_blocks(l, second, 3, 2) == 0);
    CHECK(layer_flush(l) == 0);
    return l;
}

/* Flips bits of one byte of a layer's log. */
static void flip_byte(const char *id, off_t at, unsigned char bits)
{
    int fd = open(log_path(id), O_RDWR);
    unsigned char byte = 0;
    CHECK(fd >= 0 && pread(fd, &byte, 1, at) == 1);
    byte ^= bits;
    CHECK(pwrite(fd, &byte, 1, at) == 1);
    close(fd);
}

enum damage { FLIP_RECORD, TRUNCATE_RECORD, FLIP_DATA, NO_DAMAGE };

/* Two flushes, the second one damaged as asked: the layer must open at the
 * first flush (or at the second when undamaged), and go on from there. */
static void check_torn(enum damage damage)
{
    struct model first, second;
    off_t first_end;
    struct layer *l = two_flushes(&first, &second, &first_end);
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(l));
    layer_close(l);
    /* The second record is at the block the first flush reserved for it:
     * the file's end after the first flush; its data follows it. */
    if (damage == FLIP_RECORD)
        flip_byte(id, first_end + 10, 0x40); /* its sequence number */
    else if (damage == TRUNCATE_RECORD)
        CHECK(truncate(log_path(id), first_end + 40) == 0);
    else if (damage == FLIP_DATA)
        flip_byte(id, first_end + BS + 10, 1); /* the whole record is dropped: that flush never returned */
    struct model *want = damage == NO_DAMAGE ? &second : &first;
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    CHECK(l && matches(l, want));
    CHECK(write_blocks(l, want, 7, 3) == 0);
    CHECK(layer_flush(l) == 0);
    l = reopen(l);
    CHECK(l && matches(l, want));
    layer_close(l);
    layer_remove(dir, id);
    model_free(&first);
    model_free(&second);
}

static void test_torn_record(void)
{
    check_torn(FLIP_RECORD);
    check_torn(TRUNCATE_RECORD);
    check_torn(FLIP_DATA);
    check_torn(NO_DAMAGE);
    /* A bad header is refused, not repaired. */
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(l));
    layer_close(l);
    struct layer *none = NULL;
    CHECK(layer_open(dir, id, DISK_SIZE + BS, &none) == -EBADMSG);
    layer_remove(dir, id);
}

/* ---- the old format -------------------------------------------------------------- */

static void write_old_layer(const char *id, struct model *m)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/%s.data", dir, id);
    int data = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(data >= 0 && ftruncate(data, DISK_SIZE) == 0);
    snprintf(path, sizeof(path), "%s/%s.map", dir, id);
    int map = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    size_t map_len = 64 + (BLOCKS / 64 + 1) * 8 + 4096;
    unsigned char *buf = calloc(1, map_len);
    snprintf((char *)buf, 64, "imgfs-layer-map 1\n%" PRIu64 "\n", (uint64_t)DISK_SIZE);
    model_init(m);
    for (int i = 0; i < 40; i++) {
        uint64_t b = next_rand() % BLOCKS, n = 1 + next_rand() % 8;
        if (b + n > BLOCKS)
            n = BLOCKS - b;
        bool zero = i % 5 == 0; /* owned and a hole: a discarded range */
        for (uint64_t k = b; k < b + n; k++) {
            size_t len = block_len(k, 1);
            for (size_t j = 0; j < len; j++)
                m->bytes[k * BS + j] = zero ? 0 : (unsigned char)next_rand();
            m->owned[k] = zero ? 2 : 1;
            buf[64 + k / 8] |= (unsigned char)(1u << (k % 8));
        }
        if (zero)
            CHECK(fallocate(data, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(b * BS), (off_t)(n * BS)) == 0);
        else
            CHECK(pwrite(data, m->bytes + b * BS, block_len(b, n), (off_t)(b * BS)) == (ssize_t)block_len(b, n));
    }
    CHECK(pwrite(map, buf, map_len, 0) == (ssize_t)map_len);
    close(data);
    close(map);
    free(buf);
}

static void test_convert_old(void)
{
    const char *id = "00000000000000aa";
    struct model m;
    write_old_layer(id, &m);
    /* A conversion that crashed before its rename left a partial .log.tmp. */
    char tmp[PATH_MAX], path[PATH_MAX];
    snprintf(tmp, sizeof(tmp), "%s/%s.log.tmp", dir, id);
    int fd = open(tmp, O_RDWR | O_CREAT, 0600);
    CHECK(fd >= 0 && write(fd, "partial", 7) == 7);
    close(fd);
    struct layer *l = NULL;
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    CHECK(l && matches(l, &m));
    snprintf(path, sizeof(path), "%s/%s.map", dir, id);
    CHECK(access(path, F_OK) != 0);
    snprintf(path, sizeof(path), "%s/%s.data", dir, id);
    CHECK(access(path, F_OK) != 0);
    CHECK(access(tmp, F_OK) != 0);
    CHECK(access(log_path(id), F_OK) == 0);
    /* The converted layer takes writes and reopens like any other. */
    CHECK(write_blocks(l, &m, 5, 5) == 0);
    CHECK(layer_flush(l) == 0);
    l = reopen(l);
    CHECK(l && matches(l, &m));
    layer_close(l);
    layer_remove(dir, id);
    model_free(&m);

    /* A conversion that renamed but did not remove the old files yet. */
    write_old_layer(id, &m);
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    layer_close(l);
    struct model ignored;
    write_old_layer(id, &ignored); /* different old files reappear */
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    CHECK(l && matches(l, &m)); /* the log wins */
    CHECK(access(path, F_OK) != 0);
    layer_close(l);
    layer_remove(dir, id);
    model_free(&m);
    model_free(&ignored);
}

/* ---- compaction ------------------------------------------------------------------ */

static void test_compaction(void)
{
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    struct model m;
    model_init(&m);
    for (int round = 0; round < 10; round++) {
        for (uint64_t b = 0; b < 64; b += 4)
            CHECK(write_blocks(l, &m, b, 4) == 0);
        CHECK(layer_flush(l) == 0);
    }
    CHECK(punch_blocks(l, &m, 8, 8) == 0);
    CHECK(write_blocks(l, &m, 1000, 1) == 0); /* unflushed, still kept */
    struct layer_stats before, after;
    layer_stats(l, &before);
    CHECK(layer_compact(l) == 0);
    layer_stats(l, &after);
    CHECK(after.compactions == before.compactions + 1);
    CHECK(after.log_blocks < before.log_blocks / 4);
    CHECK(after.data_blocks == before.data_blocks);
    CHECK(matches(l, &m));
    CHECK(write_blocks(l, &m, 30, 2) == 0);
    CHECK(layer_flush(l) == 0);
    l = reopen(l);
    CHECK(l && matches(l, &m));
    close_and_remove(l);
    model_free(&m);
}

/* Writers on disjoint ranges while compactions run. */
struct writer {
    struct layer *layer;
    uint64_t first;
    unsigned char *expect; /* the writer's blocks, as last written */
    int rc;
};

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    uint64_t seed = w->first * 7919 + 1;
    unsigned char buf[BS];
    for (int i = 0; i < 3000 && !w->rc; i++) {
        uint64_t b = seed % 64;
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        memset(buf, (int)(seed >> 56), BS);
        /* Half the writers write through (with O_DIRECT where the blocks
         * are zeroed ahead), and read each write back at once. */
        bool thru = w->first / 256 % 2;
        uint64_t off = (w->first + b) * BS;
        w->rc = thru ? layer_write_through(w->layer, buf, BS, off) : layer_write(w->layer, buf, BS, off);
        memcpy(w->expect + b * BS, buf, BS);
        unsigned char back[BS];
        if (!w->rc && thru)
            w->rc = layer_read(w->layer, back, BS, off) ? -EIO : memcmp(back, buf, BS) ? -EILSEQ : 0;
        if (i % 100 == 0 && !w->rc)
            w->rc = layer_flush(w->layer);
    }
    return NULL;
}

static void test_parallel_compaction(void)
{
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    struct writer w[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (struct writer){l, (uint64_t)i * 256, calloc(64, BS), 0};
        pthread_create(&t[i], NULL, writer_main, &w[i]);
    }
    int compactions = 0;
    for (int i = 0; i < 20; i++)
        compactions += layer_compact(l) == 0;
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    CHECK(compactions == 20);
    CHECK(layer_flush(l) == 0);
    for (int pass = 0; pass < 2; pass++) {
        unsigned char buf[BS];
        for (int i = 0; i < 4; i++) {
            CHECK(w[i].rc == 0);
            for (uint64_t b = 0; b < 64; b++) {
                if (!layer_owns(l, w[i].first + b))
                    continue;
                CHECK(layer_read(l, buf, BS, (w[i].first + b) * BS) == 0);
                CHECK(memcmp(buf, w[i].expect + b * BS, BS) == 0);
            }
        }
        l = reopen(l);
        CHECK(l != NULL);
    }
    close_and_remove(l);
    for (int i = 0; i < 4; i++)
        free(w[i].expect);
}

/* ---- write-through --------------------------------------------------------------- */

/* True when files in dir can be opened with O_DIRECT (not on every tmpfs). */
static bool dir_has_o_direct(void)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/direct-probe", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_DIRECT, 0600);
    if (fd >= 0)
        close(fd);
    unlink(path);
    return fd >= 0;
}

/* Write i of a mix: two in three through, half from unaligned buffers,
 * over any blocks (the short last one too); read back at once. */
static int write_read_back(struct layer *l, struct model *m, int i)
{
    through = i % 3 != 0;
    aligned = i % 2 == 0;
    uint64_t b, n;
    rand_range(BLOCKS, 6, &b, &n);
    int rc = write_blocks(l, m, b, n);
    size_t len = block_len(b, n);
    unsigned char *back = malloc(len);
    if (!rc)
        rc = layer_read(l, back, len, b * BS);
    if (!rc && memcmp(back, m->bytes + b * BS, len) != 0)
        rc = -EILSEQ;
    free(back);
    through = aligned = false;
    return rc;
}

/* Writes through mixed with page-cache writes of the same blocks, each read
 * back at once: first into the blocks that the background thread zeroed
 * ahead (their zeros are in the page cache when the O_DIRECT write lands on
 * them), then with IMGFS_LAYER_THROUGH=all past them; flushes, a compaction
 * and reopens in between. */
static void test_write_through(void)
{
    bool direct = dir_has_o_direct();
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    struct model m;
    model_init(&m);
    struct layer_stats st = {0};
    /* Small flushes start the zeroing; the bound only ends a failing run. */
    for (int i = 0; i < 20000 && st.through_blocks < 300; i++) {
        CHECK(write_read_back(l, &m, i) == 0);
        if (i % 8 == 0)
            CHECK(layer_flush(l) == 0);
        layer_stats(l, &st);
        if (!direct && i == 500)
            break; /* a file system without O_DIRECT: only the fallback */
    }
    if (direct) {
        CHECK(st.through_blocks >= 300);
    } else {
        CHECK(st.through_blocks == 0);
        printf("write-through: %s has no O_DIRECT, only the fallback was tested\n", dir);
    }
    CHECK(matches(l, &m));
    CHECK(layer_flush(l) == 0);
    l = reopen(l);
    CHECK(l && matches(l, &m));
    setenv("IMGFS_LAYER_THROUGH", "all", 1);
    l = reopen(l);
    for (int i = 0; i < 300; i++) {
        CHECK(write_read_back(l, &m, i) == 0);
        if (i % 10 == 0)
            CHECK(layer_flush(l) == 0);
        if (i == 150) {
            CHECK(layer_compact(l) == 0);
            CHECK(matches(l, &m));
        }
    }
    layer_stats(l, &st);
    CHECK(!direct || st.through_blocks > 100); /* counted since this open */
    CHECK(matches(l, &m));
    CHECK(layer_flush(l) == 0);
    unsetenv("IMGFS_LAYER_THROUGH");
    l = reopen(l);
    CHECK(l && matches(l, &m));
    close_and_remove(l);
    model_free(&m);
}

static int (*real_fdatasync_saved)(int fd);
static ssize_t (*real_pwrite_saved)(int fd, const void *buf, size_t len, off_t off);
static int (*real_fallocate_saved)(int fd, int mode, off_t off, off_t len);

/* Page-cache and O_DIRECT writes of one log never run at the same time: an
 * O_DIRECT write drops the cached pages of its range when it is done, and a
 * page-cache write (a record, a guest's buffered write) into the same large
 * folio meanwhile would keep that folio, with the old bytes of the block
 * written through, for every later read. The hook holds each write a little,
 * so that writes of both kinds would overlap if they could. */
static _Atomic int writes_under_way[2]; /* [1]: O_DIRECT */
static _Atomic bool kinds_overlapped;
static ssize_t kind_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    int flags = fcntl(fd, F_GETFL);
    int direct = flags >= 0 && (flags & O_DIRECT) ? 1 : 0;
    atomic_fetch_add(&writes_under_way[direct], 1);
    if (atomic_load(&writes_under_way[!direct]) > 0)
        atomic_store(&kinds_overlapped, true);
    usleep(100);
    ssize_t n = pwrite(fd, buf, len, off);
    atomic_fetch_sub(&writes_under_way[direct], 1);
    return n;
}

struct kind_writer {
    struct layer *layer;
    uint64_t first; /* its 64 blocks */
    bool through;
    int rc;
};

static void *kind_writer_main(void *arg)
{
    struct kind_writer *w = arg;
    unsigned char *buf;
    if (posix_memalign((void **)&buf, BS, BS) != 0) {
        w->rc = -ENOMEM;
        return NULL;
    }
    for (int i = 0; i < 300 && !w->rc; i++) {
        memset(buf, i, BS);
        uint64_t off = (w->first + (uint64_t)i % 64) * BS;
        w->rc = w->through ? layer_write_through(w->layer, buf, BS, off) : layer_write(w->layer, buf, BS, off);
        if (!w->rc && i % 16 == 0)
            w->rc = layer_flush(w->layer);
    }
    free(buf);
    return NULL;
}

static void test_write_kinds_apart(void)
{
    if (!dir_has_o_direct()) {
        printf("write kinds: %s has no O_DIRECT, not tested\n", dir);
        return;
    }
    setenv("IMGFS_LAYER_THROUGH", "all", 1);
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    layer_syscalls.pwrite = kind_pwrite;
    struct kind_writer w[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (struct kind_writer){l, (uint64_t)i * 64, i % 2 == 0, 0};
        pthread_create(&t[i], NULL, kind_writer_main, &w[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CHECK(w[i].rc == 0);
    }
    layer_syscalls.pwrite = real_pwrite_saved;
    struct layer_stats st;
    layer_stats(l, &st);
    CHECK(st.through_blocks > 0);
    CHECK(!atomic_load(&kinds_overlapped));
    unsigned char buf[BS];
    for (int i = 0; i < 4; i++) {
        CHECK(layer_read(l, buf, BS, (w[i].first + 299 % 64) * BS) == 0);
        CHECK(buf[0] == 299 % 256 && buf[BS - 1] == 299 % 256);
    }
    CHECK(layer_flush(l) == 0);
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(l));
    layer_close(l);
    layer_remove(dir, id);
    unsetenv("IMGFS_LAYER_THROUGH");
}

/* ---- a flush does not wait for the writes under way ------------------------- */

/* The hook holds the write of a block whose bytes start with HELD_BYTE
 * (once armed) until the test lets it go. */
#define HELD_BYTE 0xb7
static pthread_mutex_t held_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t held_cv;
static bool hold_armed, hold_in, hold_release; /* guarded by held_mu */

static ssize_t holding_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    if (len == BS && ((const unsigned char *)buf)[0] == HELD_BYTE) {
        pthread_mutex_lock(&held_mu);
        if (hold_armed) {
            hold_armed = false;
            hold_in = true;
            pthread_cond_broadcast(&held_cv);
            /* The bound only keeps a failing run from hanging. */
            uint64_t deadline = now_ns() + 30000000000ull;
            while (!hold_release && cond_wait_until(&held_cv, &held_mu, deadline) == 0)
                ;
            hold_in = false;
        }
        pthread_mutex_unlock(&held_mu);
    }
    return pwrite(fd, buf, len, off);
}

struct held_op {
    struct layer *layer;
    bool through, flush; /* a write of block 1, or a flush */
    _Atomic bool done;
    int rc;
};

static void *held_op_main(void *arg)
{
    struct held_op *op = arg;
    if (op->flush) {
        op->rc = layer_flush(op->layer);
    } else {
        unsigned char *buf;
        CHECK(posix_memalign((void **)&buf, BS, BS) == 0);
        memset(buf, HELD_BYTE, BS);
        op->rc = op->through ? layer_write_through(op->layer, buf, BS, BS) : layer_write(op->layer, buf, BS, BS);
        free(buf);
    }
    pthread_mutex_lock(&held_mu);
    atomic_store(&op->done, true);
    pthread_cond_broadcast(&held_cv);
    pthread_mutex_unlock(&held_mu);
    return NULL;
}

/* Waits (bounded, so that a failing run ends) until *flag or op->done. */
static void held_wait(bool *flag, struct held_op *op)
{
    uint64_t deadline = now_ns() + 30000000000ull;
    pthread_mutex_lock(&held_mu);
    while (!(flag ? *flag : atomic_load(&op->done)) && cond_wait_until(&held_cv, &held_mu, deadline) == 0)
        ;
    pthread_mutex_unlock(&held_mu);
}

/* Writes block 1 and, while that write is under way (held in its pwrite),
 * flushes: the flush must return before the write does. */
static void flush_over_held_write(struct layer *l, bool through_write)
{
    pthread_mutex_lock(&held_mu);
    hold_armed = true;
    hold_release = false;
    pthread_mutex_unlock(&held_mu);
    struct held_op writer = {.layer = l, .through = through_write}, flusher = {.layer = l, .flush = true};
    pthread_t tw, tf;
    pthread_create(&tw, NULL, held_op_main, &writer);
    held_wait(&hold_in, NULL);
    CHECK(hold_in);
    pthread_create(&tf, NULL, held_op_main, &flusher);
    held_wait(NULL, &flusher);
    CHECK(atomic_load(&flusher.done)); /* it did not wait for the write */
    CHECK(!atomic_load(&writer.done));
    pthread_mutex_lock(&held_mu);
    hold_release = true;
    pthread_cond_broadcast(&held_cv);
    pthread_mutex_unlock(&held_mu);
    pthread_join(tw, NULL);
    pthread_join(tf, NULL);
    CHECK(writer.rc == 0 && flusher.rc == 0);
}

static bool block_is(struct layer *l, uint64_t b, unsigned char byte)
{
    unsigned char buf[BS];
    return layer_owns(l, b) && layer_read(l, buf, BS, b * BS) == 0 && buf[0] == byte && buf[BS - 1] == byte;
}

/* A write that was under way while a flush wrote its record goes in a later
 * record: the flush keeps what returned before it, a crash before the next
 * flush loses only that write, and a punch of it (its data below that
 * record, its entry in the punch's record) frees nothing that the punch's
 * record needs at open. */
static void test_flush_passes_writes_under_way(bool through_writes)
{
    if (through_writes && !dir_has_o_direct()) {
        printf("flush over a write under way: %s has no O_DIRECT, through writes not tested\n", dir);
        return;
    }
    if (through_writes)
        setenv("IMGFS_LAYER_THROUGH", "all", 1); /* records with O_DIRECT too */
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    layer_syscalls.pwrite = holding_pwrite;
    unsigned char *buf;
    CHECK(posix_memalign((void **)&buf, BS, BS) == 0);
    memset(buf, 0x11, BS);
    CHECK((through_writes ? layer_write_through(l, buf, BS, 0) : layer_write(l, buf, BS, 0)) == 0);
    flush_over_held_write(l, through_writes);
    l = reopen(l); /* a crash before the next flush */
    CHECK(block_is(l, 0, 0x11));
    CHECK(!layer_owns(l, 1));

    memset(buf, 0x22, BS);
    CHECK((through_writes ? layer_write_through(l, buf, BS, 2 * BS) : layer_write(l, buf, BS, 2 * BS)) == 0);
    flush_over_held_write(l, through_writes);
    CHECK(block_is(l, 1, HELD_BYTE));
    CHECK(layer_punch(l, 1, 1) == 0);
    l = reopen(l);
    CHECK(block_is(l, 0, 0x11) && block_is(l, 2, 0x22));
    unsigned char zeros[BS] = {0}, got[BS];
    CHECK(layer_owns(l, 1) && layer_read(l, got, BS, BS) == 0 && memcmp(got, zeros, BS) == 0);
    layer_syscalls.pwrite = real_pwrite_saved;
    free(buf);
    close_and_remove(l);
    unsetenv("IMGFS_LAYER_THROUGH");
}

/* ---- a punch beside a flush whose record fails -------------------------------- */

/* The hook holds the first record write (once armed) until the test lets it
 * go, and then fails it with ENOSPC. */
static bool record_hold_armed, record_held, record_release; /* guarded by held_mu */

static ssize_t failing_record_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    const unsigned char *p = buf;
    if (len == BS && p[0] == 0x72 && p[1] == 0x45 && p[2] == 0x43 && p[3] == 0x31) { /* "rEC1" */
        pthread_mutex_lock(&held_mu);
        bool hold = record_hold_armed;
        if (hold) {
            record_hold_armed = false;
            record_held = true;
            pthread_cond_broadcast(&held_cv);
            uint64_t deadline = now_ns() + 30000000000ull; /* only so that a failing run ends */
            while (!record_release && cond_wait_until(&held_cv, &held_mu, deadline) == 0)
                ;
        }
        pthread_mutex_unlock(&held_mu);
        if (hold) {
            errno = ENOSPC;
            return -1;
        }
    }
    return real_pwrite_saved(fd, buf, len, off);
}

struct punch_op {
    struct layer *layer;
    uint64_t block;
    int rc;
};

static void *punch_op_main(void *arg)
{
    struct punch_op *op = arg;
    op->rc = layer_punch(op->layer, op->block, 1);
    return NULL;
}

/* A flush takes the pending entries and its record write fails, so they go
 * back and the next flush records them; a punch that came in between must
 * not give their data back to the file system, since they are then in the
 * last record, whose data open checks: else open drops that whole record,
 * with the punch and the writes it returned for. */
static void test_punch_beside_failed_flush(void)
{
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    unsigned char buf[BS];
    memset(buf, 0x55, BS);
    CHECK(layer_write(l, buf, BS, 5 * BS) == 0);
    memset(buf, 0x66, BS);
    CHECK(layer_write(l, buf, BS, 6 * BS) == 0);
    pthread_mutex_lock(&held_mu);
    record_hold_armed = true;
    record_held = record_release = false;
    pthread_mutex_unlock(&held_mu);
    layer_syscalls.pwrite = failing_record_pwrite;
    struct held_op flusher = {.layer = l, .flush = true};
    pthread_t tf, tp;
    pthread_create(&tf, NULL, held_op_main, &flusher);
    held_wait(&record_held, NULL);
    CHECK(record_held);
    /* The punch marks block 5 zero (and notes its dead data) under the
     * layer's lock, then waits for the flush held above. */
    struct punch_op puncher = {.layer = l, .block = 5};
    pthread_create(&tp, NULL, punch_op_main, &puncher);
    unsigned char zeros[BS] = {0}, got[BS];
    for (uint64_t until = now_ns() + 30000000000ull; now_ns() < until; usleep(1000))
        if (layer_read(l, got, BS, 5 * BS) == 0 && memcmp(got, zeros, BS) == 0)
            break;
    CHECK(memcmp(got, zeros, BS) == 0);
    pthread_mutex_lock(&held_mu);
    record_release = true;
    pthread_cond_broadcast(&held_cv);
    pthread_mutex_unlock(&held_mu);
    pthread_join(tf, NULL);
    pthread_join(tp, NULL);
    layer_syscalls.pwrite = real_pwrite_saved;
    CHECK(flusher.rc == -ENOSPC);
    CHECK(puncher.rc == 0); /* its flush recorded the writes and the punch */
    l = reopen(l);
    CHECK(block_is(l, 6, 0x66));
    CHECK(layer_owns(l, 5) && layer_read(l, got, BS, 5 * BS) == 0 && memcmp(got, zeros, BS) == 0);
    close_and_remove(l);
}

/* ---- crashes and faults ------------------------------------------------------- */

static int kill_at = -1; /* SIGKILL the process at this pwrite (counting from 0) */
static int fail_errno;   /* or fail it with this errno */
static int pwrites;
static bool fail_sync;

static ssize_t hooked_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    if (pwrites++ == kill_at) {
        if (fail_errno) {
            errno = fail_errno;
            return -1;
        }
        /* Half of this write reaches the file: a torn write, then death. */
        if (len > 1 && pwrite(fd, buf, len / 2, off) < 0)
            _exit(3);
        kill(getpid(), SIGKILL);
    }
    return pwrite(fd, buf, len, off);
}

/* The compaction's syncs of the file it builds (ID.log.new): held until a
 * writer thread has completed a write issued after the sync began (a test
 * that compaction's syncs do not hold writes), or a SIGKILL at the n-th. */
static bool hold_new_syncs;
static int kill_at_new_sync;
static int new_syncs, new_syncs_written, new_syncs_stalled; /* guarded by sync_mu */
static pthread_mutex_t sync_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sync_cv;

static bool is_new_log(int fd)
{
    char link[64], target[PATH_MAX];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof(target) - 1);
    if (n < 0)
        return false;
    target[n] = 0;
    return n > 8 && strcmp(target + n - 8, ".log.new") == 0;
}

static int hooked_fdatasync(int fd)
{
    if (fail_sync) {
        errno = EIO;
        return -1;
    }
    if ((hold_new_syncs || kill_at_new_sync) && is_new_log(fd)) {
        pthread_mutex_lock(&sync_mu);
        int mine = ++new_syncs;
        if (mine == kill_at_new_sync)
            kill(getpid(), SIGKILL);
        pthread_cond_broadcast(&sync_cv);
        /* The bound only keeps a failing run from hanging: a held write
         * never completes here, however long this waits. */
        uint64_t deadline = now_ns() + 10000000000ull;
        while (hold_new_syncs && new_syncs_written < mine && cond_wait_until(&sync_cv, &sync_mu, deadline) == 0)
            ;
        if (hold_new_syncs && new_syncs_written < mine)
            new_syncs_stalled++;
        pthread_mutex_unlock(&sync_mu);
    }
    return fdatasync(fd);
}

/* In a child: a flushed state, then more writes and a flush or compaction,
 * killed at pwrite number k of that second part. The parent checks that the
 * layer opens and shows, per block, the flushed state or the new one. */
static int crash_child(const char *id, int k, bool compaction, uint64_t seed)
{
    pid_t pid = fork();
    if (pid == 0) {
        rng = seed;
        struct layer *l;
        if (layer_open(dir, id, DISK_SIZE, &l) != 0)
            _exit(2);
        pwrites = 0;
        kill_at = k;
        for (int i = 0; i < 30; i++)
            write_random(l, NULL, 128, 3);
        if (compaction)
            layer_compact(l);
        else
            layer_flush(l);
        _exit(0); /* k was past the last write */
    }
    int status;
    waitpid(pid, &status, 0);
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL ? 1 : WIFEXITED(status) ? -WEXITSTATUS(status) : -9;
}

static void test_crashes(bool compaction)
{
    layer_syscalls.pwrite = hooked_pwrite;
    const char *id = compaction ? "00000000000000cc" : "00000000000000fc";
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    char created[LAYER_ID_LEN + 1];
    snprintf(created, sizeof(created), "%s", layer_id(l));
    layer_close(l);
    char from[PATH_MAX];
    snprintf(from, sizeof(from), "%s", log_path(created));
    CHECK(rename(from, log_path(id)) == 0);
    struct model flushed, maybe;
    model_init(&flushed);
    model_init(&maybe);
    int kills = 0;
    for (int k = 0; k < 400; k++) {
        /* The flushed state: reopen, overwrite the same blocks, flush. */
        CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
        if (!l)
            break;
        for (int i = 0; i < 40; i++)
            CHECK(write_random(l, &flushed, 128, 3) == 0);
        CHECK(layer_flush(l) == 0);
        CHECK(matches(l, &flushed));
        layer_close(l);
        /* The child writes what the model "maybe" gets, replaying its seed. */
        uint64_t seed = next_rand();
        model_copy(&maybe, &flushed);
        uint64_t saved = rng;
        rng = seed;
        for (int i = 0; i < 30; i++) {
            uint64_t b, n;
            rand_range(128, 3, &b, &n);
            for (uint64_t x = b; x < b + n; x++)
                for (size_t j = 0; j < BS; j++)
                    maybe.bytes[x * BS + j] = (unsigned char)next_rand();
            memset(maybe.owned + b, 1, n);
        }
        rng = saved;
        int r = crash_child(id, k, compaction, seed);
        CHECK(r >= 0);
        if (r == 0)
            break; /* k passed every write: all steps were covered */
        kills++;
        /* Every block shows its flushed bytes or its new ones, nothing else. */
        CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
        if (!l)
            break;
        unsigned char buf[BS];
        for (uint64_t b = 0; b < 128 + 3; b++) { /* rand_range(128, 3) reaches block 130 */
            bool owned = layer_owns(l, b);
            CHECK(owned || !flushed.owned[b]);
            if (!owned)
                continue;
            CHECK(layer_read(l, buf, BS, b * BS) == 0);
            bool old = flushed.owned[b] && memcmp(buf, flushed.bytes + b * BS, BS) == 0;
            bool new = memcmp(buf, maybe.bytes + b * BS, BS) == 0;
            CHECK(old || new);
            memcpy(flushed.bytes + b * BS, buf, BS); /* what is there now is the state */
            flushed.owned[b] = 1;
        }
        CHECK(matches(l, &flushed));
        layer_close(l);
    }
    CHECK(kills > 2);
    printf("%s%s: killed at %d different writes\n", compaction ? "compaction" : "flush",
           through ? " (written through)" : "", kills);
    layer_syscalls.pwrite = hooked_pwrite;
    kill_at = -1;
    layer_remove(dir, id);
    model_free(&flushed);
    model_free(&maybe);
}

/* ---- compaction does not hold writes while it syncs --------------------------- */

struct sync_writer {
    struct layer *layer;
    struct model *model;
    bool stop; /* guarded by sync_mu */
    int bad;
};

/* Each time a sync of the new log begins: one write (and its read back)
 * of a block the compaction also copies. */
static void *sync_writer_main(void *arg)
{
    struct sync_writer *w = arg;
    unsigned char back[BS];
    pthread_mutex_lock(&sync_mu);
    for (int served = 0;;) {
        while (!w->stop && new_syncs == served)
            pthread_cond_wait(&sync_cv, &sync_mu);
        if (w->stop)
            break;
        served = new_syncs;
        pthread_mutex_unlock(&sync_mu);
        uint64_t b = 1500 + (uint64_t)served % 16;
        if (write_blocks(w->layer, w->model, b, 1) != 0 || layer_read(w->layer, back, BS, b * BS) != 0 ||
            memcmp(back, w->model->bytes + b * BS, BS) != 0)
            w->bad++;
        pthread_mutex_lock(&sync_mu);
        new_syncs_written = served;
        pthread_cond_broadcast(&sync_cv);
    }
    pthread_mutex_unlock(&sync_mu);
    return NULL;
}

static void test_writes_during_compaction_syncs(void)
{
    layer_syscalls.fdatasync = hooked_fdatasync;
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    struct model m;
    model_init(&m);
    for (int round = 0; round < 8; round++) {
        for (uint64_t b = 1400; b < 1600; b += 8)
            CHECK(write_blocks(l, &m, b, 8) == 0);
        CHECK(layer_flush(l) == 0);
    }
    pthread_mutex_lock(&sync_mu);
    new_syncs = new_syncs_written = new_syncs_stalled = 0;
    hold_new_syncs = true;
    pthread_mutex_unlock(&sync_mu);
    struct sync_writer w = {l, &m, false, 0};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, sync_writer_main, &w) == 0);
    CHECK(layer_compact(l) == 0);
    pthread_mutex_lock(&sync_mu);
    w.stop = true;
    hold_new_syncs = false;
    pthread_cond_broadcast(&sync_cv);
    pthread_mutex_unlock(&sync_mu);
    pthread_join(t, NULL);
    printf("compaction: %d syncs of the new log, %d with a write held\n", new_syncs, new_syncs_stalled);
    CHECK(new_syncs >= 2); /* the bulk, then what the switch added */
    CHECK(new_syncs_stalled == 0);
    CHECK(w.bad == 0);
    CHECK(layer_flush(l) == 0);
    CHECK(matches(l, &m));
    l = reopen(l);
    CHECK(l && matches(l, &m));
    close_and_remove(l);
    model_free(&m);
    layer_syscalls.fdatasync = real_fdatasync_saved;
}

/* The crash tests' shared pending directory (a stand-in for the
 * supervisor's tmpfs one): made and handed to the layers, then emptied of
 * the layers' sharing and removed. */
static void share_pending_in_test_dir(char *shared, size_t len)
{
    snprintf(shared, len, "%s/shared", dir);
    CHECK(mkdir(shared, 0700) == 0);
    layer_share_pending(shared);
}

static void stop_sharing_pending(const char *shared)
{
    layer_share_pending(NULL);
    CHECK(rmdir(shared) == 0);
}

/* In a forked child: a new layer, whose ID goes to the parent through fd. */
static struct layer *child_creates_layer(int fd)
{
    struct layer *l;
    if (layer_create(dir, DISK_SIZE, &l) != 0 || write(fd, layer_id(l), LAYER_ID_LEN) != LAYER_ID_LEN)
        _exit(2);
    return l;
}

/* In the parent: the child's layer ID (child_creates_layer), then the
 * child's end, which must be the SIGKILL it sent itself. */
static void wait_killed_child(pid_t pid, int ids[2], char id[LAYER_ID_LEN + 1])
{
    close(ids[1]);
    CHECK(read(ids[0], id, LAYER_ID_LEN) == LAYER_ID_LEN);
    close(ids[0]);
    int status;
    waitpid(pid, &status, 0);
    if (!WIFSIGNALED(status))
        fprintf(stderr, "a crash test's child exited %d instead of being killed\n", WEXITSTATUS(status));
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
}

/* A server killed after a compaction's switch, before its rename: a
 * takeover (the shared pending file still there) finishes the switch and
 * keeps the unflushed writes; after a reboot (no shared file) ID.log opens
 * with every flushed write. */
static void test_kill_after_switch(bool takeover)
{
    char shared[PATH_MAX], pending[PATH_MAX + 32], newlog[PATH_MAX + 8];
    share_pending_in_test_dir(shared, sizeof(shared));
    layer_syscalls.fdatasync = hooked_fdatasync;
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(l));
    snprintf(pending, sizeof(pending), "%s/%s.pending", shared, id);
    snprintf(newlog, sizeof(newlog), "%s.new", log_path(id));
    struct model flushed, all;
    model_init(&flushed);
    model_init(&all);
    for (int round = 0; round < 8; round++)
        for (uint64_t b = 0; b < 256; b += 8)
            CHECK(write_blocks(l, &flushed, b, 8) == 0);
    CHECK(layer_flush(l) == 0);
    layer_close(l);
    model_copy(&all, &flushed);
    uint64_t seed = next_rand();
    pid_t pid = fork();
    if (pid == 0) {
        rng = seed;
        if (layer_open(dir, id, DISK_SIZE, &l) != 0)
            _exit(2);
        for (uint64_t b = 100; b < 140; b += 4)
            write_blocks(l, NULL, b, 4); /* unflushed */
        pthread_mutex_lock(&sync_mu);
        new_syncs = 0;
        kill_at_new_sync = 2; /* the first after the switch */
        pthread_mutex_unlock(&sync_mu);
        layer_compact(l);
        _exit(0);
    }
    uint64_t saved = rng;
    rng = seed;
    for (uint64_t b = 100; b < 140; b += 4)
        write_blocks(NULL, &all, b, 4);
    rng = saved;
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    CHECK(access(newlog, F_OK) == 0);
    if (!takeover)
        CHECK(unlink(pending) == 0);
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    CHECK(l && matches(l, takeover ? &all : &flushed));
    CHECK(access(newlog, F_OK) != 0);
    CHECK(l && layer_flush(l) == 0);
    l = l ? reopen(l) : NULL;
    CHECK(l && matches(l, takeover ? &all : &flushed));
    layer_close(l);
    layer_remove(dir, id);
    stop_sharing_pending(shared);
    model_free(&flushed);
    model_free(&all);
    layer_syscalls.fdatasync = real_fdatasync_saved;
}

/* The shared pending file cannot grow past its first 4 KiB (a full tmpfs). */
static int small_fallocate(int fd, int mode, off_t off, off_t len)
{
    if (off + len > 4096) {
        errno = ENOSPC;
        return -1;
    }
    return fallocate(fd, mode, off, len);
}

/* Creates an empty layer and closes it, for a child process to open: its
 * id in id, or false. */
static bool empty_layer(char id[LAYER_ID_LEN + 1])
{
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    if (!l)
        return false;
    snprintf(id, LAYER_ID_LEN + 1, "%s", layer_id(l));
    layer_close(l);
    return true;
}

/* The parent's side of a kill test: counts the writes that the child pid
 * reported as returned on acks (one byte each), reaps it, and checks that
 * a takeover of layer id owns exactly the blocks of the first of those n
 * writes (order: their blocks, one each), with m's bytes; then removes the
 * layer. Returns whether the child was killed (false: it ran to its end). */
static bool takeover_keeps_acked(const char *id, int acks, pid_t pid, const uint64_t *order, size_t n,
                                 const struct model *m, int k)
{
    size_t acked = 0;
    char c;
    while (read(acks, &c, 1) == 1)
        acked++;
    close(acks);
    int status;
    waitpid(pid, &status, 0);
    bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
    CHECK(killed || (WIFEXITED(status) && WEXITSTATUS(status) == 0));
    struct layer *l;
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    unsigned char buf[BS];
    for (size_t w = 0; l && w < n; w++) {
        uint64_t b = order[w];
        bool owned = layer_owns(l, b);
        if (owned != (w < acked))
            fprintf(stderr, "killed at write %d: block %" PRIu64 " %s owned after %zu writes returned\n", k, b,
                    owned ? "is" : "is not", acked);
        CHECK(owned == (w < acked));
        CHECK(!owned || (layer_read(l, buf, BS, b * BS) == 0 && memcmp(buf, m->bytes + b * BS, BS) == 0));
    }
    layer_close(l);
    layer_remove(dir, id);
    return killed;
}

static struct layer *sync_writer; /* writing_sync (below) */
static uint64_t sync_writes;
static int sync_acks = -1; /* a pipe told of each of those writes, or -1 */

/* A run of writes for kill_at_every_write: what the child does, given the
 * pipe it tells each write that returned on (0, or the status it exits
 * with), and the writes it makes, in their order, into m and order (how
 * many). With acks_in_sync, the writes made in flushes' syncs
 * (writing_sync) are told on the pipe too. */
struct killed_run {
    int (*writes)(struct layer *l, int acks);
    size_t (*expected)(struct model *m, uint64_t *order);
    bool acks_in_sync;
};

/* Runs r in a child killed at its k-th pwrite, for k = 0, 1, ... until a
 * run is not killed (k was past its last write), each on an empty layer:
 * a takeover keeps exactly the writes that had returned
 * (takeover_keeps_acked). Returns how many runs were killed. */
static int kill_at_every_write(const struct killed_run *r, uint64_t *order)
{
    int kills = 0;
    for (int k = 0;; k++) {
        struct layer *l;
        char id[LAYER_ID_LEN + 1];
        if (!empty_layer(id))
            break;
        uint64_t seed = next_rand();
        int acks[2];
        CHECK(pipe(acks) == 0);
        pid_t pid = fork();
        if (pid == 0) {
            close(acks[0]);
            rng = seed;
            if (r->acks_in_sync) {
                sync_writes = 0;
                sync_acks = acks[1];
            }
            if (layer_open(dir, id, DISK_SIZE, &l) != 0)
                _exit(2);
            pwrites = 0;
            kill_at = k;
            _exit(r->writes(l, acks[1]));
        }
        close(acks[1]);
        struct model m;
        model_init(&m);
        uint64_t saved = rng;
        rng = seed;
        size_t n = r->expected(&m, order);
        rng = saved;
        bool killed = takeover_keeps_acked(id, acks[0], pid, order, n, &m, k);
        model_free(&m);
        if (!killed)
            break;
        kills++;
    }
    kill_at = -1;
    return kills;
}

/* A server killed at every write of a run of writes with a flush in the
 * middle (at each write's data, each of the flush's record blocks, torn):
 * with the shared pending file, the layer that a takeover opens shows
 * exactly the writes that had returned, each with its new bytes, and none
 * of the one under way. The run appends more entries than the shared
 * file's first mapping holds before the flush empties it; with full_tmpfs
 * that mapping cannot grow, and the writes whose entries it cannot take
 * must be durable when they return. */
enum { ACKED_WRITES = 200, ACKED_FLUSH_AFTER = 140 };

static int acked_writes(struct layer *l, int acks)
{
    for (uint64_t i = 0; i < ACKED_WRITES; i++) {
        if (i == ACKED_FLUSH_AFTER && layer_flush(l) != 0)
            return 4;
        if (write_blocks(l, NULL, i, 1) != 0 || write(acks, "w", 1) != 1)
            return 5;
    }
    return 0;
}

static size_t acked_expected(struct model *m, uint64_t *order)
{
    for (uint64_t i = 0; i < ACKED_WRITES; i++) {
        order[i] = i;
        write_blocks(NULL, m, i, 1);
    }
    return ACKED_WRITES;
}

static void test_takeover_acknowledged(bool full_tmpfs)
{
    char shared[PATH_MAX];
    share_pending_in_test_dir(shared, sizeof(shared));
    layer_syscalls.pwrite = hooked_pwrite;
    if (full_tmpfs)
        layer_syscalls.fallocate = small_fallocate;
    uint64_t order[ACKED_WRITES];
    const struct killed_run run = {acked_writes, acked_expected, false};
    int kills = kill_at_every_write(&run, order);
    CHECK(kills > ACKED_WRITES);
    printf("takeover%s: killed at %d different writes, each time exactly the returned writes kept\n",
           full_tmpfs ? " (a full tmpfs)" : "", kills);
    layer_syscalls.pwrite = real_pwrite_saved;
    layer_syscalls.fallocate = real_fallocate_saved;
    stop_sharing_pending(shared);
}

/* A write in every flush's sync (a guest that keeps writing while it
 * flushes): the layer that sync_writer names gets one more block, taken
 * from sync_writes, each time its log is synced (sync_acks: above). */
static int writing_sync(int fd)
{
    struct layer *l = sync_writer;
    if (l) {
        sync_writer = NULL; /* the write must not nest another */
        if (write_blocks(l, NULL, 256 + sync_writes++ % 256, 1) != 0)
            _exit(7);
        if (sync_acks >= 0 && write(sync_acks, "w", 1) != 1)
            _exit(7);
        sync_writer = l;
    }
    return real_fdatasync_saved(fd);
}

/* The shared pending file under a steady stream of writes, where every
 * flush finds one that came during its sync (so none empties the file),
 * after a burst of writes that made it large: it shrinks back and stays
 * small instead of growing by an entry per write, and a server killed after
 * such a run leaves a takeover exactly the written blocks. */
static void test_shared_file_bounded(void)
{
    enum { ROUNDS = 5000, BURST = 3000, BURST_FIRST = 600, BURST_SPAN = 1400 };
    char shared[PATH_MAX], pending[PATH_MAX + 32];
    share_pending_in_test_dir(shared, sizeof(shared));
    layer_syscalls.fdatasync = writing_sync;
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    char id[LAYER_ID_LEN + 1];
    snprintf(id, sizeof(id), "%s", layer_id(l));
    snprintf(pending, sizeof(pending), "%s/%s.pending", shared, id);
    layer_close(l);
    uint64_t seed = next_rand();
    pid_t pid = fork();
    if (pid == 0) {
        rng = seed;
        sync_writes = 0;
        if (layer_open(dir, id, DISK_SIZE, &l) != 0)
            _exit(2);
        for (int i = 0; i < BURST; i++) /* 96 KiB of entries, unflushed */
            if (write_blocks(l, NULL, BURST_FIRST + (uint64_t)i % BURST_SPAN, 1) != 0)
                _exit(3);
        for (int i = 0; i < ROUNDS; i++) {
            if (write_blocks(l, NULL, (uint64_t)i % 256, 1) != 0)
                _exit(3);
            sync_writer = l;
            int rc = layer_flush(l);
            sync_writer = NULL;
            if (rc != 0)
                _exit(4);
        }
        struct stat st;
        if (stat(pending, &st) != 0)
            _exit(5);
        if (st.st_size > 16384) {
            fprintf(stderr, "the pending file holds %lld bytes after %d flushes\n", (long long)st.st_size, ROUNDS);
            _exit(6);
        }
        for (uint64_t b = 512; b < 520; b++) /* unflushed */
            if (write_blocks(l, NULL, b, 1) != 0)
                _exit(3);
        kill(getpid(), SIGKILL);
        _exit(0);
    }
    struct model m;
    model_init(&m);
    uint64_t saved = rng;
    rng = seed;
    uint64_t during = 0;
    for (int i = 0; i < BURST; i++)
        write_blocks(NULL, &m, BURST_FIRST + (uint64_t)i % BURST_SPAN, 1);
    for (int i = 0; i < ROUNDS; i++) {
        write_blocks(NULL, &m, (uint64_t)i % 256, 1);
        write_blocks(NULL, &m, 256 + during++ % 256, 1);
    }
    for (uint64_t b = 512; b < 520; b++)
        write_blocks(NULL, &m, b, 1);
    rng = saved;
    int status;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status))
        fprintf(stderr, "the writer exited with %d\n", WEXITSTATUS(status));
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    layer_syscalls.fdatasync = real_fdatasync_saved;
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    CHECK(l && matches(l, &m));
    CHECK(l && layer_flush(l) == 0);
    l = l ? reopen(l) : NULL;
    CHECK(l && matches(l, &m));
    layer_close(l);
    layer_remove(dir, id);
    stop_sharing_pending(shared);
    model_free(&m);
}

/* A server killed before each system call that writes, in rounds of a
 * write and a flush with another write in its sync (so each flush moves the
 * entry that came during it to the front of the shared pending file): a
 * takeover keeps exactly the writes that had returned. */
static ssize_t kill_before_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    if (pwrites++ == kill_at)
        kill(getpid(), SIGKILL);
    return pwrite(fd, buf, len, off);
}

enum { MOVES_ROUNDS = 6 };

static int moves_writes(struct layer *l, int acks)
{
    for (int i = 0; i < MOVES_ROUNDS; i++) {
        if (write_blocks(l, NULL, (uint64_t)i, 1) != 0 || write(acks, "w", 1) != 1)
            return 3;
        sync_writer = l;
        int rc = layer_flush(l);
        sync_writer = NULL;
        if (rc != 0)
            return 4;
    }
    return 0;
}

/* The writes in order: block i, then block 256 + i in the flush's sync. */
static size_t moves_expected(struct model *m, uint64_t *order)
{
    for (int i = 0; i < MOVES_ROUNDS; i++) {
        order[2 * i] = (uint64_t)i;
        order[2 * i + 1] = 256 + (uint64_t)i;
        write_blocks(NULL, m, order[2 * i], 1);
        write_blocks(NULL, m, order[2 * i + 1], 1);
    }
    return 2 * MOVES_ROUNDS;
}

static void test_shared_moves_killed(void)
{
    char shared[PATH_MAX];
    share_pending_in_test_dir(shared, sizeof(shared));
    layer_syscalls.fdatasync = writing_sync;
    layer_syscalls.pwrite = kill_before_pwrite;
    layer_syscalls.shared_pwrite = kill_before_pwrite; /* the header updates too */
    uint64_t order[2 * MOVES_ROUNDS];
    const struct killed_run run = {moves_writes, moves_expected, true};
    int kills = kill_at_every_write(&run, order);
    CHECK(kills > 4 * MOVES_ROUNDS); /* each round: two data writes, a record, two headers */
    printf("shared file moves: killed at %d different writes, each time exactly the returned writes kept\n", kills);
    sync_acks = -1;
    layer_syscalls.pwrite = real_pwrite_saved;
    layer_syscalls.shared_pwrite = real_pwrite_saved;
    layer_syscalls.fdatasync = real_fdatasync_saved;
    stop_sharing_pending(shared);
}

/* The shared file's header cannot be written (layer_syscalls.shared_pwrite
 * fails). */
static ssize_t failing_shared_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    (void)fd, (void)buf, (void)len, (void)off;
    errno = EIO;
    return -1;
}

/* Two writes in a flush's sync (so that its record holds fewer entries of
 * the shared file than came after them, which stay there, flushed). */
static int two_writes_sync(int fd)
{
    struct layer *l = sync_writer;
    sync_writer = NULL;
    if (l && (write_blocks(l, NULL, 1, 1) != 0 || write_blocks(l, NULL, 2, 1) != 0))
        _exit(7);
    return real_fdatasync_saved(fd);
}

/* A header update of the shared pending file that fails: where a flush
 * empties the file (the file still names its entries, from a point past
 * 0), and where a layer is created (the file is not yet ours). A server
 * killed after a later write leaves a takeover every write that returned. */
static void test_shared_header_fails(bool at_create)
{
    char shared[PATH_MAX];
    share_pending_in_test_dir(shared, sizeof(shared));
    char id[LAYER_ID_LEN + 1] = "";
    uint64_t seed = next_rand();
    int ids[2];
    CHECK(pipe(ids) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        rng = seed;
        if (at_create)
            layer_syscalls.shared_pwrite = failing_shared_pwrite;
        struct layer *l = child_creates_layer(ids[1]);
        if (write_blocks(l, NULL, 0, 1) != 0)
            _exit(3);
        if (!at_create) { /* the file: {1, 3} after this flush */
            layer_syscalls.fdatasync = two_writes_sync;
            sync_writer = l;
            if (layer_flush(l) != 0)
                _exit(4);
            layer_syscalls.fdatasync = real_fdatasync_saved;
            layer_syscalls.shared_pwrite = failing_shared_pwrite;
            if (layer_flush(l) != 0) /* it cannot empty the file */
                _exit(4);
            layer_syscalls.shared_pwrite = real_pwrite_saved;
            if (write_blocks(l, NULL, 3, 1) != 0)
                _exit(3);
        }
        kill(getpid(), SIGKILL);
        _exit(0);
    }
    wait_killed_child(pid, ids, id);
    struct model m;
    model_init(&m);
    uint64_t saved = rng;
    rng = seed;
    for (uint64_t b = 0; b < (at_create ? 1u : 4u); b++)
        write_blocks(NULL, &m, b, 1);
    rng = saved;
    struct layer *l = NULL;
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    CHECK(l && matches(l, &m));
    layer_close(l);
    layer_remove(dir, id);
    layer_share_pending(NULL);
    char pending[PATH_MAX + 32];
    snprintf(pending, sizeof(pending), "%s/%s.pending", shared, id);
    unlink(pending);
    CHECK(rmdir(shared) == 0);
    model_free(&m);
}

/* The shared file's header cannot be written when a compaction switches
 * the layer to its new log (its reset there fails): the file still names
 * the old log, where a takeover would not apply the writes that follow.
 * Those must then flush before they return; a server killed after one
 * leaves a takeover every write that returned. */
static void test_shared_header_fails_at_switch(void)
{
    char shared[PATH_MAX];
    share_pending_in_test_dir(shared, sizeof(shared));
    char id[LAYER_ID_LEN + 1] = "";
    uint64_t seed = next_rand();
    int ids[2];
    CHECK(pipe(ids) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        rng = seed;
        struct layer *l = child_creates_layer(ids[1]);
        if (write_blocks(l, NULL, 0, 1) != 0 || layer_flush(l) != 0 || write_blocks(l, NULL, 0, 1) != 0 ||
            write_blocks(l, NULL, 1, 1) != 0)
            _exit(3);
        layer_syscalls.shared_pwrite = failing_shared_pwrite;
        if (layer_compact(l) != 0)
            _exit(4);
        layer_syscalls.shared_pwrite = real_pwrite_saved;
        if (write_blocks(l, NULL, 2, 1) != 0) /* answered after the switch */
            _exit(3);
        kill(getpid(), SIGKILL);
        _exit(0);
    }
    wait_killed_child(pid, ids, id);
    struct model m;
    model_init(&m);
    uint64_t saved = rng;
    rng = seed;
    write_blocks(NULL, &m, 0, 1);
    write_blocks(NULL, &m, 0, 1);
    write_blocks(NULL, &m, 1, 1);
    write_blocks(NULL, &m, 2, 1);
    rng = saved;
    struct layer *l = NULL;
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    CHECK(l && matches(l, &m));
    layer_close(l);
    layer_remove(dir, id);
    layer_share_pending(NULL);
    char pending[PATH_MAX + 32];
    snprintf(pending, sizeof(pending), "%s/%s.pending", shared, id);
    unlink(pending);
    CHECK(rmdir(shared) == 0);
    model_free(&m);
}

/* The write of a block whose bytes start with HELD_BYTE runs a whole flush
 * of flush_in_write from inside its pwrite (its blocks are reserved, its
 * entry not yet made: a write under way), in the same thread, so that the
 * crash tests need no thread of their own (the layer's swap_lock is then
 * taken shared twice, with no zeroing or compaction to wait on it); then,
 * with kill_in_write, the process dies before the write is done. */
static struct layer *flush_in_write;
static bool kill_in_write;
static ssize_t flushing_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    struct layer *l = flush_in_write;
    if (l && len == BS && ((const unsigned char *)buf)[0] == HELD_BYTE) {
        flush_in_write = NULL;
        if (layer_flush(l) != 0)
            _exit(5);
        if (kill_in_write)
            kill(getpid(), SIGKILL);
    }
    return real_pwrite_saved(fd, buf, len, off);
}

/* A server killed after a flush that passed a write under way: a takeover
 * keeps the write the flush recorded and, when the one under way returned
 * before the kill, that one too (its entry came into the shared file after
 * the flush took its own); when it had not returned, nothing of it. */
static void test_takeover_after_flush_passed_write(bool write_returned)
{
    char shared[PATH_MAX];
    share_pending_in_test_dir(shared, sizeof(shared));
    char id[LAYER_ID_LEN + 1] = "";
    int ids[2];
    CHECK(pipe(ids) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        struct layer *l = child_creates_layer(ids[1]);
        unsigned char buf[BS];
        memset(buf, 0x11, BS);
        if (layer_write(l, buf, BS, 0) != 0)
            _exit(3);
        layer_syscalls.pwrite = flushing_pwrite;
        flush_in_write = l;
        kill_in_write = !write_returned;
        memset(buf, HELD_BYTE, BS);
        if (layer_write(l, buf, BS, BS) != 0 || flush_in_write)
            _exit(6);
        kill(getpid(), SIGKILL);
        _exit(0);
    }
    wait_killed_child(pid, ids, id);
    struct layer *l = NULL;
    CHECK(layer_open(dir, id, DISK_SIZE, &l) == 0);
    if (l) {
        CHECK(block_is(l, 0, 0x11));
        CHECK(write_returned ? block_is(l, 1, HELD_BYTE) : !layer_owns(l, 1));
        layer_close(l);
    }
    layer_remove(dir, id);
    layer_share_pending(NULL);
    char pending[PATH_MAX + 32];
    snprintf(pending, sizeof(pending), "%s/%s.pending", shared, id);
    unlink(pending);
    CHECK(rmdir(shared) == 0);
}

static void test_faults(void)
{
    layer_syscalls.pwrite = hooked_pwrite;
    layer_syscalls.fdatasync = hooked_fdatasync;
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    struct model m;
    model_init(&m);
    CHECK(write_blocks(l, &m, 0, 8) == 0);
    CHECK(layer_flush(l) == 0);
    /* A write that hits ENOSPC fails alone; the layer goes on. */
    pwrites = 0;
    kill_at = 0;
    fail_errno = ENOSPC;
    CHECK(write_blocks(l, &m, 20, 1) == -ENOSPC);
    CHECK(write_blocks(l, &m, 21, 1) == 0);
    /* A flush whose record write fails can be retried. */
    pwrites = 0;
    kill_at = 0;
    fail_errno = EIO;
    CHECK(layer_flush(l) == -EIO);
    CHECK(matches(l, &m));
    CHECK(write_blocks(l, &m, 22, 1) == 0);
    CHECK(layer_flush(l) == 0);
    l = reopen(l);
    CHECK(l && matches(l, &m));
    /* A failed fdatasync: what reached the disk is unknown, so the layer
     * refuses writes until reopened; what was flushed before stays. */
    struct model flushed;
    model_init(&flushed);
    model_copy(&flushed, &m);
    CHECK(write_blocks(l, &m, 30, 1) == 0);
    fail_sync = true;
    CHECK(layer_flush(l) == -EIO);
    fail_sync = false;
    CHECK(write_blocks(l, NULL, 31, 1) == -EIO);
    CHECK(layer_flush(l) == -EIO);
    l = reopen(l);
    CHECK(l && (matches(l, &m) || matches(l, &flushed)));
    kill_at = -1;
    fail_errno = 0;
    close_and_remove(l);
    model_free(&m);
    model_free(&flushed);
}

/* ---- the allocated bytes kept between changes -------------------------------------- */

/* What layer_allocated_bytes would answer asked afresh: the log's space
 * less what lies past the tail (layer.h). */
static uint64_t allocated_now(const struct layer *l)
{
    struct stat st;
    struct layer_stats ls;
    layer_stats(l, &ls);
    if (stat(log_path(layer_id(l)), &st) != 0)
        return UINT64_MAX;
    uint64_t tail = (ls.log_blocks + 1) * BS, used = (uint64_t)st.st_blocks * 512;
    uint64_t ahead = (uint64_t)st.st_size > tail ? (uint64_t)st.st_size - tail + BS : 0;
    return used > ahead ? used - ahead : 0;
}

/* The kept answer is asked (so it is kept) before each change, and must be
 * the fresh one after it; the two differ, or the step shows nothing. */
static bool follows(const struct layer *l, uint64_t before)
{
    uint64_t kept = layer_allocated_bytes(l), now = allocated_now(l);
    if (kept != now || now == before)
        fprintf(stderr, "allocated bytes: kept %" PRIu64 ", now %" PRIu64 ", before the change %" PRIu64 "\n", kept,
                now, before);
    return kept == now && now != before;
}

/* A punch flushes (which moves the counter) before it gives the dead
 * data's space back: the answer is kept from inside that fallocate. */
static struct layer *follow_layer;
static uint64_t follow_before = UINT64_MAX;
static int priming_fallocate(int fd, int mode, off_t off, off_t len)
{
    if (follow_before == UINT64_MAX && (mode & FALLOC_FL_PUNCH_HOLE))
        follow_before = layer_allocated_bytes(follow_layer);
    return real_fallocate_saved(fd, mode, off, len);
}

/* Each kind of change moves the counter behind layer_allocated_bytes: a
 * write (kept pending: the shared file holds its entry, so it does not
 * flush), a flush, a punch of flushed data, a compaction. Without any one
 * of the counter's moves, the step after it reads the answer kept from
 * before. (Zeros and space prepared ahead of the tail, and their give-back,
 * move the counter too, but leave the answer as it was: it does not count
 * what lies past the tail.) */
static void test_allocated_bytes_follow(void)
{
    char shared[PATH_MAX];
    setenv("IMGFS_LAYER_ZERO_AHEAD", "0", 1); /* nothing in the background */
    share_pending_in_test_dir(shared, sizeof(shared));
    struct layer *l;
    CHECK(layer_create(dir, DISK_SIZE, &l) == 0);
    struct model m;
    model_init(&m);
    uint64_t before = layer_allocated_bytes(l);
    CHECK(write_blocks(l, &m, 0, 64) == 0);
    CHECK(follows(l, before));
    before = layer_allocated_bytes(l);
    CHECK(layer_flush(l) == 0);
    CHECK(follows(l, before));
    CHECK(write_blocks(l, &m, 64, 64) == 0 && layer_flush(l) == 0);
    follow_layer = l;
    layer_syscalls.fallocate = priming_fallocate;
    CHECK(punch_blocks(l, &m, 0, 32) == 0);
    layer_syscalls.fallocate = real_fallocate_saved;
    CHECK(follow_before != UINT64_MAX && follows(l, follow_before));
    before = layer_allocated_bytes(l);
    CHECK(layer_compact(l) == 0);
    CHECK(follows(l, before));
    CHECK(matches(l, &m));
    close_and_remove(l);
    stop_sharing_pending(shared);
    unsetenv("IMGFS_LAYER_ZERO_AHEAD");
    model_free(&m);
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/tmp/imgfs-test-layer-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    setenv("IMGFS_LAYER_COMPACT_MIN", "1G", 1); /* compactions only when asked */
    real_fdatasync_saved = layer_syscalls.fdatasync;
    real_pwrite_saved = layer_syscalls.pwrite;
    real_fallocate_saved = layer_syscalls.fallocate;
    cond_init_monotonic(&sync_cv);
    cond_init_monotonic(&held_cv);
    test_basics();
    test_torn_record();
    test_convert_old();
    test_compaction();
    test_parallel_compaction();
    test_write_through();
    test_write_kinds_apart();
    test_flush_passes_writes_under_way(false);
    test_flush_passes_writes_under_way(true);
    test_punch_beside_failed_flush();
    test_allocated_bytes_follow();
    /* The crash tests fork: no zeroing thread may run in the parent (a
     * child of a threaded process must not start threads of its own). */
    setenv("IMGFS_LAYER_ZERO_AHEAD", "0", 1);
    test_crashes(false);
    test_crashes(true);
    /* Killed at every write of a flush whose data went with O_DIRECT (a
     * torn one, too): a crash between the data and its record leaves the
     * old bytes. */
    setenv("IMGFS_LAYER_THROUGH", "all", 1);
    through = true;
    test_crashes(false);
    through = false;
    unsetenv("IMGFS_LAYER_THROUGH");
    test_writes_during_compaction_syncs();
    test_kill_after_switch(true);
    test_kill_after_switch(false);
    test_takeover_acknowledged(false);
    test_takeover_acknowledged(true);
    test_takeover_after_flush_passed_write(false);
    test_takeover_after_flush_passed_write(true);
    test_shared_file_bounded();
    test_shared_moves_killed();
    test_shared_header_fails(false);
    test_shared_header_fails(true);
    test_shared_header_fails_at_switch();
    test_faults();
    CHECK(count_entries(dir) == 0);
    remove_tree(dir);
    return check_summary();
}
