#include "layer.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

#define MAP_HEADER_LEN 64
#define MAP_MAGIC "imgfs-layer-map 1\n"
#define MAP_PAGE 4096u

struct layer {
    char id[LAYER_ID_LEN + 1];
    int data_fd;
    int map_fd;
    uint64_t size;
    uint64_t blocks;
    _Atomic uint64_t *bits; /* ownership, one bit per block */
    /* dirty marks map pages (4 KiB of bits) that changed since the last
     * flush; guarded by flush_lock (held briefly, never across I/O). */
    pthread_mutex_t flush_lock;
    uint8_t *dirty;
    /* Serialises layer_flush() calls; held across their I/O. */
    pthread_mutex_t flush_serial;
    size_t map_pages;
    atomic_uint_fast64_t owned_blocks;
};

static int layer_paths(const char *dir, const char *id, char *data, char *map, size_t len)
{
    int err = path_join(data, len, "%s/%s.data", dir, id);
    return err ? err : path_join(map, len, "%s/%s.map", dir, id);
}

static struct layer *layer_alloc(const char *id, uint64_t size)
{
    struct layer *l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    snprintf(l->id, sizeof(l->id), "%s", id);
    l->data_fd = l->map_fd = -1;
    l->size = size;
    l->blocks = (size + LAYER_BLOCK_SIZE - 1) / LAYER_BLOCK_SIZE;
    size_t words = (size_t)((l->blocks + 63) / 64);
    l->map_pages = (words * 8 + MAP_PAGE - 1) / MAP_PAGE;
    /* Whole pages, so that map writes never read past the array. */
    l->bits = calloc(l->map_pages * MAP_PAGE / 8 + 1, sizeof(uint64_t));
    l->dirty = calloc(l->map_pages + 1, 1);
    pthread_mutex_init(&l->flush_lock, NULL);
    pthread_mutex_init(&l->flush_serial, NULL);
    if (!l->bits || !l->dirty) {
        layer_close(l);
        return NULL;
    }
    return l;
}

void layer_close(struct layer *l)
{
    if (!l)
        return;
    if (l->data_fd >= 0)
        close(l->data_fd);
    if (l->map_fd >= 0)
        close(l->map_fd);
    pthread_mutex_destroy(&l->flush_lock);
    pthread_mutex_destroy(&l->flush_serial);
    free(l->bits);
    free(l->dirty);
    free(l);
}

