/* repo_publish: the writer side of a repository (local directories only):
 * creating one, storing chunks and manifests, the publish and chunk locks,
 * signing and writing the index. repo.h is the reader.
 *
 * Publishers are serialised with an flock on "REPO/.publish.lock".
 * repo_has_chunk and repo_put_chunk may be called from several threads at
 * once; the rest is for one thread at a time per repo.
 */
#ifndef IMGFS_REPO_PUBLISH_H
#define IMGFS_REPO_PUBLISH_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "repo.h"

struct version_digests;

/* Kept inside each struct repo (repo_writer()); owned by it. */
struct repo_writer {
    int publish_lock_fd; /* -1 when not held */
    int chunks_lock_fd;  /* shared: publisher, exclusive: gc; -1 when not held */
    const struct sign_secret_key *signers; /* not owned */
    size_t signer_count;
    const struct version_digests *fresh; /* not owned; repo_set_fresh_digests */
    /* chunks/XY, opened on first use by whichever thread stores a chunk
     * there first (compare-and-swap); -1 until then; closed with the repo. */
    _Atomic int chunk_dirs[256];
};

/* For repo.c: sets up an unused writer, and drops its locks (repo_close). */
void repo_writer_init(struct repo_writer *w);
void repo_writer_release(struct repo *repo);

/* Opens a local repository for publishing, creating it when path does not
 * exist or is an empty directory. A non-empty directory that is not a
 * repository is refused. */
int repo_open_for_publish(const char *path, struct repo **out, char *err, size_t errlen);

/* The chunk lock, an flock on "REPO/.gc.lock": a publisher holds it shared
 * from before it first looks for or stores a chunk until its index is
 * written, so that gc (exclusive) never sees, and removes, a chunk that a
 * manifest about to be written references. wait false: -EWOULDBLOCK when
 * it is held the other way. */
int repo_lock_chunks(struct repo *repo, bool exclusive, bool wait);
void repo_unlock_chunks(struct repo *repo);
int repo_lock_publish(struct repo *repo);
void repo_unlock_publish(struct repo *repo);
bool repo_has_chunk(struct repo *repo, const struct chunk_hash *hash);
/* Stores an encoded chunk under its name unless it already exists: written
 * to an unnamed file (O_TMPFILE) that is linked in once complete, or where
 * the file system has no O_TMPFILE, to a temp name that is renamed. Either
 * way a chunk file is whole or absent. The file is not fsync'd here:
 * repo_sync() makes all stored chunks durable at once. */
int repo_put_chunk(struct repo *repo, const struct chunk_hash *hash, const void *enc, size_t len);
int repo_sync(struct repo *repo);
int repo_put_manifest(struct repo *repo, const struct manifest *m);
/* With signers (repo_set_signers), writes the digests records that are
 * missing for every version of every base (reading chunks back to hash them;
 * no chunk or manifest changes) and a signed index with sequence number
 * index->seq + 1. Without signers, writing over a signed index is refused
 * with -EPERM (publish with the key instead). */
int repo_write_index(struct repo *repo, const struct repo_index *index);
/* Keys that repo_write_index() and repo_sign_text() sign with (not copied:
 * they must outlive the repository). */
void repo_set_signers(struct repo *repo, const struct sign_secret_key *keys, size_t count);
size_t repo_signer_count(const struct repo *repo);
/* The chunk digests of the version a publisher is about to name in the
 * index (fresh->name, fresh->version), computed from the image bytes it
 * hashed and stored them from: repo_write_index() uses them instead of
 * reading those chunks back, when that version has no valid record yet and
 * fresh has its chunk count and its zero chunks. The record written is the
 * same bytes either way, except that a chunk the repository held already is
 * not read back, so a damaged copy of it is not noticed here (hosts refuse
 * it: it does not match its digest). Not copied: it must outlive the index
 * write, or be unset with NULL. */
void repo_set_fresh_digests(struct repo *repo, const struct version_digests *fresh);
/* True when the repository's index has signature lines (not verified). */
bool repo_is_signed(struct repo *repo);
/* Replaces any signature lines at the end of text[0..*len) (capacity cap) by
 * those of the signers. -ENOSPC when cap is too small. */
int repo_sign_text(struct repo *repo, char *text, size_t *len, size_t cap);

#endif
