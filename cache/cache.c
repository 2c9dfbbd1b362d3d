#include "cache.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

#define CACHE_MARKER "imgfs-cache 1\n"
#define SHARD_COUNT 64
#define INITIAL_BUCKETS 1024

enum entry_state {
    ENTRY_ABSENT,   /* not on disk (new entry, or dropped after damage) */
    ENTRY_BUSY,     /* one caller is filling or verifying it; others wait */
    ENTRY_RESIDENT, /* on disk; fd open when verified_open */
};

struct cache_entry {
    struct chunk_hash hash;
    struct cache_entry *next; /* bucket chain */
    uint64_t size;            /* bytes on disk when resident */
    int fd;                   /* -1 unless open */
    uint64_t last_use;        /* LRU clock value of the last acquire */
    uint32_t pins;            /* readers using it right now */
    uint32_t holds;           /* pre-copy pin sets that include it */
    uint8_t state;
    bool verified; /* checked against its hash during this run */
};

/* All fields of a shard, and of the entries hashed to it, are guarded by
 * its lock. changed is broadcast whenever an entry leaves ENTRY_BUSY. */
struct shard {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    struct cache_entry **buckets;
    size_t bucket_count;
    size_t entry_count;
    uint64_t resident_chunks;
    uint64_t resident_bytes;
    uint64_t open_fds;
};

struct cache {
    char dir[PATH_MAX - 128]; /* leaves room for "/chunks/XY/<hash>.tmp.N" */
    uint64_t max_open_fds_per_shard;
    uint64_t limit;                /* bytes, 0 for none; set before use */
    atomic_uint_fast64_t used;     /* resident bytes plus fills in progress */
    atomic_uint_fast64_t clock;    /* LRU clock; starts above every file mtime */
    atomic_uint_fast64_t evictions;
    atomic_uint_fast64_t dropped_damaged;
    pthread_mutex_t evict_lock;    /* one eviction pass at a time; held across unlinks */
    struct shard shards[SHARD_COUNT];
};

const char *cache_dir(const struct cache *cache) { return cache->dir; }

static struct shard *shard_of(struct cache *cache, const struct chunk_hash *hash)
{
    /* Use bits the bucket index does not use. */
    return &cache->shards[(chunk_hash_bucket(hash) >> 56) % SHARD_COUNT];
}

static struct cache_entry **bucket_of(struct shard *s, const struct chunk_hash *hash)
{
    return &s->buckets[chunk_hash_bucket(hash) & (s->bucket_count - 1)];
}

static struct cache_entry *find_entry(struct shard *s, const struct chunk_hash *hash)
{
    for (struct cache_entry *e = *bucket_of(s, hash); e; e = e->next)
        if (chunk_hash_equal(&e->hash, hash))
            return e;
    return NULL;
}

static int grow_buckets(struct shard *s)
{
    size_t count = s->bucket_count * 2;
    struct cache_entry **buckets = calloc(count, sizeof(*buckets));
    if (!buckets)
        return -ENOMEM;
    for (size_t i = 0; i < s->bucket_count; i++) {
        struct cache_entry *e = s->buckets[i];
        while (e) {
            struct cache_entry *next = e->next;
            struct cache_entry **b = &buckets[chunk_hash_bucket(&e->hash) & (count - 1)];
            e->next = *b;
            *b = e;
            e = next;
        }
    }
    free(s->buckets);
    s->buckets = buckets;
    s->bucket_count = count;
    return 0;
}

static struct cache_entry *insert_entry(struct shard *s, const struct chunk_hash *hash)
{
    if (s->entry_count >= s->bucket_count && grow_buckets(s) < 0)
        return NULL;
    struct cache_entry *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->hash = *hash;
    e->fd = -1;
    e->state = ENTRY_ABSENT;
    struct cache_entry **b = bucket_of(s, hash);
    e->next = *b;
    *b = e;
    s->entry_count++;
    return e;
}

