/* Power-loss tests of layer.c: a simulated power cut at a random system
 * call of a random workload, then the layer opened again from what the cut
 * left on "disk" and checked against the promises of layer.h.
 *
 * THE MODEL (in the style of SQLite's crash-test VFS and of ALICE's and
 * CrashMonkey's models of a POSIX file system), through layer_syscalls,
 * which every change of a layer's file or directory goes through:
 *   - Per file (by inode, so the O_DIRECT descriptor of a log is the same
 *     file), the bytes and size as of its last fdatasync() (durable), and
 *     every change since, in order: a pwrite (buffered or O_DIRECT alike:
 *     O_DIRECT bypasses the page cache, not the device's volatile cache,
 *     and an O_DIRECT write into allocated but unwritten extents needs the
 *     extent conversion that only a sync commits), a punched hole, a size
 *     change (ftruncate, fallocate beyond the end, an extending write).
 *   - At a cut, each 512-byte sector of each file shows its durable bytes
 *     or its bytes after one of the changes since (one per sector, any
 *     combination across sectors and files: no ordering between unsynced
 *     writes, and a 4 KiB block may tear into old and new sectors); the
 *     size is the durable one or the one after one of the changes, bytes
 *     past an older end read as zeros (ext4 data=ordered never shows stale
 *     blocks, only zeros). Why 512 B and not 4 KiB: 512 B is the smallest
 *     unit a device promises to write atomically (the logical sector of
 *     the virtual disks and 512e drives this runs on); ext4 writes back
 *     4 KiB pages, but a power loss may cut the device inside one, and the
 *     finer model is the stronger test (every 4 KiB tear is one of its
 *     cases). The probability that a change survives is drawn per file per
 *     cut (0, 1/4, 1/2, 3/4, 1), so all-lost and all-kept cuts come often.
 *   - The directory (the layers' one): its entries as of its last fsync,
 *     and the creations, renames and unlinks since, in order; a cut keeps
 *     a prefix of them (ext4 journals directory operations in order; a
 *     model that kept any subset would be stronger than ext4 gives). A file
 *     created and not yet named durably is lost with its name; an unlinked
 *     one whose unlink is lost comes back with its own durable bytes.
 *   - fdatasync and fsync are the same (data and size), and neither makes
 *     the file's directory entry durable (POSIX; ext4 often does, by its
 *     journal commit, which the model does not count on).
 * Not simulated: metadata other than size (times, modes), other
 * directories, free space (ENOSPC), ext4 data=journal or data=writeback
 * (writeback may show stale blocks past a lost size: imgfs's state
 * directory is taken to be ext4 or XFS with their defaults), a device
 * that lies about flushes, and the bit rot of synced sectors. The shared
 * pending file of takeovers (layer_share_pending) lives in a tmpfs: a
 * power cut loses it whole, as the test does.
 * At each fdatasync the model's bytes of the file are compared with the
 * real file's: a change made behind the model's back (a system call not in
 * layer_syscalls, a write through a mapping) fails the test.
 *
 * THE WORKLOAD: writes of 1 to 32 blocks (layer_write and
 * layer_write_through, from aligned and unaligned buffers, with
 * IMGFS_LAYER_THROUGH=all so that they go with O_DIRECT), overwrites,
 * punches, flushes, compactions (layer_compact, in the test's thread) and
 * reads, then a cut at a random system call (inside a write, a flush
 * between its record and its sync, a punch's give-back, a compaction
 * between its sync, rename and directory sync, an open's cut of the log),
 * or after the last operation. Then the layer is opened from the cut's
 * state and checked: it opens (no repair by anyone); each block whose last
 * write before a completed flush (or punch) was W reads W or a later
 * write; every other block reads one of the values it had since (a write
 * made to it, or what was there before), never other bytes; and what it
 * read is what it reads after any later cut that no write changed. Each
 * iteration runs several epochs of workload, cut and reopen on the same
 * layer (so cuts also hit the open after a cut, and its cut of the log).
 * Zeroing ahead is off (a background thread would make the cut point
 * depend on timing).
 *
 * The seed is printed; IMGFS_POWER_SEED=N replays from N (iteration k
 * runs seed N+k), IMGFS_POWER_ITERATIONS=K runs K iterations. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/random.h>
#include <unistd.h>

#include "check.h"
#include "layer.h"
#include "test_files.h"
#include "util.h"

#define BS LAYER_BLOCK_SIZE
#define SECTOR 512u
#define BLOCKS 160u
#define DISK_SIZE ((uint64_t)BLOCKS * BS)
#define NAME_MAX_LEN 64
#define MAX_NAMES 32

/* ---- random numbers (the test's own: every choice comes from the seed) ---- */

