/* repo_publish: the writer side of a repository (see repo_publish.h). */
#include "repo_publish.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "digests.h"
#include "util.h"

void repo_writer_init(struct repo_writer *w)
{
    memset(w, 0, sizeof(*w));
    w->publish_lock_fd = -1;
    w->chunks_lock_fd = -1;
    for (int i = 0; i < 256; i++)
        atomic_init(&w->chunk_dirs[i], -1);
}

void repo_writer_release(struct repo *repo)
{
    repo_unlock_publish(repo);
    repo_unlock_chunks(repo);
    struct repo_writer *w = repo_writer(repo);
    for (int i = 0; i < 256; i++) {
        int fd = atomic_exchange(&w->chunk_dirs[i], -1);
        if (fd >= 0)
            close(fd);
    }
}

static int writer_path(struct repo *repo, const char *relpath, char *out, size_t len)
{
    return path_join(out, len, "%s/%s", repo_location(repo), relpath);
}

static int create_layout(const char *path)
{
    char sub[PATH_MAX];
    int err = 0;
    for (int i = 0; i < 256 && !err; i++) {
        err = path_join(sub, sizeof(sub), "%s/chunks/%02x", path, i);
        if (!err)
            err = mkdir_p(sub);
    }
    if (!err)
        err = path_join(sub, sizeof(sub), "%s/bases", path);
    if (!err)
        err = mkdir_p(sub);
    if (!err)
        err = path_join(sub, sizeof(sub), "%s/index", path);
    if (!err)
        err = write_file_atomic(sub, REPO_INDEX_HEADER, strlen(REPO_INDEX_HEADER));
    /* The marker goes last: a half-created repository has none. */
    if (!err)
        err = path_join(sub, sizeof(sub), "%s/imgfs-repo", path);
    if (!err)
        err = write_file_atomic(sub, REPO_MARKER_TEXT, strlen(REPO_MARKER_TEXT));
    return err;
}

static bool dir_is_empty(const char *path)
{
    DIR *d = opendir(path);
    if (!d)
        return false;
    bool empty = true;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            empty = false;
            break;
        }
    }
    closedir(d);
    return empty;
}

int repo_open_for_publish(const char *path, struct repo **out, char *err, size_t errlen)
{
    if (strncmp(path, "http://", 7) == 0 || strncmp(path, "https://", 8) == 0) {
        snprintf(err, errlen, "publish needs a local repository directory, not a URL; publish locally and "
                              "serve that directory over HTTP");
        return -EINVAL;
    }
    char marker[PATH_MAX];
    int rc = path_join(marker, sizeof(marker), "%s/imgfs-repo", path);
    if (rc) {
        snprintf(err, errlen, "repository path is too long");
        return rc;
    }
    struct stat st;
    if (stat(path, &st) < 0) {
        rc = mkdir_p(path);
        if (rc) {
            snprintf(err, errlen, "cannot create repository %s: %s", path, strerror(-rc));
            return rc;
        }
    } else if (!S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "repository %s is not a directory", path);
        return -ENOTDIR;
    }
    if (access(marker, F_OK) < 0) {
        if (!dir_is_empty(path)) {
            snprintf(err, errlen, "%s is not empty and not an imgfs repository; refusing to publish into it", path);
            return -EEXIST;
        }
        rc = create_layout(path);
        if (rc) {
            snprintf(err, errlen, "cannot create repository %s: %s", path, strerror(-rc));
            return rc;
        }
    }
    return repo_open(path, out, err, errlen);
}

/* Takes flock(how) on REPO/name into *fd (which must hold none). */
static int lock_file(struct repo *repo, const char *name, int how, int *fd)
{
    char path[PATH_MAX];
    int err = writer_path(repo, name, path, sizeof(path));
    if (err)
        return err;
    int lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd < 0)
        return -errno;
    if (flock(lock_fd, how) < 0) { /* -EWOULDBLOCK under LOCK_NB */
        err = -errno;
        close(lock_fd);
        return err;
    }
    *fd = lock_fd;
    return 0;
}

static void unlock_file(int *fd)
{
    if (*fd >= 0) {
        close(*fd); /* closing drops the flock */
        *fd = -1;
    }
}

int repo_lock_publish(struct repo *repo)
{
    return lock_file(repo, ".publish.lock", LOCK_EX, &repo_writer(repo)->publish_lock_fd);
}

