/* disk: the one data path of a disk, a base version under a chain of
 * layers (a VM disk, a snapshot, or a base alone with no layer).
 *
 * A byte range maps to extents, in order: bytes of the topmost layer that
 * owns their blocks, bytes of one base chunk, or zeros (a blank disk, or an
 * all-zero base chunk, which is never stored). Every reader of a disk goes
 * through disk_map() or disk_read(): the FUSE reply (fs/ops.c), copy-up and
 * export (src/vm.c) and repo_read_range (src/repo.c).
 *
 * The base is reached only through a base source: the daemon's reads
 * through the chunk cache and the fetch engine, imgfsctl's straight from the
 * repository (repo_read_range), the unit tests' from memory. A layer is
 * reached only through layer.h.
 *
 * Threads: the functions read the chain as it is; the caller keeps it
 * stable (a VM's chain_lock held for reading).
 */
#ifndef IMGFS_DISK_H
#define IMGFS_DISK_H

#include <stddef.h>
#include <stdint.h>

#include "layer.h"
#include "manifest.h"

#define DISK_MAX_DEPTH 64

struct fetch_counters;
struct prefetch_marks;

/* A base version as disks see it; owned by the mount tree (or the caller).
 * counters and marks may be NULL outside the daemon. */
struct vm_base {
    const struct manifest *manifest;
    struct fetch_counters *counters;
    struct prefetch_marks *marks;
};

struct disk {
    uint64_t size;
    const struct vm_base *base; /* NULL for a blank disk */
    struct layer *layers[DISK_MAX_DEPTH];
    unsigned depth;
};

enum disk_extent_kind { DISK_EXTENT_LAYER, DISK_EXTENT_BASE, DISK_EXTENT_ZERO };

struct disk_extent {
    enum disk_extent_kind kind;
    uint64_t off, len;    /* bytes of the disk */
    struct layer *layer;  /* LAYER: the topmost layer owning them all */
    uint64_t chunk;       /* BASE: the base chunk that holds them all */
    uint64_t chunk_off;   /* BASE: where off is in that chunk */
};

/* Calls fn for each extent of [off, off + len) (cut at the disk's end) in
 * order; a base extent never crosses a chunk. Returns 0, or the first
 * non-zero value fn returned. */
typedef int (*disk_extent_fn)(void *ctx, const struct disk_extent *e);
int disk_map(const struct disk *disk, uint64_t off, uint64_t len, disk_extent_fn fn, void *ctx);

/* The base-source interface: copies len bytes at chunk_off of base chunk
 * index into buf. Returns 0 or a negative errno. */
struct base_source {
    int (*read)(void *ctx, const struct vm_base *base, uint64_t index, void *buf, size_t len, uint64_t chunk_off);
    void *ctx;
};

/* Reads len bytes of the disk at off into buf (a copy; the FUSE reply uses
 * disk_map for zero-copy). */
int disk_read(const struct disk *disk, const struct base_source *src, void *buf, size_t len, uint64_t off);

/* SEEK_DATA / SEEK_HOLE over the disk's layers and base. -ENXIO past the end. */
int64_t disk_seek(const struct disk *disk, uint64_t off, int whence);

/* Index of the topmost layer that owns block, or -1. */
int disk_owner_of(const struct disk *disk, uint64_t block);

#endif