static void chunk_path(const struct cache *cache, const struct chunk_hash *hash, char *out, size_t len)
{
    char hex[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(hash, hex);
    snprintf(out, len, "%s/chunks/%.2s/%s", cache->dir, hex, hex);
}

/* Closes descriptors of unpinned chunks once a shard holds too many. */
static void trim_open_fds(struct cache *cache, struct shard *s)
{
    if (s->open_fds <= cache->max_open_fds_per_shard)
        return;
    uint64_t target = cache->max_open_fds_per_shard * 3 / 4;
    for (size_t i = 0; i < s->bucket_count && s->open_fds > target; i++) {
        for (struct cache_entry *e = s->buckets[i]; e && s->open_fds > target; e = e->next) {
            if (e->fd >= 0 && e->pins == 0) {
                close(e->fd);
                e->fd = -1;
                s->open_fds--;
            }
        }
    }
}

/* ---- opening and scanning -------------------------------------------------- */

static int scan_subdir(struct cache *cache, const char *sub)
{
    char path[PATH_MAX];
    int err = path_join(path, sizeof(path), "%s/chunks/%s", cache->dir, sub);
    if (err)
        return err;
    DIR *d = opendir(path);
    if (!d)
        return -errno;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        struct chunk_hash hash;
        struct stat st;
        bool is_chunk = strlen(de->d_name) == CHUNK_HASH_HEX && chunk_hash_from_hex(de->d_name, &hash) == 0 &&
                        fstatat(dirfd(d), de->d_name, &st, 0) == 0 && S_ISREG(st.st_mode) && st.st_size > 0;
        if (!is_chunk) {
            /* Leftover temp files of a crashed fill, or junk. */
            if (strstr(de->d_name, ".tmp."))
                unlinkat(dirfd(d), de->d_name, 0);
            continue;
        }
        struct shard *s = shard_of(cache, &hash);
        struct cache_entry *e = insert_entry(s, &hash);
        if (!e) {
            closedir(d);
            return -ENOMEM;
        }
        e->state = ENTRY_RESIDENT;
        e->size = (uint64_t)st.st_size;
        /* Across restarts, the fill time stands in for the last use. */
        e->last_use = (uint64_t)st.st_mtime;
        s->resident_chunks++;
        s->resident_bytes += e->size;
        atomic_fetch_add(&cache->used, e->size);
    }
    closedir(d);
    return 0;
}

static int prepare_dir(const char *dir, char *err, size_t errlen)
{
    struct stat st;
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "cache directory %s does not exist or is not a directory", dir);
        return -ENOENT;
    }
    char path[PATH_MAX];
    int rc = path_join(path, sizeof(path), "%s/imgfs-cache", dir);
    if (rc) {
        snprintf(err, errlen, "cache directory path is too long");
        return rc;
    }
    rc = check_marker_file(path, CACHE_MARKER);
    if (rc == 0)
        return 0;
    if (rc == -EBADMSG) {
        snprintf(err, errlen, "cache directory %s has an unsupported imgfs-cache marker", dir);
        return rc;
    }
    if (rc != -ENOENT) {
        snprintf(err, errlen, "cannot read the imgfs-cache marker in %s: %s", dir, strerror(-rc));
        return rc;
    }
    rc = 0;
    for (int i = 0; i < 256 && !rc; i++) {
        char sub[PATH_MAX];
        rc = path_join(sub, sizeof(sub), "%s/chunks/%02x", dir, i);
        if (!rc)
            rc = mkdir_p(sub);
    }
    if (!rc)
        rc = write_file_atomic(path, CACHE_MARKER, strlen(CACHE_MARKER));
    if (rc)
        snprintf(err, errlen, "cannot set up cache directory %s: %s", dir, strerror(-rc));
    return rc;
}

