#include "lifecycle.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "repo_publish.h"
#include "util.h"

/* ---- a set of chunk hashes, each with how many versions reference it ------------- */

struct chunk_ref {
    struct chunk_hash hash;
    uint32_t refs; /* 0: empty slot */
    uint32_t last_version; /* index of the last version that counted it */
};

struct chunk_set {
    struct chunk_ref *slots;
    size_t cap; /* a power of two */
    size_t count;
};

static void set_free(struct chunk_set *s) { free(s->slots); }

static struct chunk_ref *set_find(const struct chunk_set *s, const struct chunk_hash *h)
{
    if (!s->cap)
        return NULL;
    for (size_t i = chunk_hash_bucket(h) & (s->cap - 1);; i = (i + 1) & (s->cap - 1)) {
        if (!s->slots[i].refs)
            return NULL;
        if (chunk_hash_equal(&s->slots[i].hash, h))
            return &s->slots[i];
    }
}

static int set_grow(struct chunk_set *s)
{
    struct chunk_set bigger = {calloc(s->cap ? s->cap * 2 : 4096, sizeof(struct chunk_ref)), s->cap ? s->cap * 2 : 4096,
                               s->count};
    if (!bigger.slots)
        return -ENOMEM;
    for (size_t i = 0; i < s->cap; i++) {
        if (!s->slots[i].refs)
            continue;
        size_t j = chunk_hash_bucket(&s->slots[i].hash) & (bigger.cap - 1);
        while (bigger.slots[j].refs)
            j = (j + 1) & (bigger.cap - 1);
        bigger.slots[j] = s->slots[i];
    }
    free(s->slots);
    *s = bigger;
    return 0;
}

/* Counts one more version (number who, from 1) referencing h; a version
 * that references a chunk twice counts once. */
static int set_add(struct chunk_set *s, const struct chunk_hash *h, uint32_t who)
{
    struct chunk_ref *r = set_find(s, h);
    if (r) {
        if (r->last_version != who)
            r->refs++, r->last_version = who;
        return 0;
    }
    if ((s->count + 1) * 4 > s->cap * 3 && set_grow(s) != 0)
        return -ENOMEM;
    size_t i = chunk_hash_bucket(h) & (s->cap - 1);
    while (s->slots[i].refs)
        i = (i + 1) & (s->cap - 1);
    s->slots[i] = (struct chunk_ref){*h, 1, who};
    s->count++;
    return 0;
}

/* ---- reading every version ---------------------------------------------------------- */

/* Stored size of a chunk file of a local repository, or LIFECYCLE_UNKNOWN. */
static uint64_t chunk_file_size(struct repo *repo, const struct chunk_hash *h)
{
    char rel[64], path[PATH_MAX];
    struct stat st;
    repo_chunk_relpath(h, rel, sizeof(rel));
    if (!repo_is_local(repo) || path_join(path, sizeof(path), "%s/%s", repo_location(repo), rel) != 0 ||
        stat(path, &st) != 0)
        return LIFECYCLE_UNKNOWN;
    return (uint64_t)st.st_size;
}

/* Every version's manifest (NULL when retired), and the set of chunks they
 * reference. A manifest that is not retired and cannot be read fails. */
struct repo_scan {
    struct version_info *versions;
    struct manifest **manifests;
    size_t count;
    struct chunk_set chunks;
};

static void scan_free(struct repo_scan *s)
{
    for (size_t i = 0; i < s->count; i++)
        manifest_free(s->manifests[i]);
    free(s->manifests);
    free(s->versions);
    set_free(&s->chunks);
    memset(s, 0, sizeof(*s));
}

static int scan_repo(struct repo *repo, const char *only, struct repo_scan *s, char *err, size_t errlen)
{
    memset(s, 0, sizeof(*s));
    struct repo_index index;
    int rc = repo_read_index(repo, &index, err, errlen);
    if (rc)
        return rc;
    size_t total = 0;
    for (size_t i = 0; i < index.count; i++)
        total += index.entries[i].latest;
    s->versions = calloc(total ? total : 1, sizeof(*s->versions));
    s->manifests = calloc(total ? total : 1, sizeof(*s->manifests));
    if (!s->versions || !s->manifests) {
        snprintf(err, errlen, "out of memory");
        rc = -ENOMEM;
    }
    for (size_t i = 0; !rc && i < index.count; i++) {
        const struct repo_index_entry *e = &index.entries[i];
        for (uint64_t v = 1; !rc && v <= e->latest; v++) {
            struct version_info *info = &s->versions[s->count];
            snprintf(info->name, sizeof(info->name), "%s", e->name);
            info->version = v;
            info->latest = v == e->latest;
            struct manifest *m = NULL;
            /* Over HTTP the marker is asked for only when the manifest is
             * not there: one request per version. */
            rc = repo_read_manifest(repo, e->name, v, &m, err, errlen);
            /* A local one is checked in any case: a killed retire leaves its
             * marker beside the manifest, and gc finishes it. The newest
             * version is never retired, whatever a stray marker says. */
            if ((rc || repo_is_local(repo)) && !info->latest && repo_version_retired(repo, e->name, v)) {
                manifest_free(m);
                m = NULL;
                info->retired = true;
                rc = 0;
                err[0] = '\0';
            } else if (rc == 0) {
                info->created = m->created;
                info->size = m->size;
                for (uint64_t c = 0; !rc && c < m->chunk_count; c++)
                    if (!chunk_hash_is_null(&m->chunks[c]))
                        rc = set_add(&s->chunks, &m->chunks[c], (uint32_t)s->count + 1);
                if (rc)
                    snprintf(err, errlen, "out of memory");
            }
            s->manifests[s->count++] = m;
        }
    }
    repo_index_free(&index);
    if (!rc && only) {
        bool found = false;
        for (size_t i = 0; i < s->count; i++)
            found |= strcmp(s->versions[i].name, only) == 0;
        if (!found) {
            snprintf(err, errlen, "the repository has no base %s", only);
            rc = -ENOENT;
        }
    }
    if (rc)
        scan_free(s);
    return rc;
}

