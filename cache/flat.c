#include "flat.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

unsigned flat_build_delay_ms;
void (*flat_test_hook)(enum flat_test_point point, const char *name);

struct flat_entry {
    char name[96];         /* NAME@V */
    struct chunk_hash id;  /* the manifest it was built or checked against (READY) */
    uint64_t charged;      /* bytes charged to the cache for it */
    enum flat_state state; /* never FLAT_NONE while listed */
    /* Being removed: by the worker when building or checking, else by the
     * remover, which drops the entry only once the file is unlinked (stats
     * never show no file while one is still on disk). */
    bool doomed;
};

/* What tells one flat file's bytes from any other's: a write changes mtime
 * and ctime, a chmod, link or rename ctime, a file put in its place the
 * inode (and ctime: an inode number used again is a new inode). */
struct flat_identity {
    uint64_t dev, ino, size;
    int64_t mtime_s, mtime_ns, ctime_s, ctime_ns;
};

struct flat_store {
    struct cache *cache;
    char dir[PATH_MAX];
    char trust_dir[PATH_MAX]; /* "" when checks are not recorded */
    pthread_mutex_t lock;     /* guards entries, count and the counters below */
    struct flat_entry *entries;
    size_t count, cap;
    uint64_t built, checked, trusted, rejected, reclaimed;
    bool stopping; /* flat_stop(): a build or check under way ends */
};

static void version_name(const struct manifest *m, char *out, size_t len)
{
    snprintf(out, len, "%s@%" PRIu64, m->name, m->version);
}

static int file_path(const struct flat_store *store, const char *name, const char *suffix, char *out)
{
    return path_join(out, PATH_MAX, "%s/%s%s", store->dir, name, suffix);
}

/* Caller holds lock. */
static struct flat_entry *find(struct flat_store *store, const char *name)
{
    for (size_t i = 0; i < store->count; i++)
        if (strcmp(store->entries[i].name, name) == 0)
            return &store->entries[i];
    return NULL;
}

/* Caller holds lock. */
static struct flat_entry *add(struct flat_store *store, const char *name, enum flat_state state, uint64_t charged)
{
    if (store->count == store->cap) {
        size_t cap = store->cap ? store->cap * 2 : 16;
        struct flat_entry *grown = realloc(store->entries, cap * sizeof(*grown));
        if (!grown)
            return NULL;
        store->entries = grown;
        store->cap = cap;
    }
    struct flat_entry *e = &store->entries[store->count++];
    memset(e, 0, sizeof(*e));
    snprintf(e->name, sizeof(e->name), "%s", name);
    e->state = state;
    e->charged = charged;
    return e;
}

/* Caller holds lock; e is gone afterwards. Returns its charge. */
static uint64_t drop(struct flat_store *store, struct flat_entry *e)
{
    uint64_t charged = e->charged;
    *e = store->entries[--store->count];
    return charged;
}

static void identity_of(const struct stat *st, struct flat_identity *out)
{
    *out = (struct flat_identity){
        .dev = (uint64_t)st->st_dev,
        .ino = (uint64_t)st->st_ino,
        .size = (uint64_t)st->st_size,
        .mtime_s = (int64_t)st->st_mtim.tv_sec,
        .mtime_ns = (int64_t)st->st_mtim.tv_nsec,
        .ctime_s = (int64_t)st->st_ctim.tv_sec,
        .ctime_ns = (int64_t)st->st_ctim.tv_nsec,
    };
}

static int identity_of_fd(int fd, struct flat_identity *out)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    identity_of(&st, out);
    return 0;
}

static bool identity_equal(const struct flat_identity *a, const struct flat_identity *b)
{
    return a->dev == b->dev && a->ino == b->ino && a->size == b->size && a->mtime_s == b->mtime_s &&
           a->mtime_ns == b->mtime_ns && a->ctime_s == b->ctime_s && a->ctime_ns == b->ctime_ns;
}

/* The records of passed checks (flat.h, "Takeover"): TRUST_DIR/NAME@V.flat,
 * one line "imgfs-flat-checked 1 NAME@V MANIFEST-ID DEV INO SIZE MTIME_S
 * MTIME_NS CTIME_S CTIME_NS". */
