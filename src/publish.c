#include "publish.h"

#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chunkfmt.h"
#include "image.h"
#include "manifest.h"
#include "progress.h"
#include "repo.h"
#include "util.h"

/* Source names land in the manifest: keep them printable and on one line. */
static void describe_source(const char *path, const char *format, char *out, size_t len)
{
    char copy[PATH_MAX];
    snprintf(copy, sizeof(copy), "%s", path);
    snprintf(out, len, "%s %s", basename(copy), format);
    for (char *p = out; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p == 0x7f)
            *p = '?';
}

/* Reads, hashes and stores every chunk of img into m->chunks. */
static int store_chunks(struct image *img, const char *image_path, struct repo *repo, struct manifest *m, int level,
                        struct publish_result *res, char *err, size_t errlen)
{
    const uint32_t cs = m->chunk_size;
    char *data = malloc(cs);
    size_t enc_cap = chunkfmt_bound(cs);
    char *enc = malloc(enc_cap);
    int rc = 0;
    if (!data || !enc) {
        snprintf(err, errlen, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    struct progress bar;
    progress_start(&bar, "publishing", m->size);
    for (uint64_t i = 0; i < m->chunk_count; i++) {
        uint64_t off = i * cs;
        size_t len = m->size - off < cs ? (size_t)(m->size - off) : cs;
        rc = image_read(img, data, len, off);
        if (rc) {
            snprintf(err, errlen, "cannot read %s at offset %" PRIu64 " (truncated or damaged image?): %s",
                     image_path, off, strerror(-rc));
            goto out;
        }
        memset(data + len, 0, cs - len); /* the last chunk is zero-padded */
        res->bytes_read += len;
        if (buffer_is_zero(data, cs)) {
            res->chunks_zero++;
        } else {
            chunk_hash_compute(data, cs, &m->chunks[i]);
            if (repo_has_chunk(repo, &m->chunks[i])) {
                res->chunks_reused++;
            } else {
                long n = chunkfmt_encode(data, cs, level, enc, enc_cap);
                rc = n < 0 ? (int)n : repo_put_chunk(repo, &m->chunks[i], enc, (size_t)n);
                if (rc) {
                    snprintf(err, errlen, "cannot store a chunk in the repository: %s", strerror(-rc));
                    goto out;
                }
                res->chunks_new++;
                res->bytes_stored += (uint64_t)n;
            }
        }
        progress_update(&bar, res->bytes_read);
    }
    progress_finish(&bar);
out:
    free(data);
    free(enc);
    return rc;
}

/* Records version as the latest of name in the index, which is rewritten. */
static int set_latest(struct repo *repo, const char *name, uint64_t version, char *err, size_t errlen)
{
    struct repo_index index;
    int rc = repo_read_index(repo, &index, err, errlen);
    if (rc)
        return rc;
    struct repo_index_entry *entry = (struct repo_index_entry *)repo_index_find(&index, name);
    if (!entry) {
        struct repo_index_entry *grown = realloc(index.entries, (index.count + 1) * sizeof(*grown));
        if (!grown) {
            repo_index_free(&index);
            snprintf(err, errlen, "out of memory");
            return -ENOMEM;
        }
        index.entries = grown;
        entry = &index.entries[index.count++];
        snprintf(entry->name, sizeof(entry->name), "%s", name);
    }
    entry->latest = version;
    rc = repo_write_index(repo, &index);
    repo_index_free(&index);
    if (rc == -EPERM)
        snprintf(err, errlen, "the repository is signed: publish with --key KEYFILE");
    else if (rc)
        snprintf(err, errlen, "cannot write the repository index: %s", strerror(-rc));
    return rc;
}

static int next_version(struct repo *repo, const char *name, uint64_t *version, char *err, size_t errlen)
{
    struct repo_index index;
    int rc = repo_read_index(repo, &index, err, errlen);
    if (rc)
        return rc;
    const struct repo_index_entry *found = repo_index_find(&index, name);
    *version = found ? found->latest + 1 : 1;
    repo_index_free(&index);
    return 0;
}

int publish_image(const struct publish_options *opts, struct publish_result *res, char *err, size_t errlen)
{
    memset(res, 0, sizeof(*res));
    if (!name_is_valid(opts->name)) {
        snprintf(err, errlen,
                 "invalid base name '%s': use 1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'",
                 opts->name);
        return -EINVAL;
    }
    if (!manifest_chunk_size_valid(opts->chunk_size)) {
        snprintf(err, errlen, "chunk size must be a power of two between 4K and 16M");
        return -EINVAL;
    }
    struct image *img;
    int rc = image_open(opts->image_path, &img, err, errlen);
    if (rc)
        return rc;
    uint64_t size = image_size(img);
    if (size == 0 || size > MANIFEST_MAX_DISK_SIZE) {
        snprintf(err, errlen, "image %s has an unsupported virtual size (%" PRIu64 " bytes)", opts->image_path,
                 size);
        image_close(img);
        return -EINVAL;
    }
    /* Refused before the manifest is allocated. */
    if ((size + opts->chunk_size - 1) / opts->chunk_size > MANIFEST_MAX_CHUNKS) {
        snprintf(err, errlen,
                 "image %s claims %" PRIu64 " bytes, more than %llu chunks of %" PRIu32
                 " bytes (a manifest holds at most 1 TiB at 128K chunks, 128 TiB with --chunk-size 16M)",
                 opts->image_path, size, MANIFEST_MAX_CHUNKS, opts->chunk_size);
        image_close(img);
        return -EFBIG;
    }
    struct repo *repo;
    rc = repo_open_for_publish(opts->repo_path, &repo, err, errlen);
    if (rc) {
        image_close(img);
        return rc;
    }
    repo_set_signers(repo, opts->keys, opts->key_count);
    struct manifest *m = manifest_new((size + opts->chunk_size - 1) / opts->chunk_size);
    if (!m) {
        snprintf(err, errlen, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    snprintf(m->name, sizeof(m->name), "%s", opts->name);
    m->size = size;
    m->chunk_size = opts->chunk_size;
    m->created = (uint64_t)time(NULL);
    describe_source(opts->image_path, image_format(img), m->source, sizeof(m->source));
    res->size = size;
    snprintf(res->format, sizeof(res->format), "%s", image_format(img));

    rc = store_chunks(img, opts->image_path, repo, m, opts->zstd_level, res, err, errlen);
    if (rc)
        goto out;
    rc = repo_sync(repo);
    if (rc) {
        snprintf(err, errlen, "cannot flush the repository to disk: %s", strerror(-rc));
        goto out;
    }
    /* The version number is taken under the lock so that two publishers of
     * one name get distinct versions; chunk storage above needs no lock. */
    rc = repo_lock_publish(repo);
    if (rc) {
        snprintf(err, errlen, "cannot lock the repository for publishing: %s", strerror(-rc));
        goto out;
    }
    rc = next_version(repo, opts->name, &m->version, err, errlen);
    if (!rc) {
        rc = repo_put_manifest(repo, m);
        if (rc)
            snprintf(err, errlen, "cannot write the manifest: %s", strerror(-rc));
    }
    if (!rc)
        rc = set_latest(repo, opts->name, m->version, err, errlen);
    if (!rc)
        res->version = m->version;
    repo_unlock_publish(repo);
out:
    manifest_free(m);
    repo_close(repo);
    image_close(img);
    return rc;
}