static uint64_t rs;
static uint64_t rnd(void)
{
    uint64_t z = (rs += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint64_t below(uint64_t n)
{
    return n ? rnd() % n : 0;
}

/* ---- the power-loss model ----------------------------------------------------- */

enum op_kind { OP_WRITE, OP_ZERO, OP_SIZE };
struct op {
    enum op_kind kind;
    uint64_t off, len; /* OP_SIZE: len is the new size */
    unsigned char *data;
};
struct mfile {
    dev_t dev;
    ino_t ino;
    bool live; /* the inode is this file (not an unlinked one whose number was reused) */
    unsigned char *cur, *durable;
    uint64_t len, dlen, cap, dcap;
    struct op *ops;
    size_t nops, capops;
};
struct name {
    char name[NAME_MAX_LEN];
    size_t file;
};
enum dirop_kind { DIR_CREATE, DIR_RENAME, DIR_UNLINK };
struct dirop {
    enum dirop_kind kind;
    char a[NAME_MAX_LEN], b[NAME_MAX_LEN];
    size_t file;
};

static struct {
    pthread_mutex_t lock;
    bool armed, cut_done;
    char dir[PATH_MAX - NAME_MAX_LEN], cut_dir[PATH_MAX - NAME_MAX_LEN];
    struct mfile *files;
    size_t nfiles;
    struct name cur_ns[MAX_NAMES], dur_ns[MAX_NAMES];
    size_t ncur, ndur;
    struct dirop *dops;
    size_t ndops, capdops;
    uint64_t calls, cut_at;
    uint64_t cuts_inside, cuts_after; /* cuts at a system call, and after the workload */
    uint64_t blocks_new, blocks_old; /* after a cut: blocks showing a write not flushed, or an older value */
    int errors; /* the model out of step with the real files */
} pm = {.lock = PTHREAD_MUTEX_INITIALIZER};

static struct layer_syscalls real;

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        perror("realloc");
        abort();
    }
    return q;
}

static void buf_reserve(unsigned char **buf, uint64_t *cap, uint64_t need)
{
    if (need <= *cap)
        return;
    uint64_t n = *cap ? *cap : 65536;
    while (n < need)
        n *= 2;
    *buf = xrealloc(*buf, n);
    memset(*buf + *cap, 0, n - *cap);
    *cap = n;
}

/* The file's bytes become len long: what lies past it reads as zeros. */
static void buf_resize(unsigned char **buf, uint64_t *cap, uint64_t *len, uint64_t to)
{
    buf_reserve(buf, cap, to);
    if (to < *len)
        memset(*buf + to, 0, *len - to);
    *len = to;
}

static void apply_op(unsigned char **buf, uint64_t *cap, uint64_t *len, const struct op *o)
{
    switch (o->kind) {
    case OP_WRITE:
        buf_reserve(buf, cap, o->off + o->len);
        memcpy(*buf + o->off, o->data, o->len);
        if (o->off + o->len > *len)
            *len = o->off + o->len;
        break;
    case OP_ZERO: /* a punched hole: the size stays */
        if (o->off < *len)
            memset(*buf + o->off, 0, (o->off + o->len < *len ? o->off + o->len : *len) - o->off);
        break;
    case OP_SIZE:
        buf_resize(buf, cap, len, o->len);
        break;
    }
}

static void mfile_free(struct mfile *f)
{
    for (size_t i = 0; i < f->nops; i++)
        free(f->ops[i].data);
    free(f->ops);
    free(f->cur);
    free(f->durable);
}

static void model_clear(void)
{
    for (size_t i = 0; i < pm.nfiles; i++)
        mfile_free(&pm.files[i]);
    free(pm.files);
    free(pm.dops);
    pm.files = NULL;
    pm.dops = NULL;
    pm.nfiles = pm.ndops = pm.capdops = pm.ncur = pm.ndur = 0;
    pm.armed = false;
}

static size_t file_new(dev_t dev, ino_t ino)
{
    for (size_t i = 0; i < pm.nfiles; i++)
        if (pm.files[i].live && pm.files[i].dev == dev && pm.files[i].ino == ino)
            pm.files[i].live = false; /* its number reused: the old one is unlinked */
    pm.files = xrealloc(pm.files, (pm.nfiles + 1) * sizeof(*pm.files));
    pm.files[pm.nfiles] = (struct mfile){.dev = dev, .ino = ino, .live = true};
    return pm.nfiles++;
}

static struct mfile *file_of_fd(int fd)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return NULL;
    for (size_t i = 0; i < pm.nfiles; i++)
        if (pm.files[i].live && pm.files[i].dev == st.st_dev && pm.files[i].ino == st.st_ino)
            return &pm.files[i];
    return NULL;
}

