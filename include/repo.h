/* repo: access to a repository of published base images.
 *
 * A repository is a tree of static files, so a plain directory or any web
 * server can hold it:
 *
 *   imgfs-repo                  marker: "imgfs-repo 1\n"
 *   index                       "imgfs-index 1\n" then "NAME LATEST\n" per base;
 *                               replaced atomically by each publish
 *   bases/NAME/N.manifest       version N of NAME (see manifest.h); immutable
 *   chunks/XY/XYZ...            a stored chunk named by its hash (chunkfmt.h);
 *                               immutable, written once
 *
 * Versions 1..LATEST of a base all exist; they are never modified.
 *
 * Readers (repo_get and the helpers built on it) are thread-safe and hold no
 * lock while doing I/O. The writer side (publish) is for local directories
 * only and serialises publishers with an flock on "REPO/.publish.lock".
 */
#ifndef IMGFS_REPO_H
#define IMGFS_REPO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunkfmt.h"
#include "hash.h"
#include "manifest.h"

struct repo;

struct repo_index_entry {
    char name[65];
    uint64_t latest;
};

struct repo_index {
    struct repo_index_entry *entries;
    size_t count;
};

/* Limits for reading repository files. */
#define REPO_MAX_INDEX_LEN (16u << 20)
#define REPO_MAX_MANIFEST_LEN (256u << 20)

/* Opens an existing repository: a local directory or an http(s):// URL.
 * Returns -ENOENT / -EBADMSG / -EIO with one sentence in err. */
int repo_open(const char *location, struct repo **out, char *err, size_t errlen);

/* Opens a local repository for publishing, creating it when path does not
 * exist or is an empty directory. A non-empty directory that is not a
 * repository is refused. */
int repo_open_for_publish(const char *path, struct repo **out, char *err, size_t errlen);

void repo_close(struct repo *repo);

const char *repo_location(const struct repo *repo);
bool repo_is_local(const struct repo *repo);

/* Fetches one repository file into a malloc'd, NUL-terminated buffer.
 * -ENOENT when it does not exist, -EFBIG when larger than max_len, another
 * negative errno (typically -EIO or -ETIMEDOUT) when the repository could not
 * be reached. */
int repo_get(struct repo *repo, const char *relpath, size_t max_len, char **data, size_t *len);

int repo_read_index(struct repo *repo, struct repo_index *out, char *err, size_t errlen);
void repo_index_free(struct repo_index *index);
/* Returns the entry for name, or NULL. */
const struct repo_index_entry *repo_index_find(const struct repo_index *index, const char *name);

int repo_read_manifest(struct repo *repo, const char *name, uint64_t version, struct manifest **out,
                       char *err, size_t errlen);

/* Fetches the stored (encoded) bytes of one chunk. */
int repo_get_chunk(struct repo *repo, const struct chunk_hash *hash, uint32_t chunk_size, char **enc,
                   size_t *len);

/* "chunks/ab/ab01..." for hash. out must hold at least 48 bytes. */
void repo_chunk_relpath(const struct chunk_hash *hash, char *out, size_t len);

/* Writer side (local repositories only). */
int repo_lock_publish(struct repo *repo);
void repo_unlock_publish(struct repo *repo);
bool repo_has_chunk(struct repo *repo, const struct chunk_hash *hash);
/* Stores an encoded chunk under its name unless it already exists. The file
 * is not fsync'd here: repo_sync() makes all stored chunks durable at once. */
int repo_put_chunk(struct repo *repo, const struct chunk_hash *hash, const void *enc, size_t len);
int repo_sync(struct repo *repo);
int repo_put_manifest(struct repo *repo, const struct manifest *m);
int repo_write_index(struct repo *repo, const struct repo_index *index);

#endif
