#include "layer.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
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

void layer_mark_owned(struct layer *l, uint64_t first, uint64_t count)
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