static void record(struct mfile *f, struct op o)
{
    if (f->nops == f->capops) {
        f->capops = f->capops ? 2 * f->capops : 16;
        f->ops = xrealloc(f->ops, f->capops * sizeof(*f->ops));
    }
    apply_op(&f->cur, &f->cap, &f->len, &o);
    f->ops[f->nops++] = o;
}

/* The name of path in the model's directory, or NULL when it is elsewhere. */
static const char *name_in_dir(const char *path)
{
    size_t n = strlen(pm.dir);
    if (!pm.armed || strncmp(path, pm.dir, n) != 0 || path[n] != '/' || strchr(path + n + 1, '/') ||
        strlen(path + n + 1) >= NAME_MAX_LEN)
        return NULL;
    return path + n + 1;
}

static struct name *ns_find(struct name *ns, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(ns[i].name, name) == 0)
            return &ns[i];
    return NULL;
}
static void ns_remove(struct name *ns, size_t *n, const char *name)
{
    struct name *e = ns_find(ns, *n, name);
    if (e)
        *e = ns[--*n];
}
static void ns_set(struct name *ns, size_t *n, const char *name, size_t file)
{
    struct name *e = ns_find(ns, *n, name);
    if (!e) {
        if (*n == MAX_NAMES) {
            fprintf(stderr, "power model: too many names\n");
            abort();
        }
        e = &ns[(*n)++];
        snprintf(e->name, sizeof(e->name), "%s", name);
    }
    e->file = file;
}
static void ns_apply(struct name *ns, size_t *n, const struct dirop *d)
{
    if (d->kind == DIR_CREATE) {
        ns_set(ns, n, d->a, d->file);
    } else if (d->kind == DIR_UNLINK) {
        ns_remove(ns, n, d->a);
    } else {
        struct name *e = ns_find(ns, *n, d->a);
        if (!e)
            return;
        size_t file = e->file;
        ns_remove(ns, n, d->a);
        ns_set(ns, n, d->b, file);
    }
}
static void dir_record(struct dirop d)
{
    if (pm.ndops == pm.capdops) {
        pm.capdops = pm.capdops ? 2 * pm.capdops : 16;
        pm.dops = xrealloc(pm.dops, pm.capdops * sizeof(*pm.dops));
    }
    ns_apply(pm.cur_ns, &pm.ncur, &d);
    pm.dops[pm.ndops++] = d;
}

/* The probability that an unsynced change survives the cut, per file. */
static uint64_t keep_chance(void)
{
    static const uint64_t q[] = {0, 25, 50, 75, 100};
    return q[below(5)];
}
static bool kept(uint64_t chance)
{
    return below(100) < chance;
}

/* What the cut leaves of file f, written to path. */
static void materialize(const struct mfile *f, const char *path)
{
    uint64_t chance = keep_chance();
    unsigned char *work = NULL, *out = NULL;
    uint64_t wcap = 0, wlen = 0, ocap = 0, olen = 0;
    buf_resize(&work, &wcap, &wlen, f->dlen);
    if (f->dlen)
        memcpy(work, f->durable, f->dlen);
    uint64_t end = f->dlen; /* the size the cut leaves */
    buf_reserve(&out, &ocap, f->dlen);
    if (f->dlen)
        memcpy(out, f->durable, f->dlen);
    olen = f->dlen;
    for (size_t i = 0; i < f->nops; i++) {
        const struct op *o = &f->ops[i];
        uint64_t before = wlen;
        apply_op(&work, &wcap, &wlen, o);
        uint64_t from = o->off, to = o->off + o->len;
        if (o->kind == OP_SIZE) {
            from = before < wlen ? before : wlen;
            to = before < wlen ? wlen : before;
        }
        if (wlen != before && kept(chance))
            end = wlen;
        buf_reserve(&out, &ocap, (to + SECTOR - 1) / SECTOR * SECTOR);
        buf_reserve(&work, &wcap, (to + SECTOR - 1) / SECTOR * SECTOR);
        if (to > olen)
            olen = to;
        for (uint64_t s = from / SECTOR * SECTOR; s < to; s += SECTOR)
            if (kept(chance))
                memcpy(out + s, work + s, SECTOR);
    }
    buf_reserve(&out, &ocap, end);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || (end && pwrite(fd, out, end, 0) != (ssize_t)end)) {
        perror(path);
        abort();
    }
    close(fd);
    free(work);
    free(out);
}

