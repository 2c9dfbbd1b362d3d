/* lifecycle: the versions of a repository over time. Listing them with what
 * they store, retiring old ones, and removing the chunks that nothing
 * references any more (garbage collection). Local repositories only, except
 * lifecycle_scan, which reads any.
 *
 * Retire NAME@V (never the newest version of NAME):
 *   1. bases/NAME/V.retired is written (atomically), under the publish lock;
 *   2. V.manifest and V.lists/ are removed (V.digests stays: the signed
 *      records of later versions chain through it).
 * A killed retire leaves the marker, and gc finishes step 2. Readers treat a
 * version with a marker as gone: a mount skips it without an error.
 *
 * gc removes every chunk file that no remaining manifest references, and
 * the temp files of killed publishes. Prefetch lists reference chunks only
 * through the manifest of their version, so they keep nothing alive by
 * themselves; a version's lists go with it. gc holds the chunk lock
 * (repo.h) exclusively: publishers hold it shared from before their first
 * chunk until their index is written, so a chunk written or found by a
 * publish whose manifest is not written yet is never seen as garbage. gc
 * refuses to remove anything when a manifest that is not retired cannot be
 * read, since its chunks would look unreferenced.
 *
 * Hosts that still have a retired version mounted (or its manifest in
 * CACHE/meta) keep serving the chunks they have cached; after gc, their
 * reads of chunks they do not have fail with EIO. A VM stays on the version
 * it was created on: retire only versions that no VM on any host uses.
 *
 * Contract: single-threaded; functions return 0 or a negative errno with one
 * sentence in err.
 */
#ifndef IMGFS_LIFECYCLE_H
#define IMGFS_LIFECYCLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "repo.h"

#define LIFECYCLE_UNKNOWN UINT64_MAX /* stored sizes of an HTTP repository */

struct version_info {
    char name[65];
    uint64_t version;
    bool latest;
    bool retired;
    uint64_t created; /* seconds since the epoch */
    uint64_t size;
    uint64_t stored_chunks; /* distinct chunks it references */
    uint64_t stored_bytes;  /* their stored (compressed) size */
    uint64_t own_bytes;     /* of those, the ones no other version references:
                               what retire + gc would free */
};

/* Every version of every base (or of base name only, when not NULL), in
 * index order then version order. *out is malloc'd. */
int lifecycle_scan(struct repo *repo, const char *name, struct version_info **out, size_t *count, char *err,
                   size_t errlen);

int lifecycle_retire(const char *repo_path, const char *name, uint64_t version, char *err, size_t errlen);

struct gc_result {
    bool waited;  /* a publish held the chunk lock; gc waited for it */
    uint64_t versions;
    uint64_t chunks_kept;
    uint64_t bytes_kept;
    uint64_t chunks_removed;
    uint64_t bytes_removed;
    uint64_t temp_removed;
};

/* dry_run: count what would go, remove nothing. on_wait (may be NULL) is
 * called once before gc blocks on a running publish. */
int lifecycle_gc(const char *repo_path, bool dry_run, void (*on_wait)(void), struct gc_result *res, char *err,
                 size_t errlen);

#endif
