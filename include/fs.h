/* fs: the FUSE side of imgfs (low-level API).
 *
 * Base version files are served read-only from pinned cache files with
 * zero-copy replies (splice from the cache file), and with keep_cache so
 * that the kernel page cache keeps their pages across opens: the bytes of a
 * version never change. Status files are rendered when opened and served
 * with direct_io, so `cat` always sees a fresh, complete snapshot.
 *
 * Contract: struct imgfs is created by the daemon before the session starts
 * and outlives it; every member is thread-safe (see each module's header).
 */
#ifndef IMGFS_FS_H
#define IMGFS_FS_H

#include <fuse_lowlevel.h>
#include <stddef.h>
#include <time.h>

#include "cache.h"
#include "fetch.h"
#include "options.h"
#include "repo.h"
#include "tree.h"

struct imgfs {
    const struct mount_options *opts;
    struct repo *repo;
    struct cache *cache;
    struct fetcher *fetcher;
    struct tree *tree;
    double started;    /* now_seconds() at mount */
    time_t mounted_at; /* wall clock at mount, for directory times */
};

extern const struct fuse_lowlevel_ops imgfs_ops;

/* Renders .imgfs/stats into a malloc'd buffer. */
int status_render_stats(struct imgfs *fs, char **text, size_t *len);

#endif