/* The power cut: what the disk holds now goes to cut_dir. */
static void cut_now(void)
{
    uint64_t keep = below(3) == 0 ? 0 : below(3) == 0 ? pm.ndops : below(pm.ndops + 1);
    struct name ns[MAX_NAMES];
    size_t n = pm.ndur;
    memcpy(ns, pm.dur_ns, sizeof(ns));
    for (size_t i = 0; i < keep; i++)
        ns_apply(ns, &n, &pm.dops[i]);
    for (size_t i = 0; i < n; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof(path), "%s/%.63s", pm.cut_dir, ns[i].name);
        materialize(&pm.files[ns[i].file], path);
    }
    pm.cut_done = true;
}

/* Counts a system call of the model's files; the cut comes before the one
 * it was set at. True when the call is to be recorded. */
static bool step(void)
{
    if (!pm.armed || pm.cut_done)
        return false;
    if (++pm.calls == pm.cut_at) {
        cut_now();
        pm.cuts_inside++;
    }
    return !pm.cut_done;
}

static unsigned char *copy_of(const void *p, size_t n)
{
    unsigned char *c = xrealloc(NULL, n);
    memcpy(c, p, n);
    return c;
}

static ssize_t model_pwrite(ssize_t (*fn)(int, const void *, size_t, off_t), int fd, const void *buf, size_t len,
                            off_t off)
{
    pthread_mutex_lock(&pm.lock);
    struct mfile *f = pm.armed ? file_of_fd(fd) : NULL;
    bool rec = f && step();
    ssize_t n = fn(fd, buf, len, off);
    int e = errno;
    if (rec && n > 0)
        record(f, (struct op){OP_WRITE, (uint64_t)off, (uint64_t)n, copy_of(buf, (size_t)n)});
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return n;
}
static ssize_t m_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    return model_pwrite(real.pwrite, fd, buf, len, off);
}
static ssize_t m_zero_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    return model_pwrite(real.zero_pwrite, fd, buf, len, off);
}

/* The real file's bytes, compared with the model's (pm.errors). */
static void self_check(int fd, const struct mfile *f)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    int rfd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (rfd < 0 || fstat(rfd, &st) != 0) {
        pm.errors++;
        if (rfd >= 0)
            close(rfd);
        return;
    }
    unsigned char *b = xrealloc(NULL, (size_t)st.st_size + 1);
    bool same = (uint64_t)st.st_size == f->len && pread(rfd, b, (size_t)st.st_size, 0) == st.st_size &&
                (f->len == 0 || memcmp(b, f->cur, f->len) == 0);
    if (!same) {
        fprintf(stderr, "power model: a file of %" PRIu64 " bytes is %lld bytes, or other bytes, on disk\n", f->len,
                (long long)st.st_size);
        pm.errors++;
    }
    free(b);
    close(rfd);
}

static int m_fdatasync(int fd)
{
    pthread_mutex_lock(&pm.lock);
    struct mfile *f = pm.armed ? file_of_fd(fd) : NULL;
    bool rec = f && step();
    /* No real sync: what a cut leaves comes from the model, never from the
     * disk (and the fast set stays fast). */
    int rc = f ? 0 : real.fdatasync(fd);
    int e = errno;
    if (rec && rc == 0) {
        self_check(fd, f);
        buf_reserve(&f->durable, &f->dcap, f->len);
        if (f->len)
            memcpy(f->durable, f->cur, f->len);
        f->dlen = f->len;
        for (size_t i = 0; i < f->nops; i++)
            free(f->ops[i].data);
        f->nops = 0;
    }
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return rc;
}

static int model_fallocate(int (*fn)(int, int, off_t, off_t), int fd, int mode, off_t off, off_t len)
{
    pthread_mutex_lock(&pm.lock);
    struct mfile *f = pm.armed ? file_of_fd(fd) : NULL;
    bool rec = f && step();
    int rc = fn(fd, mode, off, len);
    int e = errno;
    if (rec && rc == 0) {
        if (mode & FALLOC_FL_PUNCH_HOLE)
            record(f, (struct op){OP_ZERO, (uint64_t)off, (uint64_t)len, NULL});
        else if (!(mode & FALLOC_FL_KEEP_SIZE) && (uint64_t)(off + len) > f->len)
            record(f, (struct op){OP_SIZE, 0, (uint64_t)(off + len), NULL});
    }
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return rc;
}
static int m_fallocate(int fd, int mode, off_t off, off_t len)
{
    return model_fallocate(real.fallocate, fd, mode, off, len);
}
static int m_ahead_fallocate(int fd, int mode, off_t off, off_t len)
{
    return model_fallocate(real.ahead_fallocate, fd, mode, off, len);
}