#define TRUST_MAGIC "imgfs-flat-checked 1"

static int trust_path(const struct flat_store *store, const char *name, char *out)
{
    return path_join(out, PATH_MAX, "%s/%s.flat", store->trust_dir, name);
}

/* Records that name's file, with identity ident, passed its check against
 * the manifest id. A record that cannot be written only costs the next
 * server a full check. */
static void trust_record(struct flat_store *store, const char *name, const struct chunk_hash *id,
                         const struct flat_identity *ident)
{
    if (!store->trust_dir[0])
        return;
    char path[PATH_MAX], hex[CHUNK_HASH_HEX + 1], line[512];
    chunk_hash_to_hex(id, hex);
    int len = snprintf(line, sizeof(line),
                       TRUST_MAGIC " %s %s %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRId64 " %" PRId64 " %" PRId64
                                   " %" PRId64 "\n",
                       name, hex, ident->dev, ident->ino, ident->size, ident->mtime_s, ident->mtime_ns, ident->ctime_s,
                       ident->ctime_ns);
    int rc = len > 0 && (size_t)len < sizeof(line) ? trust_path(store, name, path) : -ENAMETOOLONG;
    if (!rc)
        rc = write_file_atomic_mode(path, line, (size_t)len, 0600);
    if (rc)
        log_warn("flat file %s: cannot record its check in %s: %s; a takeover checks it again", name,
                 store->trust_dir, strerror(-rc));
}

/* Whether this mount's record of name says it passed its check against id
 * with exactly the identity ident. */
static bool trust_matches(struct flat_store *store, const char *name, const struct chunk_hash *id,
                          const struct flat_identity *ident)
{
    char path[PATH_MAX], *data = NULL;
    size_t len;
    if (!store->trust_dir[0] || trust_path(store, name, path) != 0 || read_file(path, 512, &data, &len) != 0)
        return false;
    char magic[32], version[8], got_name[96], hex[CHUNK_HASH_HEX + 2], end;
    struct flat_identity rec;
    struct chunk_hash got_id;
    bool ok = sscanf(data,
                     "%31s %7s %95s %33s %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNd64 " %" SCNd64 " %" SCNd64
                     " %" SCNd64 "%c",
                     magic, version, got_name, hex, &rec.dev, &rec.ino, &rec.size, &rec.mtime_s, &rec.mtime_ns,
                     &rec.ctime_s, &rec.ctime_ns, &end) == 12 &&
              end == '\n' && strcmp(magic, "imgfs-flat-checked") == 0 && strcmp(version, "1") == 0 &&
              strcmp(got_name, name) == 0 && chunk_hash_from_hex(hex, &got_id) == 0 &&
              chunk_hash_equal(&got_id, id) && identity_equal(&rec, ident);
    free(data);
    return ok;
}

static void unlink_file(struct flat_store *store, const char *name, const char *suffix)
{
    char path[PATH_MAX];
    if (strcmp(suffix, ".raw") == 0) {
        /* The record goes first: it never outlives its file. */
        if (store->trust_dir[0] && trust_path(store, name, path) == 0 && unlink(path) != 0 && errno != ENOENT)
            log_warn("flat file %s: cannot remove its record of a check: %s", name, strerror(errno));
        if (flat_test_hook)
            flat_test_hook(FLAT_TEST_UNLINK, name);
    }
    if (file_path(store, name, suffix, path) == 0 && unlink(path) != 0 && errno != ENOENT)
        log_warn("flat file %s%s: cannot remove it: %s", name, suffix, strerror(errno));
}

