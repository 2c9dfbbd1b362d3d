/* power_model: the power-loss model of power_model.h (which explains it). */
#include "power_model.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#define SECTOR 512u
#define NAME_MAX_LEN 64
#define MAX_NAMES 512

/* ---- random numbers (the test's own: every choice comes from the seed) ---- */

static uint64_t rs;
void power_seed(uint64_t seed)
{
    rs = seed;
}
uint64_t power_rnd(void)
{
    uint64_t z = (rs += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
uint64_t power_below(uint64_t n)
{
    return n ? power_rnd() % n : 0;
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
    int errors; /* the model out of step with the real files */
} pm = {.lock = PTHREAD_MUTEX_INITIALIZER};

void *power_xrealloc(void *p, size_t n)
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
    *buf = power_xrealloc(*buf, n);
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
    pm.files = power_xrealloc(pm.files, (pm.nfiles + 1) * sizeof(*pm.files));
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
        f->ops = power_xrealloc(f->ops, f->capops * sizeof(*f->ops));
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
        pm.dops = power_xrealloc(pm.dops, pm.capdops * sizeof(*pm.dops));
    }
    ns_apply(pm.cur_ns, &pm.ncur, &d);
    pm.dops[pm.ndops++] = d;
}

/* The probability that an unsynced change survives the cut, per file. */
static uint64_t keep_chance(void)
{
    static const uint64_t q[] = {0, 25, 50, 75, 100};
    return q[power_below(5)];
}
static bool kept(uint64_t chance)
{
    return power_below(100) < chance;
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
    uint64_t keep = power_below(3) == 0 ? 0 : power_below(3) == 0 ? pm.ndops : power_below(pm.ndops + 1);
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
    unsigned char *c = power_xrealloc(NULL, n);
    memcpy(c, p, n);
    return c;
}

ssize_t power_pwrite(ssize_t (*fn)(int, const void *, size_t, off_t), int fd, const void *buf, size_t len, off_t off)
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