static int m_ftruncate(int fd, off_t len)
{
    pthread_mutex_lock(&pm.lock);
    struct mfile *f = pm.armed ? file_of_fd(fd) : NULL;
    bool rec = f && step();
    int rc = real.ftruncate(fd, len);
    int e = errno;
    if (rec && rc == 0)
        record(f, (struct op){OP_SIZE, 0, (uint64_t)len, NULL});
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return rc;
}

static int m_open(const char *path, int flags, mode_t mode)
{
    pthread_mutex_lock(&pm.lock);
    const char *name = name_in_dir(path);
    struct stat st;
    bool existed = !name || stat(path, &st) == 0;
    bool rec = name && (flags & O_CREAT) && step();
    int fd = real.open(path, flags, mode);
    int e = errno;
    if (rec && fd >= 0 && fstat(fd, &st) == 0) {
        if (!existed) {
            struct dirop d = {DIR_CREATE, "", "", file_new(st.st_dev, st.st_ino)};
            snprintf(d.a, sizeof(d.a), "%s", name);
            dir_record(d);
        } else if (flags & O_TRUNC) {
            struct mfile *f = file_of_fd(fd);
            if (f && f->len)
                record(f, (struct op){OP_SIZE, 0, 0, NULL});
        }
    }
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return fd;
}

static int m_rename(const char *from, const char *to)
{
    pthread_mutex_lock(&pm.lock);
    const char *a = name_in_dir(from), *b = name_in_dir(to);
    bool rec = a && b && step();
    int rc = real.rename(from, to);
    int e = errno;
    if (rec && rc == 0) {
        struct dirop d = {DIR_RENAME, "", "", 0};
        snprintf(d.a, sizeof(d.a), "%s", a);
        snprintf(d.b, sizeof(d.b), "%s", b);
        dir_record(d);
    }
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return rc;
}

static int m_unlink(const char *path)
{
    pthread_mutex_lock(&pm.lock);
    const char *name = name_in_dir(path);
    bool rec = name && step();
    int rc = real.unlink(path);
    int e = errno;
    if (rec && rc == 0) {
        struct dirop d = {DIR_UNLINK, "", "", 0};
        snprintf(d.a, sizeof(d.a), "%s", name);
        dir_record(d);
    }
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return rc;
}

static int m_fsync_dir(const char *dir)
{
    pthread_mutex_lock(&pm.lock);
    bool mine = pm.armed && strcmp(dir, pm.dir) == 0;
    bool rec = mine && step();
    int rc = mine ? 0 : real.fsync_dir(dir);
    if (rec && rc == 0) {
        memcpy(pm.dur_ns, pm.cur_ns, sizeof(pm.dur_ns));
        pm.ndur = pm.ncur;
        pm.ndops = 0;
    }
    pthread_mutex_unlock(&pm.lock);
    return rc;
}

/* Starts modelling dir: what it holds now is durable (the state a cut left,
 * or nothing). The cut, if any, comes before system call cut_at from now. */
static void model_arm(const char *dir, const char *cut_dir, uint64_t cut_at)
{
    pthread_mutex_lock(&pm.lock);
    model_clear();
    snprintf(pm.dir, sizeof(pm.dir), "%s", dir);
    snprintf(pm.cut_dir, sizeof(pm.cut_dir), "%s", cut_dir);
    DIR *d = opendir(dir);
    struct dirent *de;
    while (d && (de = readdir(d))) {
        char path[PATH_MAX];
        struct stat st;
        if (strlen(de->d_name) >= NAME_MAX_LEN)
            continue;
        snprintf(path, sizeof(path), "%s/%.63s", dir, de->d_name);
        if (de->d_name[0] == '.' || stat(path, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        size_t i = file_new(st.st_dev, st.st_ino);
        struct mfile *f = &pm.files[i];
        buf_resize(&f->cur, &f->cap, &f->len, (uint64_t)st.st_size);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || pread(fd, f->cur, f->len, 0) != (ssize_t)f->len)
            pm.errors++;
        if (fd >= 0)
            close(fd);
        buf_reserve(&f->durable, &f->dcap, f->len);
        if (f->len)
            memcpy(f->durable, f->cur, f->len);
        f->dlen = f->len;
        ns_set(pm.cur_ns, &pm.ncur, de->d_name, i);
    }
    if (d)
        closedir(d);
    memcpy(pm.dur_ns, pm.cur_ns, sizeof(pm.dur_ns));
    pm.ndur = pm.ncur;
    pm.calls = 0;
    pm.cut_at = cut_at;
    pm.cut_done = false;
    pm.armed = true;
    pthread_mutex_unlock(&pm.lock);
}

static bool cut_done(void)
{
    pthread_mutex_lock(&pm.lock);
    bool done = pm.cut_done;
    pthread_mutex_unlock(&pm.lock);
    return done;
}

/* A cut now, if none came during the workload. */
static void cut_at_end(void)
{
    pthread_mutex_lock(&pm.lock);
    if (!pm.cut_done) {
        cut_now();
        pm.cuts_after++;
    }
    pm.armed = false;
    pthread_mutex_unlock(&pm.lock);
}

/* ---- the workload and what the layer must show ----------------------------------- */

/* A write's bytes in block b: its tag, the block, then bytes of both. Tag 0
 * ("write 0" in messages) is zeros: never written, or punched. */
static void block_bytes(uint64_t tag, uint64_t b, unsigned char *out)
{
    if (tag == 0) {
        memset(out, 0, BS);
        return;
    }
    uint64_t x = tag * 0x2545f4914f6cdd1dull ^ (b + 1) * 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < BS; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(out + i, &x, 8);
    }
    memcpy(out, &tag, 8);
    memcpy(out + 8, &b, 8);
}

