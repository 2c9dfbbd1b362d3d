/* Unit tests for disk.c against an in-memory base, with no FUSE, no root
 * and no repository: a base of 16 KiB chunks (some all-zero, so not
 * stored), two layers over it, and a model of what every byte must read
 * as. Checked: disk_read of many ranges against the model, the extents of
 * disk_map (kinds, chunk boundaries, order), a base source that fails, a
 * blank disk, and SEEK_DATA / SEEK_HOLE. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "disk.h"
#include "hash.h"
#include "test_files.h"

#define CS (16u * 1024)
#define CHUNKS 12
#define SIZE (CHUNKS * CS - 3 * 512) /* a short last chunk */

static unsigned char base_bytes[CHUNKS * CS];
static unsigned char model[SIZE];

struct mem_source {
    unsigned reads;
    int fail_chunk; /* -1: none */
};

static int mem_read(void *ctx, const struct vm_base *base, uint64_t index, void *buf, size_t len, uint64_t off)
{
    struct mem_source *s = ctx;
    s->reads++;
    if ((int)index == s->fail_chunk)
        return -EIO;
    if (index >= base->manifest->chunk_count || off + len > CS || chunk_hash_is_null(&base->manifest->chunks[index]))
        return -EINVAL; /* the disk must never ask for these */
    memcpy(buf, base_bytes + index * CS + off, len);
    return 0;
}

static void fill(unsigned char *p, size_t len, unsigned seed)
{
    uint32_t x = seed * 2654435761u + 7;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        p[i] = (unsigned char)(x | 1); /* never zero: a zero byte would hide a wrong source */
    }
}

struct map_check {
    uint64_t next; /* where the next extent must start */
    unsigned count;
    bool bad;
};

static int check_extent(void *ctx, const struct disk_extent *e)
{
    struct map_check *c = ctx;
    if (e->off != c->next || e->len == 0)
        c->bad = true;
    if (e->kind == DISK_EXTENT_BASE && (e->chunk != e->off / CS || e->chunk_off != e->off % CS ||
                                        e->chunk_off + e->len > CS))
        c->bad = true; /* a base extent stays in its chunk */
    c->next = e->off + e->len;
    c->count++;
    return 0;
}

static int stop_at_second(void *ctx, const struct disk_extent *e)
{
    (void)e;
    return ++*(unsigned *)ctx == 2 ? 42 : 0;
}