int cache_open(const char *dir, struct cache **out, char *err, size_t errlen)
{
    if (strlen(dir) >= sizeof(((struct cache *)0)->dir)) {
        snprintf(err, errlen, "cache directory path is too long");
        return -ENAMETOOLONG;
    }
    int rc = prepare_dir(dir, err, errlen);
    if (rc)
        return rc;
    struct cache *cache = calloc(1, sizeof(*cache));
    if (!cache) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    snprintf(cache->dir, sizeof(cache->dir), "%s", dir);
    /* Keep open chunk files within half of what the process may open. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    uint64_t limit = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? (uint64_t)rl.rlim_cur : 1024;
    if (limit > 1u << 20)
        limit = 1u << 20;
    cache->max_open_fds_per_shard = limit / 2 / SHARD_COUNT;
    atomic_store(&cache->clock, (uint64_t)time(NULL) + 1);
    pthread_mutex_init(&cache->evict_lock, NULL);
    if (cache->max_open_fds_per_shard < 4)
        cache->max_open_fds_per_shard = 4;
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        pthread_mutex_init(&s->lock, NULL);
        cond_init_monotonic(&s->changed);
        s->bucket_count = INITIAL_BUCKETS;
        s->buckets = calloc(s->bucket_count, sizeof(*s->buckets));
        if (!s->buckets) {
            cache_close(cache);
            snprintf(err, errlen, "out of memory");
            return -ENOMEM;
        }
    }
    for (int i = 0; i < 256 && !rc; i++) {
        char sub[3];
        snprintf(sub, sizeof(sub), "%02x", i);
        rc = scan_subdir(cache, sub);
    }
    if (rc) {
        snprintf(err, errlen, "cannot scan cache directory %s: %s", dir, strerror(-rc));
        cache_close(cache);
        return rc;
    }
    *out = cache;
    return 0;
}

void cache_close(struct cache *cache)
{
    if (!cache)
        return;
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        for (size_t b = 0; s->buckets && b < s->bucket_count; b++) {
            struct cache_entry *e = s->buckets[b];
            while (e) {
                struct cache_entry *next = e->next;
                if (e->fd >= 0)
                    close(e->fd);
                free(e);
                e = next;
            }
        }
        free(s->buckets);
        pthread_mutex_destroy(&s->lock);
        pthread_cond_destroy(&s->changed);
    }
    pthread_mutex_destroy(&cache->evict_lock);
    free(cache);
}

/* ---- acquire / fill / release ---------------------------------------------- */

/* Opens a resident chunk and, the first time in this run, checks its bytes
 * against the hash. Runs without the shard lock (the entry is BUSY). */
static int open_and_verify(struct cache *cache, struct cache_entry *e, uint32_t chunk_size, int *fd_out)
{
    char path[PATH_MAX];
    chunk_path(cache, &e->hash, path, sizeof(path));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (!e->verified) {
        struct stat st;
        char *buf = NULL;
        int rc = fstat(fd, &st) < 0 ? -errno : 0;
        if (!rc && (uint64_t)st.st_size != chunk_size)
            rc = -EBADMSG;
        if (!rc && !(buf = malloc(chunk_size)))
            rc = -ENOMEM;
        if (!rc)
            rc = read_full_at(fd, buf, chunk_size, 0);
        if (!rc) {
            struct chunk_hash got;
            chunk_hash_compute(buf, chunk_size, &got);
            if (!chunk_hash_equal(&got, &e->hash))
                rc = -EBADMSG;
        }
        free(buf);
        if (rc) {
            close(fd);
            if (rc == -EBADMSG || rc == -ENODATA) {
                unlink(path);
                atomic_fetch_add(&cache->dropped_damaged, 1);
                log_warn("cache: dropped damaged chunk file %s", path);
                return -EBADMSG;
            }
            return rc;
        }
    }
    *fd_out = fd;
    return 0;
}

static int wait_until(struct shard *s, uint64_t deadline_ns)
{
    return cond_wait_until(&s->changed, &s->lock, deadline_ns) == ETIMEDOUT ? -ETIMEDOUT : 0;
}

/* Forgets the on-disk copy of an entry that was counted as resident. */
static void drop_resident(struct cache *cache, struct shard *s, struct cache_entry *e)
{
    s->resident_chunks--;
    s->resident_bytes -= e->size;
    atomic_fetch_sub(&cache->used, e->size);
    e->size = 0;
    e->verified = false;
}

int cache_acquire(struct cache *cache, const struct chunk_hash *hash, uint32_t chunk_size,
                  uint64_t deadline_ns, struct cache_pin *pin)
{
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    if (!e && !(e = insert_entry(s, hash))) {
        pthread_mutex_unlock(&s->lock);
        return -ENOMEM;
    }
    pin->waited = false;
    for (;;) {
        if (e->state == ENTRY_RESIDENT && e->fd >= 0) {
            e->last_use = atomic_fetch_add(&cache->clock, 1);
            e->pins++;
            pin->entry = e;
            pin->fd = e->fd;
            pin->off = 0;
            pthread_mutex_unlock(&s->lock);
            return CACHE_HIT;
        }
        if (e->state == ENTRY_ABSENT) {
            e->state = ENTRY_BUSY;
            e->pins++;
            pin->entry = e;
            pin->fd = -1;
            pthread_mutex_unlock(&s->lock);
            return CACHE_MUST_FILL;
        }
        if (e->state == ENTRY_RESIDENT) {
            /* On disk but not open: open (and verify) it without the lock. */
            e->state = ENTRY_BUSY;
            e->pins++;
            pthread_mutex_unlock(&s->lock);
            int fd = -1;
            int rc = open_and_verify(cache, e, chunk_size, &fd);
            pthread_mutex_lock(&s->lock);
            if (rc == 0) {
                e->state = ENTRY_RESIDENT;
                e->last_use = atomic_fetch_add(&cache->clock, 1);
                e->verified = true;
                e->fd = fd;
                s->open_fds++;
                pin->entry = e;
                pin->fd = fd;
                pin->off = 0;
                trim_open_fds(cache, s);
                pthread_cond_broadcast(&s->changed);
                pthread_mutex_unlock(&s->lock);
                return CACHE_HIT;
            }
            drop_resident(cache, s, e);
            if (rc == -EBADMSG || rc == -ENOENT) {
                /* Damaged or vanished: this caller fetches it afresh. */
                pin->entry = e;
                pin->fd = -1;
                pthread_mutex_unlock(&s->lock);
                return CACHE_MUST_FILL;
            }
            e->state = ENTRY_ABSENT;
            e->pins--;
            pthread_cond_broadcast(&s->changed);
            pthread_mutex_unlock(&s->lock);
            return rc;
        }
        /* ENTRY_BUSY: somebody else is filling or verifying it. */
        pin->waited = true;
        if (wait_until(s, deadline_ns) == -ETIMEDOUT && e->state == ENTRY_BUSY) {
            pthread_mutex_unlock(&s->lock);
            return -ETIMEDOUT;
        }
    }
}

/* ---- size limit and eviction ------------------------------------------------ */

struct eviction_candidate {
    struct chunk_hash hash;
    uint64_t last_use;
};

static int by_last_use(const void *a, const void *b)
{
    const struct eviction_candidate *x = a, *y = b;
    return x->last_use < y->last_use ? -1 : x->last_use > y->last_use;
}

/* Removes least recently used, unpinned chunks until at most target bytes
 * are used. Returns the number evicted. Caller holds evict_lock. */
static uint64_t evict_to(struct cache *cache, uint64_t target)
{
    size_t cap = 0, count = 0;
    struct eviction_candidate *list = NULL;
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        pthread_mutex_lock(&s->lock);
        for (size_t b = 0; b < s->bucket_count; b++) {
            for (struct cache_entry *e = s->buckets[b]; e; e = e->next) {
                if (e->state != ENTRY_RESIDENT || e->pins || e->holds)
                    continue;
                if (count == cap) {
                    size_t grown_cap = cap ? cap * 2 : 1024;
                    struct eviction_candidate *grown = realloc(list, grown_cap * sizeof(*grown));
                    if (!grown)
                        break;
                    list = grown;
                    cap = grown_cap;
                }
                list[count++] = (struct eviction_candidate){e->hash, e->last_use};
            }
        }
        pthread_mutex_unlock(&s->lock);
    }
    if (count)
        qsort(list, count, sizeof(*list), by_last_use);
    uint64_t evicted = 0;
    for (size_t i = 0; i < count && atomic_load(&cache->used) > target; i++) {
        struct shard *s = shard_of(cache, &list[i].hash);
        pthread_mutex_lock(&s->lock);
        struct cache_entry *e = find_entry(s, &list[i].hash);
        /* Skip anything that was used or pinned since the list was made. */
        if (!e || e->state != ENTRY_RESIDENT || e->pins || e->holds || e->last_use != list[i].last_use) {
            pthread_mutex_unlock(&s->lock);
            continue;
        }
        e->state = ENTRY_BUSY; /* readers wait while the file goes */
        if (e->fd >= 0) {
            close(e->fd);
            e->fd = -1;
            s->open_fds--;
        }
        pthread_mutex_unlock(&s->lock);
        char path[PATH_MAX];
        chunk_path(cache, &e->hash, path, sizeof(path));
        unlink(path);
        pthread_mutex_lock(&s->lock);
        drop_resident(cache, s, e);
        e->state = ENTRY_ABSENT;
        pthread_cond_broadcast(&s->changed);
        pthread_mutex_unlock(&s->lock);
        evicted++;
    }
    free(list);
    atomic_fetch_add(&cache->evictions, evicted);
    return evicted;
}