/* Per block: the value a completed flush made durable (or the one read after
 * the last cut), and the values written since, in order. */
struct oracle {
    uint64_t durable[BLOCKS];
    uint64_t *since[BLOCKS];
    size_t nsince[BLOCKS], capsince[BLOCKS];
    uint64_t next_tag;
};

static void oracle_written(struct oracle *o, uint64_t b, uint64_t tag)
{
    if (o->nsince[b] == o->capsince[b]) {
        o->capsince[b] = o->capsince[b] ? 2 * o->capsince[b] : 8;
        o->since[b] = xrealloc(o->since[b], o->capsince[b] * sizeof(uint64_t));
    }
    o->since[b][o->nsince[b]++] = tag;
}
static void oracle_flushed(struct oracle *o)
{
    for (uint64_t b = 0; b < BLOCKS; b++) {
        if (o->nsince[b])
            o->durable[b] = o->since[b][o->nsince[b] - 1];
        o->nsince[b] = 0;
    }
}
static uint64_t oracle_latest(const struct oracle *o, uint64_t b)
{
    return o->nsince[b] ? o->since[b][o->nsince[b] - 1] : o->durable[b];
}

static uint64_t iter_seed;
static int epoch;

/* The value block b shows: its tag, or UINT64_MAX for bytes no write made. */
static uint64_t read_tag(struct layer *l, uint64_t b)
{
    static unsigned char buf[BS], want[BS];
    if (!layer_owns(l, b))
        return 0;
    if (layer_read(l, buf, BS, b * BS) != 0)
        return UINT64_MAX;
    uint64_t tag;
    memcpy(&tag, buf, 8);
    for (size_t i = 0; tag == 0 && i < BS; i++)
        if (buf[i])
            tag = UINT64_MAX;
    if (tag == UINT64_MAX)
        return tag;
    block_bytes(tag, b, want);
    return memcmp(buf, want, BS) == 0 ? tag : UINT64_MAX;
}

/* After a cut: every block shows an allowed value, which is then durable. */
static bool check_after_cut(struct layer *l, struct oracle *o)
{
    bool ok = true;
    for (uint64_t b = 0; b < BLOCKS; b++) {
        uint64_t tag = read_tag(l, b);
        bool allowed = tag == o->durable[b];
        for (size_t i = 0; i < o->nsince[b] && !allowed; i++)
            allowed = tag == o->since[b][i];
        if (!allowed) {
            if (ok)
                fprintf(stderr, "seed %" PRIu64 " epoch %d: ", iter_seed, epoch);
            fprintf(stderr,
                    "block %" PRIu64 " reads %s%" PRIu64 ", not the flushed %" PRIu64 " nor one of the %zu written since%s",
                    b, tag == UINT64_MAX ? "bytes of no write " : "write ", tag == UINT64_MAX ? 0 : tag, o->durable[b],
                    o->nsince[b], o->nsince[b] ? " (" : "\n");
            for (size_t i = 0; i < o->nsince[b]; i++)
                fprintf(stderr, "%" PRIu64 "%s", o->since[b][i], i + 1 < o->nsince[b] ? " " : ")\n");
            ok = false;
        }
        if (allowed && o->nsince[b] && tag != o->since[b][o->nsince[b] - 1])
            pm.blocks_old++;
        else if (allowed && o->nsince[b] && tag != o->durable[b])
            pm.blocks_new++;
        o->durable[b] = tag;
        o->nsince[b] = 0;
    }
    return ok;
}