/* An append (O_APPEND): a write at the end of the file. */
ssize_t power_write(ssize_t (*fn)(int, const void *, size_t), int fd, const void *buf, size_t len)
{
    pthread_mutex_lock(&pm.lock);
    struct mfile *f = pm.armed ? file_of_fd(fd) : NULL;
    bool rec = f && step();
    uint64_t at = f ? f->len : 0;
    ssize_t n = fn(fd, buf, len);
    int e = errno;
    if (rec && n > 0)
        record(f, (struct op){OP_WRITE, at, (uint64_t)n, copy_of(buf, (size_t)n)});
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return n;
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
    unsigned char *b = power_xrealloc(NULL, (size_t)st.st_size + 1);
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

/* Makes f's bytes and size as they are now durable (a sync, or the
 * kernel's writeback of the whole file). */
static void make_durable(struct mfile *f)
{
    buf_reserve(&f->durable, &f->dcap, f->len);
    if (f->len)
        memcpy(f->durable, f->cur, f->len);
    f->dlen = f->len;
    for (size_t i = 0; i < f->nops; i++)
        free(f->ops[i].data);
    f->nops = 0;
}

int power_fdatasync(int (*fn)(int), int fd)
{
    pthread_mutex_lock(&pm.lock);
    struct mfile *f = pm.armed ? file_of_fd(fd) : NULL;
    bool rec = f && step();
    /* No real sync: what a cut leaves comes from the model, never from the
     * disk (and the fast set stays fast). */
    int rc = f ? 0 : fn(fd);
    int e = errno;
    if (rec && rc == 0) {
        self_check(fd, f);
        make_durable(f);
    }
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return rc;
}

int power_fallocate(int (*fn)(int, int, off_t, off_t), int fd, int mode, off_t off, off_t len)
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
int power_ftruncate(int (*fn)(int, off_t), int fd, off_t len)
{
    pthread_mutex_lock(&pm.lock);
    struct mfile *f = pm.armed ? file_of_fd(fd) : NULL;
    bool rec = f && step();
    int rc = fn(fd, len);
    int e = errno;
    if (rec && rc == 0)
        record(f, (struct op){OP_SIZE, 0, (uint64_t)len, NULL});
    pthread_mutex_unlock(&pm.lock);
    errno = e;
    return rc;
}

int power_open(int (*fn)(const char *, int, mode_t), const char *path, int flags, mode_t mode)
{
    pthread_mutex_lock(&pm.lock);
    const char *name = name_in_dir(path);
    struct stat st;
    bool existed = !name || stat(path, &st) == 0;
    bool rec = name && (flags & O_CREAT) && step();
    int fd = fn(path, flags, mode);
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

int power_rename(int (*fn)(const char *, const char *), const char *from, const char *to)
{
    pthread_mutex_lock(&pm.lock);
    const char *a = name_in_dir(from), *b = name_in_dir(to);
    bool rec = a && b && step();
    int rc = fn(from, to);
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

int power_unlink(int (*fn)(const char *), const char *path)
{
    pthread_mutex_lock(&pm.lock);
    const char *name = name_in_dir(path);
    bool rec = name && step();
    int rc = fn(path);
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

int power_fsync_dir(int (*fn)(const char *), const char *dir)
{
    pthread_mutex_lock(&pm.lock);
    bool mine = pm.armed && strcmp(dir, pm.dir) == 0;
    bool rec = mine && step();
    int rc = mine ? 0 : fn(dir);
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
void power_arm(const char *dir, const char *cut_dir, uint64_t cut_at)
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

bool power_cut_done(void)
{
    pthread_mutex_lock(&pm.lock);
    bool done = pm.cut_done;
    pthread_mutex_unlock(&pm.lock);
    return done;
}

/* A cut now, if none came during the workload. */
void power_cut_at_end(void)
{
    pthread_mutex_lock(&pm.lock);
    if (!pm.cut_done) {
        cut_now();
        pm.cuts_after++;
    }
    pm.armed = false;
    pthread_mutex_unlock(&pm.lock);
}

uint64_t power_calls(void)
{
    pthread_mutex_lock(&pm.lock);
    uint64_t n = pm.calls;
    pthread_mutex_unlock(&pm.lock);
    return n;
}

void power_set_cut_at(uint64_t cut_at)
{
    pthread_mutex_lock(&pm.lock);
    pm.cut_at = cut_at;
    pthread_mutex_unlock(&pm.lock);
}

void power_clear(void)
{
    pthread_mutex_lock(&pm.lock);
    model_clear();
    pthread_mutex_unlock(&pm.lock);
}

void power_writeback(const char *name)
{
    pthread_mutex_lock(&pm.lock);
    struct name *n = pm.armed && !pm.cut_done ? ns_find(pm.cur_ns, pm.ncur, name) : NULL;
    if (n)
        make_durable(&pm.files[n->file]);
    pthread_mutex_unlock(&pm.lock);
}

void power_writeback_dir(void)
{
    pthread_mutex_lock(&pm.lock);
    if (pm.armed && !pm.cut_done) {
        memcpy(pm.dur_ns, pm.cur_ns, sizeof(pm.dur_ns));
        pm.ndur = pm.ncur;
        pm.ndops = 0;
    }
    pthread_mutex_unlock(&pm.lock);
}

uint64_t power_cuts_inside(void)
{
    return pm.cuts_inside;
}
uint64_t power_cuts_after(void)
{
    return pm.cuts_after;
}
int power_errors(void)
{
    return pm.errors;
}

void power_empty_dir(const char *path)
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

void power_on(const char *dir, const char *cut_dir)
{
    power_empty_dir(dir);
    if (rmdir(dir) != 0 || rename(cut_dir, dir) != 0 || mkdir(cut_dir, 0700) != 0) {
        perror(cut_dir);
        abort();
    }
}

int power_run(const char *name, const char *seed_var, const char *iter_var, bool (*run)(uint64_t seed))
{
    uint64_t seed = 0;
    const char *env = getenv(seed_var);
    if (env && *env)
        seed = strtoull(env, NULL, 10);
    else if (getrandom(&seed, sizeof(seed), 0) != sizeof(seed))
        seed = (uint64_t)getpid() * 0x9e3779b97f4a7c15ull;
    seed %= 1000000000000ull;
    const char *it = getenv(iter_var);
    int iterations = it && *it ? atoi(it) : 200;
    printf("%s: seed %" PRIu64 ", %d iterations (replay: %s=%" PRIu64 " ctest -R unit.%s; iteration k runs seed %" PRIu64
           "+k)\n",
           name, seed, iterations, seed_var, seed, name, seed);
    fflush(stdout);
    int failed = 0;
    for (int i = 0; i < iterations && failed < 3; i++) {
        if (!run(seed + (uint64_t)i)) {
            fprintf(stderr, "failed: replay with %s=%" PRIu64 " %s=1\n", seed_var, seed + (uint64_t)i, iter_var);
            failed++;
        }
    }
    return failed;
}