int flat_open(struct cache *cache, const char *trust_dir, struct flat_store **out, char *err, size_t errlen)
{
    struct flat_store *store = calloc(1, sizeof(*store));
    if (!store) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    store->cache = cache;
    pthread_mutex_init(&store->lock, NULL);
    const char *delay = getenv("IMGFS_TEST_FLAT_DELAY_MS");
    if (delay)
        flat_build_delay_ms = (unsigned)atoi(delay);
    int rc = path_join(store->dir, sizeof(store->dir), "%s/flat", cache_dir(cache));
    if (!rc && trust_dir && trust_dir[0])
        rc = path_join(store->trust_dir, sizeof(store->trust_dir), "%s", trust_dir);
    if (!rc && mkdir(store->dir, 0700) != 0 && errno != EEXIST)
        rc = -errno;
    DIR *d = rc ? NULL : opendir(store->dir);
    if (!rc && !d)
        rc = -errno;
    if (rc) {
        snprintf(err, errlen, "cannot use the flat file directory %s: %s", store->dir, strerror(-rc));
        flat_close(store);
        return rc;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        char name[96];
        if (len > 4 && strcmp(de->d_name + len - 4, ".tmp") == 0) {
            snprintf(name, sizeof(name), "%.*s", (int)(len - 4), de->d_name);
            unlink_file(store, name, ".tmp"); /* a build that did not finish */
            continue;
        }
        if (len <= 4 || len - 4 >= sizeof(name) || strcmp(de->d_name + len - 4, ".raw") != 0)
            continue;
        snprintf(name, sizeof(name), "%.*s", (int)(len - 4), de->d_name);
        struct stat st;
        if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode)) {
            unlink_file(store, name, ".raw");
            continue;
        }
        uint64_t bytes = (uint64_t)st.st_blocks * 512;
        if (cache_charge(cache, bytes) != 0) {
            log_info("flat file %s: removed, the cache has no room for it", name);
            unlink_file(store, name, ".raw");
            continue;
        }
        if (!add(store, name, FLAT_UNCHECKED, bytes)) {
            cache_uncharge(cache, bytes);
            closedir(d);
            snprintf(err, errlen, "out of memory");
            flat_close(store);
            return -ENOMEM;
        }
    }
    closedir(d);
    cache_set_reclaim(cache, flat_reclaim, store);
    *out = store;
    return 0;
}

void flat_close(struct flat_store *store)
{
    if (!store)
        return;
    cache_set_reclaim(store->cache, NULL, NULL); /* the cache outlives the store */
    for (size_t i = 0; i < store->count; i++)
        cache_uncharge(store->cache, store->entries[i].charged);
    pthread_mutex_destroy(&store->lock);
    free(store->entries);
    free(store);
}

enum flat_state flat_state_of(struct flat_store *store, const struct manifest *m)
{
    char name[96];
    version_name(m, name, sizeof(name));
    pthread_mutex_lock(&store->lock);
    struct flat_entry *e = find(store, name);
    enum flat_state state = !e || e->doomed ? FLAT_NONE : e->state;
    if (state == FLAT_READY && !chunk_hash_equal(&e->id, &m->id))
        state = FLAT_UNCHECKED; /* checked against another manifest of the same name */
    pthread_mutex_unlock(&store->lock);
    return state;
}