/* Reserves len bytes under the limit, evicting down to 90% of it (the
 * hysteresis) when needed. -ENOSPC when everything left is in use. */
static int reserve(struct cache *cache, uint64_t len)
{
    if (!cache->limit) {
        atomic_fetch_add(&cache->used, len);
        return 0;
    }
    for (int attempt = 0;; attempt++) {
        uint64_t used = atomic_load(&cache->used);
        while (used + len <= cache->limit) {
            if (atomic_compare_exchange_weak(&cache->used, &used, used + len))
                return 0;
        }
        if (attempt == 2)
            return -ENOSPC;
        uint64_t low = cache->limit / 10 * 9;
        pthread_mutex_lock(&cache->evict_lock);
        evict_to(cache, low > len ? low - len : 0);
        pthread_mutex_unlock(&cache->evict_lock);
    }
}

void cache_set_limit(struct cache *cache, uint64_t limit)
{
    cache->limit = limit;
    if (limit && atomic_load(&cache->used) > limit) {
        pthread_mutex_lock(&cache->evict_lock);
        evict_to(cache, limit / 10 * 9);
        pthread_mutex_unlock(&cache->evict_lock);
    }
}

static int write_chunk_file(const char *tmp, const char *path, const void *data, size_t len, int *fd_out)
{
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    int rc = write_full_at(fd, data, len, 0);
    if (!rc && rename(tmp, path) < 0)
        rc = -errno;
    if (rc) {
        close(fd);
        unlink(tmp);
        return rc;
    }
    *fd_out = fd;
    return 0;
}