void repo_unlock_publish(struct repo *repo) { unlock_file(&repo_writer(repo)->publish_lock_fd); }

int repo_lock_chunks(struct repo *repo, bool exclusive, bool wait)
{
    return lock_file(repo, ".gc.lock", (exclusive ? LOCK_EX : LOCK_SH) | (wait ? 0 : LOCK_NB),
                     &repo_writer(repo)->chunks_lock_fd);
}

void repo_unlock_chunks(struct repo *repo) { unlock_file(&repo_writer(repo)->chunks_lock_fd); }

/* The directory of a chunk, chunks/XY, opened once per repository; it is
 * made again when a copying tool dropped it (git and some sync tools keep no
 * empty directories). Returns an fd owned by the writer, or a negative errno;
 * name gets the chunk's file name in it. */
static int chunk_dir(struct repo *repo, const struct chunk_hash *hash, char name[CHUNK_HASH_HEX + 1])
{
    chunk_hash_to_hex(hash, name);
    _Atomic int *slot = &repo_writer(repo)->chunk_dirs[hash->bytes[0]]; /* XY is the first byte */
    int fd = atomic_load(slot);
    if (fd >= 0)
        return fd;
    char dir[PATH_MAX];
    int err = path_join(dir, sizeof(dir), "%s/chunks/%.2s", repo_location(repo), name);
    if (err)
        return err;
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT && (mkdir(dir, 0755) == 0 || errno == EEXIST))
        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int none = -1;
    if (!atomic_compare_exchange_strong(slot, &none, fd)) { /* another thread was first */
        close(fd);
        fd = none;
    }
    return fd;
}

bool repo_has_chunk(struct repo *repo, const struct chunk_hash *hash)
{
    char name[CHUNK_HASH_HEX + 1];
    int dir = chunk_dir(repo, hash, name);
    return dir >= 0 && faccessat(dir, name, F_OK, 0) == 0;
}

static atomic_uint put_serial;

/* A temp name next to the chunk, renamed over it: for file systems without
 * O_TMPFILE. A killed publish leaves the temp file (gc removes it). */
