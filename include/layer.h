/* layer: one differential layer of a VM disk.
 *
 * On disk, in the state directory, a layer ID is two files:
 *   layers/ID.data   sparse file of the disk's size; a block the layer owns
 *                    lives at its own offset (a hole in an owned block reads
 *                    as zeros, which is how discarded ranges are kept)
 *   layers/ID.map    ownership bitmap, one bit per LAYER_BLOCK_SIZE block,
 *                    after a 64-byte header ("imgfs-layer-map 1", disk size);
 *                    preallocated, so updating it never needs new space
 *
 * Crash consistency. A bit goes from 0 to 1 only, and reaches the map file
 * only in layer_flush(), after fdatasync() of the data file. So on disk a set
 * bit always covers data that is durable: after a crash the layer shows every
 * write that was flushed, and for unflushed writes either the new bytes or
 * the old ones (of that write's blocks only). Bits are independent, so a torn
 * write of the map itself loses at most unflushed bits. Reopening needs no
 * repair.
 *
 * Contract: layer_owns() may be called from any thread without locking.
 * Writes to one layer are serialised by the caller (the VM's write lock);
 * layer_flush() may run concurrently with writes.
 */
#ifndef IMGFS_LAYER_H
#define IMGFS_LAYER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LAYER_BLOCK_SIZE 4096u
#define LAYER_ID_LEN 16

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

/* Creates a new, empty layer with a fresh random ID in dir. */
int layer_create(const char *dir, uint64_t size, struct layer **out);
/* Opens an existing layer; -EBADMSG if its map does not match size. */
int layer_open(const char *dir, const char *id, uint64_t size, struct layer **out);
void layer_close(struct layer *layer);
/* Removes a layer's files. */
int layer_remove(const char *dir, const char *id);

static inline bool layer_owns(const struct layer *layer, uint64_t block)
{
    return (atomic_load_explicit(&layer->bits[block / 64], memory_order_acquire) >> (block % 64)) & 1;
}

/* Marks blocks [first, first+count) as owned (after their data was written). */
void layer_mark_owned(struct layer *layer, uint64_t first, uint64_t count);

/* Makes every write and ownership change so far durable. */
int layer_flush(struct layer *layer);

/* Bytes of space the layer's data uses on disk. */
uint64_t layer_allocated_bytes(const struct layer *layer);

#endif
