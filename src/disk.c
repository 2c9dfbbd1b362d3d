#include "disk.h"

#include <errno.h>
#include <stdbool.h>
#include <string.h>
#include <unistd.h>

int disk_owner_of(const struct disk *disk, uint64_t block)
{
    for (int i = (int)disk->depth - 1; i >= 0; i--)
        if (layer_owns(disk->layers[i], block))
            return i;
    return -1;
}

/* The run of blocks from off (at most to end) that one layer owns, or that
 * no layer owns; *owner is the layer's index or -1. */
static uint64_t run_at(const struct disk *disk, uint64_t off, uint64_t end, int *owner)
{
    if (disk->depth == 0) { /* a base alone: one run, without a walk over its blocks */
        *owner = -1;
        return end - off;
    }
    uint64_t block = off / LAYER_BLOCK_SIZE;
    *owner = disk_owner_of(disk, block);
    uint64_t run_end = (block + 1) * LAYER_BLOCK_SIZE;
    while (run_end < end && disk_owner_of(disk, run_end / LAYER_BLOCK_SIZE) == *owner)
        run_end += LAYER_BLOCK_SIZE;
    return (run_end < end ? run_end : end) - off;
}

int disk_map(const struct disk *disk, uint64_t off, uint64_t len, disk_extent_fn fn, void *ctx)
{
    uint64_t end = off < disk->size && len < disk->size - off ? off + len : disk->size;
    while (off < end) {
        int owner;
        uint64_t n = run_at(disk, off, end, &owner);
        struct disk_extent e = {.off = off, .len = n};
        if (owner >= 0) {
            e.kind = DISK_EXTENT_LAYER;
            e.layer = disk->layers[owner];
        } else if (!disk->base) {
            e.kind = DISK_EXTENT_ZERO;
        } else {
            /* Base runs are cut at chunk boundaries. */
            const struct manifest *m = disk->base->manifest;
            e.chunk = off / m->chunk_size;
            e.chunk_off = off % m->chunk_size;
            if (e.len > m->chunk_size - e.chunk_off)
                e.len = m->chunk_size - e.chunk_off;
            e.kind = chunk_hash_is_null(&m->chunks[e.chunk]) ? DISK_EXTENT_ZERO : DISK_EXTENT_BASE;
        }
        int rc = fn(ctx, &e);
        if (rc)
            return rc;
        off += e.len;
    }
    return 0;
}

struct read_ctx {
    const struct disk *disk;
    const struct base_source *src;
    char *buf;
    uint64_t start;
};

static int read_extent(void *arg, const struct disk_extent *e)
{
    struct read_ctx *r = arg;
    char *out = r->buf + (e->off - r->start);
    int rc = 0;
    switch (e->kind) {
    case DISK_EXTENT_LAYER:
        rc = layer_read(e->layer, out, (size_t)e->len, e->off);
        break;
    case DISK_EXTENT_BASE:
        rc = r->src->read(r->src->ctx, r->disk->base, e->chunk, out, (size_t)e->len, e->chunk_off);
        break;
    case DISK_EXTENT_ZERO:
        memset(out, 0, (size_t)e->len);
        break;
    }
    return rc == -ENODATA ? -EIO : rc;
}

int disk_read(const struct disk *disk, const struct base_source *src, void *buf, size_t len, uint64_t off)
{
    if (off > disk->size || len > disk->size - off)
        return -EINVAL;
    struct read_ctx r = {disk, src, buf, off};
    return disk_map(disk, off, len, read_extent, &r);
}

int64_t disk_seek(const struct disk *disk, uint64_t off, int whence)
{
    if (off >= disk->size)
        return -ENXIO;
    bool want_data = whence == SEEK_DATA;
    uint64_t pos = off;
    while (pos < disk->size) {
        int owner;
        uint64_t run_end = pos + run_at(disk, pos, disk->size, &owner);
        while (pos < run_end) {
            /* Find the extent of data or hole that starts at pos. */
            bool is_data;
            uint64_t next;
            if (owner >= 0) {
                struct layer *layer = disk->layers[owner];
                struct layer_extent e;
                if (layer_extent_at(layer, pos, run_end - pos, &e) != 0)
                    return -EIO;
                is_data = e.kind == LAYER_EXTENT_DATA; /* discarded blocks read as zeros */
                next = pos + e.len;
                layer_extent_release(layer, &e);
            } else if (disk->base) {
                const struct manifest *m = disk->base->manifest;
                uint64_t index = pos / m->chunk_size;
                is_data = !chunk_hash_is_null(&m->chunks[index]);
                next = (index + 1) * m->chunk_size;
            } else {
                is_data = false;
                next = run_end;
            }
            if (next > run_end)
                next = run_end;
            if (next <= pos)
                next = pos + 1;
            if (is_data == want_data)
                return (int64_t)pos;
            pos = next;
        }
    }
    return want_data ? -ENXIO : (int64_t)disk->size;
}