int lifecycle_scan(struct repo *repo, const char *name, struct version_info **out, size_t *count, char *err,
                   size_t errlen)
{
    struct repo_scan s;
    int rc = scan_repo(repo, name, &s, err, errlen);
    if (rc)
        return rc;
    size_t kept = 0;
    for (size_t i = 0; i < s.count; i++) {
        struct version_info info = s.versions[i];
        const struct manifest *m = s.manifests[i];
        if (name && strcmp(info.name, name) != 0)
            continue;
        for (uint64_t c = 0; m && c < m->chunk_count; c++) {
            struct chunk_ref *r = chunk_hash_is_null(&m->chunks[c]) ? NULL : set_find(&s.chunks, &m->chunks[c]);
            if (!r || r->last_version == UINT32_MAX - (uint32_t)i)
                continue; /* zero, or counted for this version already */
            r->last_version = UINT32_MAX - (uint32_t)i;
            uint64_t bytes = chunk_file_size(repo, &m->chunks[c]);
            info.stored_chunks++;
            if (info.stored_bytes != LIFECYCLE_UNKNOWN)
                info.stored_bytes = bytes == LIFECYCLE_UNKNOWN ? LIFECYCLE_UNKNOWN : info.stored_bytes + bytes;
            if (r->refs == 1 && info.own_bytes != LIFECYCLE_UNKNOWN)
                info.own_bytes = bytes == LIFECYCLE_UNKNOWN ? LIFECYCLE_UNKNOWN : info.own_bytes + bytes;
        }
        s.versions[kept++] = info;
    }
    *out = s.versions;
    *count = kept;
    s.versions = NULL;
    scan_free(&s);
    return 0;
}

/* ---- retire ---------------------------------------------------------------------------- */