int main(void)
{
    char dir[] = "/tmp/imgfs-test-disk.XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    /* The base: chunks 2 and 7 are all zero (null hash, not stored). */
    struct chunk_hash hashes[CHUNKS];
    for (unsigned i = 0; i < CHUNKS; i++) {
        if (i == 2 || i == 7) {
            memset(base_bytes + i * CS, 0, CS);
            memset(&hashes[i], 0, sizeof(hashes[i]));
        } else {
            fill(base_bytes + i * CS, CS, i + 1);
            chunk_hash_compute(base_bytes + i * CS, CS, &hashes[i]);
        }
    }
    struct manifest m = {.size = SIZE, .chunk_size = CS, .chunk_count = CHUNKS, .chunks = hashes};
    struct vm_base base = {.manifest = &m};
    memcpy(model, base_bytes, SIZE);

    /* Two layers: the lower one owns blocks 1-5 with data and 20-21 as
     * zeros; the upper one blocks 4-9 and the last block. */
    struct layer *low, *up;
    CHECK(layer_create(dir, SIZE, &low) == 0);
    CHECK(layer_create(dir, SIZE, &up) == 0);
    unsigned char block[6 * LAYER_BLOCK_SIZE];
    fill(block, 5 * LAYER_BLOCK_SIZE, 100);
    CHECK(layer_write(low, block, 5 * LAYER_BLOCK_SIZE, 1 * LAYER_BLOCK_SIZE) == 0);
    memcpy(model + LAYER_BLOCK_SIZE, block, 5 * LAYER_BLOCK_SIZE);
    CHECK(layer_punch(low, 20, 2) == 0);
    memset(model + 20 * LAYER_BLOCK_SIZE, 0, 2 * LAYER_BLOCK_SIZE);
    fill(block, 6 * LAYER_BLOCK_SIZE, 200);
    CHECK(layer_write(up, block, 6 * LAYER_BLOCK_SIZE, 4 * LAYER_BLOCK_SIZE) == 0);
    memcpy(model + 4 * LAYER_BLOCK_SIZE, block, 6 * LAYER_BLOCK_SIZE);
    uint64_t last = (SIZE - 1) / LAYER_BLOCK_SIZE;
    size_t tail = SIZE - last * LAYER_BLOCK_SIZE;
    fill(block, tail, 300);
    CHECK(layer_write(up, block, tail, last * LAYER_BLOCK_SIZE) == 0);
    memcpy(model + last * LAYER_BLOCK_SIZE, block, tail);

    struct disk disk = {.size = SIZE, .base = &base, .layers = {low, up}, .depth = 2};
    struct mem_source ms = {0, -1};
    struct base_source src = {mem_read, &ms};

    /* disk_read of many ranges, aligned and not, against the model. */
    static unsigned char got[SIZE];
    bool all_same = true;
    unsigned ranges = 0;
    for (uint64_t off = 0; off < SIZE; off += 1531) {
        for (uint64_t len = 1; off + len <= SIZE && len < 5 * CS; len = len * 3 + 511) {
            memset(got, 0xee, len);
            if (disk_read(&disk, &src, got, len, off) != 0 || memcmp(got, model + off, len) != 0)
                all_same = false;
            ranges++;
        }
    }
    CHECK(all_same);
    CHECK(disk_read(&disk, &src, got, SIZE, 0) == 0 && memcmp(got, model, SIZE) == 0);
    printf("disk_read matched the model over %u ranges\n", ranges);
    CHECK(disk_read(&disk, &src, got, 2, SIZE - 1) == -EINVAL);

    /* disk_map: extents in order, covering the range, base ones in one chunk. */
    struct map_check mc = {.next = 100};
    CHECK(disk_map(&disk, 100, SIZE - 200, check_extent, &mc) == 0);
    CHECK(!mc.bad && mc.next == SIZE - 100);
    unsigned seen = 0;
    CHECK(disk_map(&disk, 0, SIZE, stop_at_second, &seen) == 42 && seen == 2);
    mc = (struct map_check){.next = SIZE - 10};
    CHECK(disk_map(&disk, SIZE - 10, 1000, check_extent, &mc) == 0 && mc.next == SIZE); /* cut at the end */

    /* Only stored base chunks reach the source; a failing one fails the read. */
    ms.reads = 0;
    CHECK(disk_read(&disk, &src, got, CS, 2 * CS) == 0 && ms.reads == 0); /* a zero chunk */
    ms.fail_chunk = 3;
    CHECK(disk_read(&disk, &src, got, 100, 3 * CS + 10) == -EIO);
    CHECK(disk_read(&disk, &src, got, 100, 4 * CS + 10) == 0);
    ms.fail_chunk = -1;

    /* A blank disk reads zeros and needs no base source. */
    struct disk blank = {.size = SIZE, .layers = {up}, .depth = 1};
    CHECK(disk_read(&blank, NULL, got, SIZE, 0) == 0);
    bool blank_ok = memcmp(got + 4 * LAYER_BLOCK_SIZE, model + 4 * LAYER_BLOCK_SIZE, 6 * LAYER_BLOCK_SIZE) == 0;
    for (size_t i = 0; i < 4 * LAYER_BLOCK_SIZE; i++)
        blank_ok &= got[i] == 0;
    CHECK(blank_ok);

    /* SEEK_DATA / SEEK_HOLE: the zero chunk 2 (blocks 8-11) is a hole
     * except for blocks 8-9, which the upper layer owns with data. */
    CHECK(disk_seek(&disk, 10 * LAYER_BLOCK_SIZE, SEEK_HOLE) == 10 * LAYER_BLOCK_SIZE);
    CHECK(disk_seek(&disk, 10 * LAYER_BLOCK_SIZE, SEEK_DATA) == 3 * CS);
    CHECK(disk_seek(&disk, 20 * LAYER_BLOCK_SIZE, SEEK_DATA) == 22 * LAYER_BLOCK_SIZE); /* punched blocks */
    CHECK(disk_seek(&disk, SIZE, SEEK_DATA) == -ENXIO);
    CHECK(disk_seek(&blank, 0, SEEK_DATA) == 4 * LAYER_BLOCK_SIZE);

    layer_close(low);
    layer_close(up);
    remove_tree(dir);
    return check_summary();
}