int layer_create(const char *dir, uint64_t size, struct layer **out)
{
    uint8_t raw[LAYER_ID_LEN / 2];
    if (getrandom(raw, sizeof(raw), 0) != (ssize_t)sizeof(raw))
        return -EIO;
    char id[LAYER_ID_LEN + 1];
    for (size_t i = 0; i < sizeof(raw); i++)
        snprintf(id + 2 * i, 3, "%02x", raw[i]);
    struct layer *l = layer_alloc(id, size);
    if (!l)
        return -ENOMEM;
    char data[PATH_MAX], map[PATH_MAX];
    int err = layer_paths(dir, id, data, map, sizeof(data));
    if (err)
        goto fail;
    l->data_fd = open(data, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    l->map_fd = l->data_fd < 0 ? -1 : open(map, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (l->data_fd < 0 || l->map_fd < 0) {
        err = -errno;
        goto fail;
    }
    char header[MAP_HEADER_LEN] = {0};
    snprintf(header, sizeof(header), MAP_MAGIC "%" PRIu64 "\n", size);
    off_t map_len = MAP_HEADER_LEN + (off_t)l->map_pages * MAP_PAGE;
    if (ftruncate(l->data_fd, (off_t)size) < 0 || posix_fallocate(l->map_fd, 0, map_len) != 0) {
        err = errno ? -errno : -ENOSPC;
        goto fail;
    }
    err = write_full_at(l->map_fd, header, sizeof(header), 0);
    if (!err && (fsync(l->data_fd) < 0 || fsync(l->map_fd) < 0))
        err = -errno;
    if (!err)
        err = fsync_dir(dir);
    if (err)
        goto fail;
    *out = l;
    return 0;
fail:
    layer_close(l);
    layer_remove(dir, id);
    return err ? err : -EIO;
}

int layer_open(const char *dir, const char *id, uint64_t size, struct layer **out)
{
    struct layer *l = layer_alloc(id, size);
    if (!l)
        return -ENOMEM;
    char data[PATH_MAX], map[PATH_MAX];
    int err = layer_paths(dir, id, data, map, sizeof(data));
    if (err)
        goto fail;
    l->data_fd = open(data, O_RDWR | O_CLOEXEC);
    l->map_fd = l->data_fd < 0 ? -1 : open(map, O_RDWR | O_CLOEXEC);
    if (l->data_fd < 0 || l->map_fd < 0) {
        err = -errno;
        goto fail;
    }
    char header[MAP_HEADER_LEN], want[MAP_HEADER_LEN] = {0};
    snprintf(want, sizeof(want), MAP_MAGIC "%" PRIu64 "\n", size);
    err = read_full_at(l->map_fd, header, sizeof(header), 0);
    if (!err && memcmp(header, want, sizeof(want)) != 0)
        err = -EBADMSG;
    if (!err)
        err = read_full_at(l->map_fd, (void *)l->bits, l->map_pages * MAP_PAGE, MAP_HEADER_LEN);
    if (err == -ENODATA)
        err = -EBADMSG;
    if (err)
        goto fail;
    /* Bits past the end of the disk are meaningless: clear them. */
    for (uint64_t b = l->blocks; b < (uint64_t)l->map_pages * MAP_PAGE * 8; b++)
        l->bits[b / 64] &= ~(1ull << (b % 64));
    uint64_t owned = 0;
    for (size_t w = 0; w < (l->blocks + 63) / 64; w++)
        owned += (uint64_t)__builtin_popcountll(l->bits[w]);
    atomic_store(&l->owned_blocks, owned);
    *out = l;
    return 0;
fail:
    layer_close(l);
    return err;
}

int layer_remove(const char *dir, const char *id)
{
    char data[PATH_MAX], map[PATH_MAX];
    int err = layer_paths(dir, id, data, map, sizeof(data));
    if (err)
        return err;
    if (unlink(data) < 0 && errno != ENOENT)
        err = -errno;
    if (unlink(map) < 0 && errno != ENOENT && !err)
        err = -errno;
    return err;
}

static void mark_owned(struct layer *l, uint64_t first, uint64_t count)
{
    pthread_mutex_lock(&l->flush_lock);
    for (uint64_t b = first; b < first + count && b < l->blocks; b++) {
        uint64_t mask = 1ull << (b % 64);
        uint64_t old = atomic_fetch_or_explicit(&l->bits[b / 64], mask, memory_order_release);
        if (!(old & mask)) {
            atomic_fetch_add(&l->owned_blocks, 1);
            l->dirty[b / (MAP_PAGE * 8)] = 1;
        }
    }
    pthread_mutex_unlock(&l->flush_lock);
}

int layer_flush(struct layer *l)
{
    /* One flush at a time: an older snapshot of a map page must never be
     * written over a newer one. */
    pthread_mutex_lock(&l->flush_serial);
    /* Snapshot the dirty map pages first, then make the data durable, then
     * write the snapshot: a bit set after the snapshot waits for the next
     * flush, so no bit reaches the map before its data. */
    pthread_mutex_lock(&l->flush_lock);
    size_t count = 0;
    for (size_t p = 0; p < l->map_pages; p++)
        count += l->dirty[p];
    size_t *pages = count ? malloc(count * sizeof(*pages)) : NULL;
    uint64_t *copy = count ? malloc(count * MAP_PAGE) : NULL;
    if (count && (!pages || !copy)) {
        pthread_mutex_unlock(&l->flush_lock);
        pthread_mutex_unlock(&l->flush_serial);
        free(pages);
        free(copy);
        return -ENOMEM;
    }
    for (size_t p = 0, i = 0; p < l->map_pages; p++) {
        if (!l->dirty[p])
            continue;
        pages[i] = p;
        for (size_t w = 0; w < MAP_PAGE / 8; w++)
            copy[i * (MAP_PAGE / 8) + w] = atomic_load(&l->bits[p * (MAP_PAGE / 8) + w]);
        l->dirty[p] = 0;
        i++;
    }
    pthread_mutex_unlock(&l->flush_lock);

    int err = fdatasync(l->data_fd) < 0 ? -errno : 0;
    for (size_t i = 0; i < count && !err; i++)
        err = write_full_at(l->map_fd, copy + i * (MAP_PAGE / 8), MAP_PAGE,
                            MAP_HEADER_LEN + (off_t)pages[i] * MAP_PAGE);
    if (!err && count && fdatasync(l->map_fd) < 0)
        err = -errno;
    if (err) {
        pthread_mutex_lock(&l->flush_lock);
        for (size_t i = 0; i < count; i++)
            l->dirty[pages[i]] = 1;
        pthread_mutex_unlock(&l->flush_lock);
    }
    pthread_mutex_unlock(&l->flush_serial);
    free(pages);
    free(copy);
    return err;
}

uint64_t layer_allocated_bytes(const struct layer *l)
{
    struct stat st;
    return fstat(l->data_fd, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
}

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
    return block < l->blocks &&
           ((atomic_load_explicit(&l->bits[block / 64], memory_order_acquire) >> (block % 64)) & 1);
}

uint64_t layer_owned_blocks(const struct layer *l)
{
    return atomic_load(&l->owned_blocks);
}

int layer_extent_at(struct layer *l, uint64_t off, uint64_t max_len, struct layer_extent *out)
{
    *out = (struct layer_extent){.kind = LAYER_EXTENT_UNOWNED, .fd = -1};
    if (off >= l->size)
        return -EINVAL;
    uint64_t end = max_len < l->size - off ? off + max_len : l->size;
    uint64_t block = off / LAYER_BLOCK_SIZE;
    bool owned = layer_owns(l, block);
    uint64_t run_end = (block + 1) * LAYER_BLOCK_SIZE;
    while (run_end < end && layer_owns(l, run_end / LAYER_BLOCK_SIZE) == owned)
        run_end += LAYER_BLOCK_SIZE;
    if (run_end > end)
        run_end = end;
    if (owned) {
        /* A hole in an owned run is a discarded range. */
        off_t d = lseek(l->data_fd, (off_t)off, SEEK_DATA);
        if (d == (off_t)off) {
            off_t h = lseek(l->data_fd, (off_t)off, SEEK_HOLE);
            if (h > (off_t)off && (uint64_t)h < run_end)
                run_end = (uint64_t)h;
            out->kind = LAYER_EXTENT_DATA;
            out->fd = l->data_fd;
            out->pos = off;
        } else {
            if (d > (off_t)off && (uint64_t)d < run_end)
                run_end = (uint64_t)d;
            out->kind = LAYER_EXTENT_ZERO;
        }
    }
    out->len = run_end - off;
    return 0;
}

void layer_extent_release(struct layer *l, struct layer_extent *e)
{
    (void)l;
    e->fd = -1;
}

int layer_read(struct layer *l, void *buf, size_t len, uint64_t off)
{
    if (off > l->size || len > l->size - off)
        return -EINVAL;
    for (uint64_t b = off / LAYER_BLOCK_SIZE; b * LAYER_BLOCK_SIZE < off + len; b++)
        if (!layer_owns(l, b))
            return -EINVAL;
    int rc = read_full_at(l->data_fd, buf, len, (off_t)off);
    return rc == -ENODATA ? -EIO : rc;
}

int layer_write(struct layer *l, const void *buf, size_t len, uint64_t off)
{
    if (off % LAYER_BLOCK_SIZE || off > l->size || len > l->size - off ||
        (len % LAYER_BLOCK_SIZE && off + len != l->size))
        return -EINVAL;
    int rc = write_full_at(l->data_fd, buf, len, (off_t)off);
    if (!rc)
        mark_owned(l, off / LAYER_BLOCK_SIZE, (len + LAYER_BLOCK_SIZE - 1) / LAYER_BLOCK_SIZE);
    return rc;
}

int layer_punch(struct layer *l, uint64_t first, uint64_t count)
{
    if (first > l->blocks || count > l->blocks - first)
        return -EINVAL;
    /* Whole blocks, even past a disk size that is not a multiple of 4 KiB:
     * a punch cut at the file's end would leave the last block allocated. */
    if (fallocate(l->data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(first * LAYER_BLOCK_SIZE),
                  (off_t)(count * LAYER_BLOCK_SIZE)) < 0)
        return -errno;
    mark_owned(l, first, count);
    return 0;
}

int layer_get_times(const struct layer *layer, struct timespec *atime, struct timespec *mtime)
{
    struct stat st;
    if (fstat(layer->data_fd, &st) < 0)
        return -errno;
    *atime = st.st_atim;
    *mtime = st.st_mtim;
    return 0;
}

int layer_set_times(struct layer *layer, const struct timespec times[2])
{
    return futimens(layer->data_fd, times) < 0 ? -errno : 0;
}