static bool do_write(struct layer *l, struct oracle *o, bool single)
{
    uint64_t b = below(BLOCKS), n = single ? 1 : 1 + below(below(4) == 0 ? 32 : 4);
    if (b + n > BLOCKS)
        n = BLOCKS - b;
    bool through = below(2), aligned = below(2);
    unsigned char *mem = NULL;
    if (posix_memalign((void **)&mem, BS, n * BS + 8) != 0)
        abort();
    unsigned char *p = aligned ? mem : mem + 8;
    uint64_t tag = ++o->next_tag;
    for (uint64_t i = 0; i < n; i++) {
        block_bytes(tag, b + i, p + i * BS);
        oracle_written(o, b + i, tag);
    }
    int rc = through ? layer_write_through(l, p, n * BS, b * BS) : layer_write(l, p, n * BS, b * BS);
    free(mem);
    if (rc)
        fprintf(stderr, "seed %" PRIu64 ": a write failed: %s\n", iter_seed, strerror(-rc));
    return rc == 0;
}

/* One epoch's operations, until the cut. False when one failed. */
static bool workload(struct layer *l, struct oracle *o, int ops)
{
    for (int k = 0; k < ops && !cut_done(); k++) {
        uint64_t what = below(100);
        int rc = 0;
        if (what < 45) {
            if (!do_write(l, o, false))
                return false;
        } else if (what < 50) {
            /* A burst of scattered one-block writes: a record of many
             * entries, over several sectors and continuation blocks. */
            for (uint64_t i = 0, n = 8 + below(below(3) == 0 ? 200 : 40); i < n && !cut_done(); i++)
                if (!do_write(l, o, true))
                    return false;
        } else if (what < 70) {
            rc = layer_flush(l);
            if (!rc && !cut_done())
                oracle_flushed(o);
        } else if (what < 80) {
            uint64_t b = below(BLOCKS), n = 1 + below(16);
            if (b + n > BLOCKS)
                n = BLOCKS - b;
            for (uint64_t i = 0; i < n; i++)
                oracle_written(o, b + i, 0);
            rc = layer_punch(l, b, n);
            if (!rc && !cut_done())
                oracle_flushed(o); /* a punch flushes */
        } else if (what < 86) {
            rc = layer_compact(l);
        } else {
            uint64_t b = below(BLOCKS);
            uint64_t tag = read_tag(l, b);
            if (tag != oracle_latest(o, b)) {
                fprintf(stderr, "seed %" PRIu64 ": block %" PRIu64 " reads %" PRIu64 " before any cut, not %" PRIu64 "\n",
                        iter_seed, b, tag, oracle_latest(o, b));
                return false;
            }
        }
        if (rc) {
            fprintf(stderr, "seed %" PRIu64 ": operation %" PRIu64 " failed: %s\n", iter_seed, what, strerror(-rc));
            return false;
        }
    }
    return true;
}

static char dir[PATH_MAX - NAME_MAX_LEN], cut_dir[PATH_MAX - NAME_MAX_LEN], shared_dir[PATH_MAX - NAME_MAX_LEN];

/* Removes the files of a directory that holds no directory (in process:
 * a fork per epoch would cost more than the test). */
static void empty_dir(const char *path)
{
    DIR *d = opendir(path);
    struct dirent *de;
    while (d && (de = readdir(d))) {
        char file[PATH_MAX];
        snprintf(file, sizeof(file), "%s/%.63s", path, de->d_name);
        if (de->d_name[0] != '.' && unlink(file) != 0)
            perror(file);
    }
    if (d)
        closedir(d);
}

/* The cut's state becomes the layer directory; the shared pending file
 * (a tmpfs's) is gone. */
static void power_on(void)
{
    empty_dir(dir);
    if (rmdir(dir) != 0 || rename(cut_dir, dir) != 0 || mkdir(cut_dir, 0700) != 0) {
        perror(cut_dir);
        abort();
    }
    empty_dir(shared_dir);
}

#define EPOCHS 4