/* Removes bases/NAME/V.manifest and V.lists/ of a retired version. */
static int remove_retired_files(const char *root, const char *name, uint64_t version)
{
    char path[PATH_MAX], dir[PATH_MAX];
    int rc = path_join(path, sizeof(path), "%s/bases/%s/%" PRIu64 ".manifest", root, name, version);
    if (!rc && unlink(path) < 0 && errno != ENOENT)
        rc = -errno;
    if (!rc)
        rc = path_join(dir, sizeof(dir), "%s/bases/%s/%" PRIu64 ".lists", root, name, version);
    DIR *d = rc ? NULL : opendir(dir);
    struct dirent *de;
    while (d && (de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        if (path_join(path, sizeof(path), "%s/%s", dir, de->d_name) == 0 && unlink(path) < 0 && !rc)
            rc = -errno;
    }
    if (d) {
        closedir(d);
        if (!rc && rmdir(dir) < 0)
            rc = -errno;
    }
    if (!rc)
        rc = path_join(dir, sizeof(dir), "%s/bases/%s", root, name);
    if (!rc)
        rc = fsync_dir(dir);
    return rc;
}

int lifecycle_retire(const char *repo_path, const char *name, uint64_t version, char *err, size_t errlen)
{
    if (strstr(repo_path, "://")) {
        snprintf(err, errlen, "retire works on a local repository directory, not %s", repo_path);
        return -EINVAL;
    }
    struct repo *repo;
    int rc = repo_open(repo_path, &repo, err, errlen);
    if (rc)
        return rc;
    struct repo_index index = {0};
    if ((rc = repo_lock_publish(repo)) != 0) {
        snprintf(err, errlen, "cannot lock the repository: %s", strerror(-rc));
        goto out;
    }
    if ((rc = repo_read_index(repo, &index, err, errlen)) != 0)
        goto out;
    const struct repo_index_entry *e = repo_index_find(&index, name);
    char rel[128], path[PATH_MAX];
    if (!e || version == 0 || version > e->latest) {
        snprintf(err, errlen, "the repository has no version %s@%" PRIu64, name, version);
        rc = -ENOENT;
    } else if (version == e->latest) {
        snprintf(err, errlen, "%s@%" PRIu64 " is the newest version of %s; publish a newer one first", name, version,
                 name);
        rc = -EBUSY;
    } else if (repo_version_retired(repo, name, version)) {
        snprintf(err, errlen, "%s@%" PRIu64 " is retired already", name, version);
        rc = -EALREADY;
    } else if ((rc = repo_retired_relpath(name, version, rel, sizeof(rel))) != 0 ||
               (rc = path_join(path, sizeof(path), "%s/%s", repo_path, rel)) != 0) {
        snprintf(err, errlen, "repository path is too long");
    } else {
        char text[64];
        int n = snprintf(text, sizeof(text), "imgfs-retired 1\ntime %lld\n", (long long)time(NULL));
        if ((rc = write_file_atomic(path, text, (size_t)n)) != 0 ||
            (rc = remove_retired_files(repo_path, name, version)) != 0)
            snprintf(err, errlen, "cannot retire %s@%" PRIu64 ": %s", name, version, strerror(-rc));
    }
out:
    repo_index_free(&index);
    repo_close(repo);
    return rc;
}

/* ---- gc -------------------------------------------------------------------------------- */

/* Removes what no manifest references from REPO/chunks (lock held). */
static int sweep_chunks(const char *root, const struct chunk_set *keep, bool dry_run, struct gc_result *res,
                        char *err, size_t errlen)
{
    char top[PATH_MAX];
    int rc = path_join(top, sizeof(top), "%s/chunks", root);
    DIR *d = rc ? NULL : opendir(top);
    if (!d) {
        snprintf(err, errlen, "cannot read %s/chunks: %s", root, strerror(rc ? -rc : errno));
        return rc ? rc : -errno;
    }
    struct dirent *de;
    while (!rc && (de = readdir(d))) {
        char sub[PATH_MAX];
        if (strlen(de->d_name) != 2 || path_join(sub, sizeof(sub), "%s/%s", top, de->d_name) != 0)
            continue;
        DIR *s = opendir(sub);
        struct dirent *ce;
        bool changed = false;
        while (s && !rc && (ce = readdir(s))) {
            char path[PATH_MAX];
            struct stat st;
            if (ce->d_name[0] == '.' || path_join(path, sizeof(path), "%s/%s", sub, ce->d_name) != 0 ||
                lstat(path, &st) != 0 || !S_ISREG(st.st_mode))
                continue;
            struct chunk_hash h;
            bool temp = strstr(ce->d_name, ".tmp.") != NULL; /* a killed publish's */
            bool chunk = strlen(ce->d_name) == CHUNK_HASH_HEX && chunk_hash_from_hex(ce->d_name, &h) == 0;
            if (chunk && set_find(keep, &h)) {
                res->chunks_kept++;
                res->bytes_kept += (uint64_t)st.st_size;
                continue;
            }
            if (!chunk && !temp)
                continue; /* not ours: left alone */
            if (!dry_run && unlink(path) < 0) {
                snprintf(err, errlen, "cannot remove %s: %s", path, strerror(errno));
                rc = -errno;
                break;
            }
            changed = true;
            if (temp) {
                res->temp_removed++;
            } else {
                res->chunks_removed++;
                res->bytes_removed += (uint64_t)st.st_size;
            }
        }
        if (s)
            closedir(s);
        if (changed && !dry_run)
            fsync_dir(sub);
    }
    closedir(d);
    return rc;
}

int lifecycle_gc(const char *repo_path, bool dry_run, void (*on_wait)(void), struct gc_result *res, char *err,
                 size_t errlen)
{
    memset(res, 0, sizeof(*res));
    err[0] = '\0';
    if (strstr(repo_path, "://")) {
        snprintf(err, errlen, "gc works on a local repository directory, not %s", repo_path);
        return -EINVAL;
    }
    struct repo *repo;
    int rc = repo_open(repo_path, &repo, err, errlen);
    if (rc)
        return rc;
    rc = repo_lock_chunks(repo, true, false);
    if (rc == -EWOULDBLOCK) {
        res->waited = true;
        if (on_wait)
            on_wait();
        rc = repo_lock_chunks(repo, true, true);
    }
    if (rc) {
        snprintf(err, errlen, "cannot lock the repository's chunks: %s", strerror(-rc));
        repo_close(repo);
        return rc;
    }
    /* Finish retirements that a killed retire left half done. */
    struct repo_scan s;
    rc = scan_repo(repo, NULL, &s, err, errlen);
    for (size_t i = 0; !rc && i < s.count; i++) {
        if (s.versions[i].retired && !dry_run &&
            (rc = remove_retired_files(repo_path, s.versions[i].name, s.versions[i].version)) != 0)
            snprintf(err, errlen, "cannot remove the files of retired %s@%" PRIu64 ": %s", s.versions[i].name,
                     s.versions[i].version, strerror(-rc));
        res->versions += !s.versions[i].retired;
    }
    if (!rc)
        rc = sweep_chunks(repo_path, &s.chunks, dry_run, res, err, errlen);
    if (err[0] == '\0' && rc)
        snprintf(err, errlen, "gc failed: %s", strerror(-rc));
    scan_free(&s); /* zeroed by scan_repo when it failed */
    repo_close(repo);
    return rc;
}