int cache_fill(struct cache *cache, struct cache_pin *pin, const void *data, size_t len)
{
    struct cache_entry *e = pin->entry;
    char path[PATH_MAX], tmp[PATH_MAX + 32];
    chunk_path(cache, &e->hash, path, sizeof(path));
    snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)gettid());
    int fd = -1;
    int rc = reserve(cache, len);
    if (!rc) {
        rc = write_chunk_file(tmp, path, data, len, &fd);
        if (rc == -ENOSPC || rc == -EDQUOT) {
            /* The cache's file system is full: make room and retry once. */
            uint64_t used = atomic_load(&cache->used);
            pthread_mutex_lock(&cache->evict_lock);
            evict_to(cache, used - used / 10);
            pthread_mutex_unlock(&cache->evict_lock);
            rc = write_chunk_file(tmp, path, data, len, &fd);
        }
        if (rc)
            atomic_fetch_sub(&cache->used, len);
    }
    if (rc) {
        cache_abandon(cache, pin);
        return rc;
    }
    struct shard *s = shard_of(cache, &e->hash);
    pthread_mutex_lock(&s->lock);
    e->state = ENTRY_RESIDENT;
    e->verified = true; /* the caller verified the bytes it gave us */
    e->last_use = atomic_fetch_add(&cache->clock, 1);
    e->size = len;
    e->fd = fd;
    s->open_fds++;
    s->resident_chunks++;
    s->resident_bytes += len;
    pin->fd = fd;
    pin->off = 0;
    trim_open_fds(cache, s);
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

void cache_abandon(struct cache *cache, struct cache_pin *pin)
{
    struct cache_entry *e = pin->entry;
    struct shard *s = shard_of(cache, &e->hash);
    pthread_mutex_lock(&s->lock);
    e->state = ENTRY_ABSENT;
    e->pins--;
    pthread_cond_broadcast(&s->changed);
    pthread_mutex_unlock(&s->lock);
    pin->entry = NULL;
    pin->fd = -1;
}

void cache_release(struct cache *cache, struct cache_pin *pin)
{
    struct cache_entry *e = pin->entry;
    if (!e)
        return;
    struct shard *s = shard_of(cache, &e->hash);
    pthread_mutex_lock(&s->lock);
    e->pins--;
    pthread_mutex_unlock(&s->lock);
    pin->entry = NULL;
    pin->fd = -1;
}

bool cache_contains(struct cache *cache, const struct chunk_hash *hash)
{
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    bool resident = e && (e->state == ENTRY_RESIDENT);
    pthread_mutex_unlock(&s->lock);
    return resident;
}

int cache_hold(struct cache *cache, const struct chunk_hash *hash, bool hold)
{
    struct shard *s = shard_of(cache, hash);
    pthread_mutex_lock(&s->lock);
    struct cache_entry *e = find_entry(s, hash);
    if (!e && hold)
        e = insert_entry(s, hash);
    if (e && hold)
        e->holds++;
    else if (e && e->holds)
        e->holds--;
    pthread_mutex_unlock(&s->lock);
    return e || !hold ? 0 : -ENOMEM;
}

void cache_get_usage(struct cache *cache, struct cache_usage *out)
{
    memset(out, 0, sizeof(*out));
    for (int i = 0; i < SHARD_COUNT; i++) {
        struct shard *s = &cache->shards[i];
        pthread_mutex_lock(&s->lock);
        out->chunks += s->resident_chunks;
        out->bytes += s->resident_bytes;
        out->open_fds += s->open_fds;
        /* Held bytes are only needed for status, so they are counted here. */
        for (size_t b = 0; b < s->bucket_count; b++)
            for (struct cache_entry *e = s->buckets[b]; e; e = e->next)
                if (e->holds && e->state == ENTRY_RESIDENT)
                    out->held_bytes += e->size;
        pthread_mutex_unlock(&s->lock);
    }
    out->dropped_damaged = atomic_load(&cache->dropped_damaged);
    out->limit = cache->limit;
    out->evictions = atomic_load(&cache->evictions);
}