/* One layer through EPOCHS cuts. */
static bool run_iteration(uint64_t seed)
{
    rs = seed;
    iter_seed = seed;
    struct oracle *o = calloc(1, sizeof(*o));
    if (!o)
        abort();
    char id[LAYER_ID_LEN + 1] = "";
    bool ok = true;
    /* Epochs 0 to EPOCHS-1 write and cut; the last one only opens and checks. */
    for (epoch = 0; epoch <= EPOCHS && ok; epoch++) {
        bool last = epoch == EPOCHS;
        int ops = last ? 0 : 4 + (int)below(40);
        /* The cut: before one of the next system calls, or after them. */
        model_arm(dir, cut_dir, last ? 0 : 1 + below((uint64_t)ops * 3));
        struct layer *l = NULL;
        int rc;
        if (epoch == 0) {
            pm.cut_at = 0; /* no cut inside the creation: nothing is promised before it returns */
            rc = layer_create(dir, DISK_SIZE, &l);
            if (!rc)
                snprintf(id, sizeof(id), "%s", layer_id(l));
            pthread_mutex_lock(&pm.lock);
            pm.cut_at = pm.calls + 1 + below((uint64_t)ops * 3);
            pthread_mutex_unlock(&pm.lock);
        } else {
            rc = layer_open(dir, id, DISK_SIZE, &l);
        }
        if (rc) {
            fprintf(stderr, "seed %" PRIu64 " epoch %d: the layer does not open: %s\n", seed, epoch, strerror(-rc));
            ok = false;
            break;
        }
        if (epoch > 0 && !cut_done())
            ok = check_after_cut(l, o);
        if (ok && !last && !cut_done())
            ok = workload(l, o, ops);
        if (!last)
            cut_at_end();
        layer_close(l);
        if (!last)
            power_on();
    }
    for (uint64_t b = 0; b < BLOCKS; b++)
        free(o->since[b]);
    free(o);
    pthread_mutex_lock(&pm.lock);
    model_clear();
    pthread_mutex_unlock(&pm.lock);
    empty_dir(dir);
    empty_dir(cut_dir);
    empty_dir(shared_dir);
    return ok;
}

int main(void)
{
    setenv("IMGFS_LAYER_ZERO_AHEAD", "0", 1);
    setenv("IMGFS_LAYER_COMPACT_MIN", "1G", 1); /* compactions only when asked */
    setenv("IMGFS_LAYER_THROUGH", "all", 1);    /* write-through with O_DIRECT, records too */
    uint64_t seed = 0;
    const char *env = getenv("IMGFS_POWER_SEED");
    if (env && *env) {
        seed = strtoull(env, NULL, 10);
    } else if (getrandom(&seed, sizeof(seed), 0) != sizeof(seed)) {
        seed = (uint64_t)getpid() * 0x9e3779b97f4a7c15ull;
    }
    seed %= 1000000000000ull;
    const char *it = getenv("IMGFS_POWER_ITERATIONS");
    int iterations = it && *it ? atoi(it) : 200;
    log_set_level(LOG_LEVEL_ERROR); /* not every compaction, nor every record a cut tore */
    printf("test_layer_power: seed %" PRIu64 ", %d iterations (replay: IMGFS_POWER_SEED=%" PRIu64
           " ctest -R unit.test_layer_power; iteration k runs seed %" PRIu64 "+k)\n",
           seed, iterations, seed, seed);
    fflush(stdout);

    char base[] = "/tmp/imgfs-test-power-XXXXXX";
    if (!mkdtemp(base)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(dir, sizeof(dir), "%s/layers", base);
    snprintf(cut_dir, sizeof(cut_dir), "%s/cut", base);
    snprintf(shared_dir, sizeof(shared_dir), "%s/shm", base);
    if (mkdir(dir, 0700) != 0 || mkdir(cut_dir, 0700) != 0 || mkdir(shared_dir, 0700) != 0) {
        perror(base);
        return 1;
    }
    layer_share_pending(shared_dir);

    real = layer_syscalls;
    layer_syscalls.pwrite = m_pwrite;
    layer_syscalls.fdatasync = m_fdatasync;
    layer_syscalls.fallocate = m_fallocate;
    layer_syscalls.zero_pwrite = m_zero_pwrite;
    layer_syscalls.ahead_fallocate = m_ahead_fallocate;
    layer_syscalls.ftruncate = m_ftruncate;
    layer_syscalls.open = m_open;
    layer_syscalls.rename = m_rename;
    layer_syscalls.unlink = m_unlink;
    layer_syscalls.fsync_dir = m_fsync_dir;

    int failed = 0;
    for (int i = 0; i < iterations && failed < 3; i++) {
        bool ok = run_iteration(seed + (uint64_t)i);
        CHECK(ok);
        if (!ok) {
            fprintf(stderr, "failed: replay with IMGFS_POWER_SEED=%" PRIu64 " IMGFS_POWER_ITERATIONS=1\n",
                    seed + (uint64_t)i);
            failed++;
        }
    }
    CHECK(pm.errors == 0);
    printf("cuts: %" PRIu64 " at a system call, %" PRIu64 " after the workload; blocks that showed the last write, "
           "not flushed: %" PRIu64 ", an older value: %" PRIu64 "\n",
           pm.cuts_inside, pm.cuts_after, pm.blocks_new, pm.blocks_old);
    layer_syscalls = real;
    remove_tree(base);
    return check_summary();
}