static int put_by_rename(int dir, const char *name, const void *enc, size_t len)
{
    char tmp[CHUNK_HASH_HEX + 48];
    snprintf(tmp, sizeof(tmp), "%s.tmp.%ld.%u", name, (long)getpid(),
             atomic_fetch_add(&put_serial, 1)); /* unique between threads too */
    int fd = openat(dir, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    int err = write_full(fd, enc, len);
    if (close(fd) < 0 && !err)
        err = -errno;
    if (!err && renameat(dir, tmp, dir, name) < 0)
        err = -errno;
    if (err)
        unlinkat(dir, tmp, 0);
    return err;
}

int repo_put_chunk(struct repo *repo, const struct chunk_hash *hash, const void *enc, size_t len)
{
    char name[CHUNK_HASH_HEX + 1];
    int dir = chunk_dir(repo, hash, name);
    if (dir < 0)
        return dir;
    /* An unnamed file, given its name once it is complete: nothing of a
     * killed publish is left behind, and there is no temp name to create and
     * rename (fewer directory updates than put_by_rename). */
    int fd = openat(dir, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
        return -errno;
    if (fd >= 0) {
        int err = write_full(fd, enc, len);
        char self[32];
        snprintf(self, sizeof(self), "/proc/self/fd/%d", fd);
        bool linked = !err && (linkat(AT_FDCWD, self, dir, name, AT_SYMLINK_FOLLOW) == 0 || errno == EEXIST);
        if (close(fd) < 0 && !err)
            err = -errno;
        if (err || linked) /* EEXIST: another publisher stored the same bytes */
            return err;
        /* No /proc to name the file by: the old way. */
    }
    if (faccessat(dir, name, F_OK, 0) == 0)
        return 0;
    return put_by_rename(dir, name, enc, len);
}

int repo_sync(struct repo *repo)
{
    int fd = open(repo_location(repo), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int err = syncfs(fd) < 0 ? -errno : 0;
    close(fd);
    return err;
}

int repo_put_manifest(struct repo *repo, const struct manifest *m)
{
    char dir[PATH_MAX], path[PATH_MAX];
    int err = path_join(dir, sizeof(dir), "%s/bases/%s", repo_location(repo), m->name);
    if (!err)
        err = path_join(path, sizeof(path), "%s/%" PRIu64 ".manifest", dir, m->version);
    if (!err)
        err = mkdir_p(dir);
    if (!err)
        err = fsync_dir_of(dir);
    if (err)
        return err;
    char *text;
    size_t len;
    err = manifest_format(m, &text, &len);
    if (err)
        return err;
    err = write_file_atomic(path, text, len);
    free(text);
    return err;
}

void repo_set_signers(struct repo *repo, const struct sign_secret_key *keys, size_t count)
{
    struct repo_writer *wr = repo_writer(repo);
    wr->signers = keys;
    wr->signer_count = count;
}

void repo_set_fresh_digests(struct repo *repo, const struct version_digests *fresh)
{
    repo_writer(repo)->fresh = fresh;
}

size_t repo_signer_count(const struct repo *repo) { return repo_writer((struct repo *)repo)->signer_count; }

bool repo_is_signed(struct repo *repo)
{
    char *data;
    size_t len;
    unsigned sigs = 0;
    if (repo_get(repo, "index", REPO_MAX_INDEX_LEN, &data, &len) == 0) {
        sign_body_len(data, len, &sigs);
        free(data);
    }
    return sigs > 0;
}

int repo_sign_text(struct repo *repo, char *text, size_t *len, size_t cap)
{
    size_t body = sign_body_len(text, *len, NULL);
    if (body + repo_writer(repo)->signer_count * SIGN_LINE_LEN + 1 > cap)
        return -ENOSPC;
    size_t pos = body;
    for (size_t i = 0; i < repo_writer(repo)->signer_count; i++) {
        sign_line(&repo_writer(repo)->signers[i], text, body, text + pos);
        pos += SIGN_LINE_LEN;
    }
    *len = pos;
    return 0;
}

/* True when fresh holds the chunk digests of m under alg: its name, version
 * and chunk count, and a digest exactly where m has a data chunk. */
static bool fresh_describes(const struct version_digests *fresh, const struct manifest *m,
                            enum sign_digest_alg alg)
{
    static const struct sign_digest zero;
    if (!fresh || strcmp(fresh->name, m->name) != 0 || fresh->version != m->version ||
        fresh->chunk_count != m->chunk_count || fresh->chunk_alg != alg)
        return false;
    for (uint64_t i = 0; i < m->chunk_count; i++)
        if (chunk_hash_is_null(&m->chunks[i]) != sign_digest_equal(&fresh->chunks[i], &zero))
            return false;
    return true;
}

/* The digests record of m (whose file bytes are text). Its chunk digests are
 * the publisher's (fresh) when they describe m; otherwise the chunks are
 * read back from the repository, each decoded and checked against its name
 * before it is hashed, so a damaged chunk is never signed. */
static int compute_record(struct repo *repo, const struct manifest *m, const char *text, size_t len,
                          const struct sign_digest *previous, const struct version_digests *fresh,
                          struct version_digests **out)
{
    struct version_digests *d = digests_new(m->chunk_count);
    bool known = d && fresh_describes(fresh, m, d->chunk_alg);
    char *chunk = known ? NULL : malloc(m->chunk_size);
    int rc = d && (known || chunk) ? 0 : -ENOMEM;
    if (!rc && known && m->chunk_count)
        memcpy(d->chunks, fresh->chunks, m->chunk_count * sizeof(*d->chunks));
    for (uint64_t i = 0; !rc && !known && i < m->chunk_count; i++) {
        if (chunk_hash_is_null(&m->chunks[i]))
            continue;
        char *enc = NULL;
        size_t enc_len = 0;
        rc = repo_get_chunk(repo, &m->chunks[i], m->chunk_size, 0, &enc, &enc_len, NULL);
        if (!rc)
            rc = chunkfmt_decode(enc, enc_len, chunk, m->chunk_size, &m->chunks[i]);
        free(enc);
        if (!rc)
            rc = sign_digest_compute_alg(d->chunk_alg, chunk, m->chunk_size, &d->chunks[i]);
        if (rc)
            log_error("chunk %" PRIu64 " of %s@%" PRIu64 " is missing or damaged: %s", i, m->name, m->version,
                      strerror(-rc));
    }
    free(chunk);
    if (rc) {
        digests_free(d);
        return rc;
    }
    snprintf(d->name, sizeof(d->name), "%s", m->name);
    d->version = m->version;
    sign_digest_compute(text, len, &d->manifest);
    d->has_previous = previous != NULL;
    if (previous)
        d->previous = *previous;
    *out = d;
    return 0;
}

/* Makes sure versions 1..latest of name have records that chain, writing the
 * missing (or broken) ones; *top gets the digest of latest's record. */
static int ensure_records(struct repo *repo, const char *name, uint64_t latest, struct sign_digest *top)
{
    struct sign_digest previous;
    for (uint64_t v = 1; v <= latest; v++) {
        char rel[160], path[PATH_MAX];
        char *mtext = NULL, *rtext = NULL;
        size_t mlen, rlen;
        struct manifest *m = NULL;
        struct version_digests *d = NULL;
        char why[200];
        int rc = path_join(rel, sizeof(rel), "bases/%s/%" PRIu64 ".manifest", name, v);
        if (!rc)
            rc = repo_get(repo, rel, REPO_MAX_MANIFEST_LEN, &mtext, &mlen);
        if (!rc && (rc = manifest_parse(mtext, mlen, &m, why, sizeof(why))) != 0)
            log_error("manifest %s@%" PRIu64 " cannot be signed: %s", name, v, why);
        if (!rc)
            rc = digests_relpath(name, v, rel, sizeof(rel));
        /* An existing record is kept when it still describes the manifest
         * and its predecessor: signing again changes no record. */
        bool keep = false;
        if (!rc && repo_get(repo, rel, REPO_MAX_DIGESTS_LEN, &rtext, &rlen) == 0 &&
            digests_parse(rtext, rlen, &d, why, sizeof(why)) == 0) {
            keep = digests_check(d, m, mtext, mlen, why, sizeof(why)) == 0 && d->has_previous == (v > 1) &&
                   (v == 1 || sign_digest_equal(&d->previous, &previous));
            if (keep)
                sign_digest_compute(rtext, rlen, &previous);
        }
        if (!rc && !keep) {
            digests_free(d);
            d = NULL;
            char *text = NULL;
            size_t len = 0;
            rc = compute_record(repo, m, mtext, mlen, v > 1 ? &previous : NULL, repo_writer(repo)->fresh, &d);
            if (!rc)
                rc = digests_format(d, &text, &len);
            if (!rc)
                rc = writer_path(repo, rel, path, sizeof(path));
            if (!rc)
                rc = write_file_atomic(path, text, len);
            if (!rc)
                sign_digest_compute(text, len, &previous);
            free(text);
        }
        digests_free(d);
        manifest_free(m);
        free(mtext);
        free(rtext);
        if (rc)
            return rc;
    }
    *top = previous;
    return 0;
}

int repo_write_index(struct repo *repo, const struct repo_index *index)
{
    if (index->is_signed && !repo_writer(repo)->signer_count)
        return -EPERM;
    struct sign_digest *records = calloc(index->count + 1, sizeof(*records));
    if (!records)
        return -ENOMEM;
    int err = 0;
    for (size_t i = 0; repo_writer(repo)->signer_count && !err && i < index->count; i++)
        err = ensure_records(repo, index->entries[i].name, index->entries[i].latest, &records[i]);
    size_t cap = strlen(REPO_INDEX_HEADER) + index->count * (96 + SIGN_DIGEST_HEX) + 128 +
                 repo_writer(repo)->signer_count * SIGN_LINE_LEN;
    char *buf = err ? NULL : malloc(cap);
    if (!err && !buf)
        err = -ENOMEM;
    size_t pos = 0;
    if (!err) {
        pos = (size_t)snprintf(buf, cap, "%s", REPO_INDEX_HEADER);
        for (size_t i = 0; i < index->count; i++) {
            pos += (size_t)snprintf(buf + pos, cap - pos, "%s %" PRIu64, index->entries[i].name,
                                    index->entries[i].latest);
            if (repo_writer(repo)->signer_count) {
                buf[pos++] = ' ';
                sign_digest_to_hex(&records[i], buf + pos);
                pos += SIGN_DIGEST_HEX;
            }
            buf[pos++] = '\n';
        }
        if (repo_writer(repo)->signer_count) {
            pos += (size_t)snprintf(buf + pos, cap - pos, "+seq %" PRIu64 "\n+time %" PRIu64 "\n", index->seq + 1,
                                    (uint64_t)time(NULL));
            err = repo_sign_text(repo, buf, &pos, cap);
        }
    }
    char path[PATH_MAX];
    if (!err)
        err = writer_path(repo, "index", path, sizeof(path));
    if (!err)
        err = write_file_atomic(path, buf, pos);
    free(buf);
    free(records);
    return err;
}