static void test_delay(void)
{
    struct timespec ts = {flat_build_delay_ms / 1000, (long)(flat_build_delay_ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* Whether name's build or check should stop: removed meanwhile. */
static bool is_doomed(struct flat_store *store, const char *name)
{
    pthread_mutex_lock(&store->lock);
    struct flat_entry *e = find(store, name);
    bool doomed = !e || e->doomed || store->stopping;
    pthread_mutex_unlock(&store->lock);
    return doomed;
}

/* The bytes of chunk i of m as they are in the file: up to chunk_size,
 * cut at m->size. */
static size_t chunk_len(const struct manifest *m, uint64_t i)
{
    uint64_t off = i * m->chunk_size;
    return m->size - off < m->chunk_size ? (size_t)(m->size - off) : m->chunk_size;
}

/* Reads fd in full and compares every chunk with m: 0 or -EBADMSG (or
 * -errno; -ECANCELED when name was removed meanwhile). A file whose
 * identity is not the same after the reads as before them changed while
 * being read: -EBADMSG too, whatever the bytes read. *seen is the identity
 * the bytes compared belong to. */
static int compare_file(struct flat_store *store, int fd, const struct manifest *m, const char *name,
                        struct flat_identity *seen)
{
    int rc = identity_of_fd(fd, seen);
    if (rc)
        return rc;
    if (seen->size != m->size)
        return -EBADMSG;
    char *buf = malloc(m->chunk_size);
    if (!buf)
        return -ENOMEM;
    for (uint64_t i = 0; i < m->chunk_count && !rc; i++) {
        size_t len = chunk_len(m, i);
        memset(buf + len, 0, m->chunk_size - len); /* the last chunk is zero-padded */
        rc = read_full_at(fd, buf, len, (off_t)(i * m->chunk_size));
        if (rc)
            break;
        const struct chunk_hash *want = &m->chunks[i];
        if (chunk_hash_is_null(want)) {
            if (!buffer_is_zero(buf, len))
                rc = -EBADMSG;
        } else {
            struct chunk_hash got;
            chunk_hash_compute(buf, m->chunk_size, &got);
            if (!chunk_hash_equal(&got, want))
                rc = -EBADMSG;
        }
        if (rc == -EBADMSG)
            log_warn("flat file %s: chunk %" PRIu64 " does not match the manifest", name, i);
        if (!rc && flat_test_hook)
            flat_test_hook(FLAT_TEST_COMPARED, name);
        if (!rc && is_doomed(store, name))
            rc = -ECANCELED;
        if (!rc && flat_build_delay_ms)
            test_delay();
    }
    free(buf);
    struct flat_identity after;
    if (!rc)
        rc = identity_of_fd(fd, &after);
    if (!rc && !identity_equal(seen, &after)) {
        log_warn("flat file %s: changed while it was being checked", name);
        rc = -EBADMSG;
    }
    return rc;
}

/* Copies chunk i from the cache into fd: 0, -ENOENT when it is not cached. */
static int copy_chunk(struct flat_store *store, int fd, const struct manifest *m, uint64_t i, char *buf)
{
    struct cache_pin pin;
    uint64_t deadline = now_ns() + 30ull * 1000000000ull;
    int rc = cache_acquire(store->cache, &m->chunks[i], m->chunk_size, 0, 0, deadline, &pin);
    if (rc == CACHE_MUST_FILL) {
        cache_abandon(store->cache, &pin);
        return -ENOENT;
    }
    if (rc < 0)
        return rc == -ETIMEDOUT ? -ENOENT : rc;
    size_t len = chunk_len(m, i);
    const char *bytes = cache_pin_bytes(&pin, 0, len);
    if (!bytes) {
        rc = read_full_at(pin.fd, buf, len, (off_t)pin.off);
        bytes = buf;
    }
    if (!rc)
        rc = write_full_at(fd, bytes, len, (off_t)(i * m->chunk_size));
    cache_release(store->cache, &pin);
    return rc;
}

/* Drops name's entry (its files are gone) and gives its charge back. */
static uint64_t drop_named(struct flat_store *store, const char *name)
{
    pthread_mutex_lock(&store->lock);
    struct flat_entry *e = find(store, name);
    uint64_t charged = e ? drop(store, e) : 0;
    pthread_mutex_unlock(&store->lock);
    cache_uncharge(store->cache, charged);
    return charged;
}

/* Ends a build or check of name: READY with id when ok, else its files go
 * (the .raw too: while the entry is BUILDING no one else's file has its
 * name), and then its entry. Returns rc, or -ECANCELED when it was doomed
 * meanwhile. */
static int finish(struct flat_store *store, const char *name, const struct manifest *m, int rc, bool checking,
                  bool trusted)
{
    pthread_mutex_lock(&store->lock);
    struct flat_entry *e = find(store, name);
    if (!rc && (!e || e->doomed))
        rc = -ECANCELED;
    if (rc == -ECANCELED && checking && e && !e->doomed) {
        e->state = FLAT_UNCHECKED; /* flat_stop(): checked by the next run */
        pthread_mutex_unlock(&store->lock);
        return rc;
    }
    if (!rc) {
        e->state = FLAT_READY;
        e->id = m->id;
        if (trusted)
            store->trusted++;
        else if (checking)
            store->checked++;
        else
            store->built++;
    } else if (checking && rc == -EBADMSG) {
        store->rejected++;
    }
    pthread_mutex_unlock(&store->lock);
    if (rc) {
        unlink_file(store, name, ".tmp");
        unlink_file(store, name, ".raw");
        drop_named(store, name);
    }
    return rc;
}

int flat_build(struct flat_store *store, const struct manifest *m)
{
    char name[96];
    version_name(m, name, sizeof(name));
    uint64_t bytes = 0;
    for (uint64_t i = 0; i < m->chunk_count; i++)
        if (!chunk_hash_is_null(&m->chunks[i]))
            bytes += chunk_len(m, i);
    bytes = (bytes + 4095) / 4096 * 4096;
    pthread_mutex_lock(&store->lock);
    struct flat_entry *e = find(store, name);
    if (e) {
        pthread_mutex_unlock(&store->lock);
        return -EALREADY;
    }
    int rc = cache_charge(store->cache, bytes);
    if (!rc && !add(store, name, FLAT_BUILDING, bytes)) {
        cache_uncharge(store->cache, bytes);
        rc = -ENOMEM;
    }
    pthread_mutex_unlock(&store->lock);
    if (rc)
        return rc;

    char tmp[PATH_MAX], final[PATH_MAX];
    char *buf = malloc(m->chunk_size);
    rc = buf ? 0 : -ENOMEM;
    if (!rc)
        rc = file_path(store, name, ".tmp", tmp);
    if (!rc)
        rc = file_path(store, name, ".raw", final);
    int fd = rc ? -1 : open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (!rc && fd < 0)
        rc = -errno;
    if (!rc && ftruncate(fd, (off_t)m->size) != 0) /* zero chunks stay holes */
        rc = -errno;
    for (uint64_t i = 0; !rc && i < m->chunk_count; i++) {
        if (chunk_hash_is_null(&m->chunks[i]))
            continue;
        rc = is_doomed(store, name) ? -ECANCELED : copy_chunk(store, fd, m, i, buf);
        if (!rc && flat_build_delay_ms)
            test_delay();
    }
    free(buf);
    struct flat_identity ident;
    if (!rc)
        rc = compare_file(store, fd, m, name, &ident);
    if (!rc && fdatasync(fd) != 0)
        rc = -errno;
    /* Renamed only once whole, checked and durable; the rename itself is
     * made durable before the file is handed out. The file is recorded as
     * checked as it is after the rename, which changes its ctime. */
    if (!rc && rename(tmp, final) != 0)
        rc = -errno;
    if (!rc)
        rc = fsync_dir(store->dir);
    if (!rc)
        rc = identity_of_fd(fd, &ident);
    if (fd >= 0)
        close(fd);
    if (rc && rc != -ECANCELED && rc != -ENOENT)
        log_warn("flat file %s: build failed: %s", name, strerror(-rc));
    if (!rc)
        trust_record(store, name, &m->id, &ident);
    rc = finish(store, name, m, rc, false, false);
    if (!rc)
        log_info("flat file %s: built and checked (%" PRIu64 " bytes)", name, m->size);
    return rc;
}

int flat_check(struct flat_store *store, const struct manifest *m)
{
    char name[96], path[PATH_MAX];
    version_name(m, name, sizeof(name));
    pthread_mutex_lock(&store->lock);
    struct flat_entry *e = find(store, name);
    bool unchecked = e && !e->doomed &&
                     (e->state == FLAT_UNCHECKED || (e->state == FLAT_READY && !chunk_hash_equal(&e->id, &m->id)));
    if (unchecked)
        e->state = FLAT_CHECKING;
    pthread_mutex_unlock(&store->lock);
    if (!unchecked)
        return -ENOENT;
    int rc = file_path(store, name, ".raw", path);
    int fd = rc ? -1 : open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (!rc && fd < 0)
        rc = errno == ENOENT ? -EBADMSG : -errno;
    /* Checked against m by an earlier server of this mount and not changed
     * since: taken as it is. */
    struct flat_identity ident;
    if (!rc)
        rc = identity_of_fd(fd, &ident);
    bool trusted = !rc && trust_matches(store, name, &m->id, &ident);
    if (!rc && !trusted)
        rc = compare_file(store, fd, m, name, &ident);
    if (fd >= 0)
        close(fd);
    if (rc == -EBADMSG)
        log_warn("flat file %s: fails its check against the manifest: removed, reads go through the cache", name);
    else if (trusted)
        log_info("flat file %s: unchanged since this mount's last check of it, not read again", name);
    else if (!rc) {
        log_info("flat file %s: checked", name);
        trust_record(store, name, &m->id, &ident);
    }
    return finish(store, name, m, rc, true, trusted);
}

int flat_open_ready(struct flat_store *store, const struct manifest *m)
{
    char name[96], path[PATH_MAX];
    version_name(m, name, sizeof(name));
    if (file_path(store, name, ".raw", path) != 0)
        return -ENAMETOOLONG;
    if (flat_state_of(store, m) != FLAT_READY)
        return -ENOENT;
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    return fd >= 0 ? fd : -errno;
}

/* Removes e (caller holds lock, released here): a file being built or
 * checked is doomed and removed by its worker; any other is doomed, its
 * file unlinked, and only then its entry dropped. Returns the charge given
 * back (0 when a worker or another remover gives it). */
static uint64_t remove_locked(struct flat_store *store, struct flat_entry *e)
{
    bool busy = e->doomed || e->state == FLAT_BUILDING || e->state == FLAT_CHECKING;
    e->doomed = true;
    char name[96];
    snprintf(name, sizeof(name), "%s", e->name);
    pthread_mutex_unlock(&store->lock);
    if (busy)
        return 0;
    unlink_file(store, name, ".raw");
    return drop_named(store, name);
}

void flat_remove(struct flat_store *store, const struct manifest *m)
{
    char name[96];
    version_name(m, name, sizeof(name));
    pthread_mutex_lock(&store->lock);
    struct flat_entry *e = find(store, name);
    if (!e) {
        pthread_mutex_unlock(&store->lock);
        return;
    }
    remove_locked(store, e);
    log_info("flat file %s: removed, its version is no longer held", name);
}

void flat_prune(struct flat_store *store, bool (*keep)(void *ctx, const char *name), void *ctx)
{
    for (size_t i = 0;;) {
        pthread_mutex_lock(&store->lock);
        while (i < store->count && (store->entries[i].doomed || keep(ctx, store->entries[i].name)))
            i++;
        if (i == store->count) {
            pthread_mutex_unlock(&store->lock);
            return;
        }
        log_info("flat file %s: removed, the mount has no such version", store->entries[i].name);
        remove_locked(store, &store->entries[i]); /* entries[i] is another one now */
    }
}

/* The order in which reclaim takes files: unchecked ones first (their room
 * comes back at once), then builds and checks under way (doomed: theirs
 * comes back when they stop), and READY ones, which serve opens, last. */
static int reclaim_rank(const struct flat_entry *e)
{
    switch (e->state) {
    case FLAT_UNCHECKED:
        return 0;
    case FLAT_BUILDING:
    case FLAT_CHECKING:
        return 1;
    default:
        return 2;
    }
}

uint64_t flat_reclaim(void *arg, uint64_t want)
{
    struct flat_store *store = arg;
    uint64_t freed = 0;
    while (freed < want) { /* each round dooms one entry: it ends */
        pthread_mutex_lock(&store->lock);
        struct flat_entry *e = NULL;
        for (size_t i = 0; i < store->count; i++) {
            struct flat_entry *c = &store->entries[i];
            if (!c->doomed && (!e || reclaim_rank(c) < reclaim_rank(e)))
                e = c;
        }
        if (!e) {
            pthread_mutex_unlock(&store->lock);
            break;
        }
        store->reclaimed++;
        log_info("flat file %s: removed to make room in the cache", e->name);
        /* A doomed build or check gives its charge back when its worker
         * stops: it counts now, so that no READY file goes for room that
         * is already on its way. */
        uint64_t charged = e->charged;
        uint64_t got = remove_locked(store, e);
        freed += got ? got : charged;
    }
    return freed;
}

void flat_stop(struct flat_store *store)
{
    pthread_mutex_lock(&store->lock);
    store->stopping = true;
    pthread_mutex_unlock(&store->lock);
}

void flat_get_usage(struct flat_store *store, struct flat_usage *out)
{
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&store->lock);
    for (size_t i = 0; i < store->count; i++) {
        out->files++;
        out->ready += store->entries[i].state == FLAT_READY && !store->entries[i].doomed;
        out->bytes += store->entries[i].charged;
    }
    out->built = store->built;
    out->checked = store->checked;
    out->trusted = store->trusted;
    out->rejected = store->rejected;
    out->reclaimed = store->reclaimed;
    pthread_mutex_unlock(&store->lock);
}
