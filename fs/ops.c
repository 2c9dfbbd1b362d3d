#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "fs.h"
#include "util.h"

/* Immutable names and attributes may be cached by the kernel for long;
 * names that can change (the NAME.raw symlinks, status files) only briefly. */
#define IMMUTABLE_TIMEOUT 3600.0
#define MUTABLE_TIMEOUT 1.0

/* Zero chunks are not stored anywhere: they are served from this. */
static const char zero_block[1 << 20];

static struct imgfs *fs_of(fuse_req_t req) { return fuse_req_userdata(req); }

/* Local repositories are cheap to re-read, so new versions show up on the
 * next lookup; remote ones are refreshed by the daemon's refresher thread so
 * that a slow network never stalls a directory operation. */
static void maybe_refresh(struct imgfs *fs)
{
    if (repo_is_local(fs->repo)) {
        char err[256];
        tree_refresh(fs->tree, false, err, sizeof(err));
    }
}

static double timeout_for(const struct node *n)
{
    return n->kind == NODE_BASE_FILE || n->kind == NODE_DIR ? IMMUTABLE_TIMEOUT : MUTABLE_TIMEOUT;
}

static void fill_attr(struct imgfs *fs, const struct node *n, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = n->ino;
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_blksize = 4096;
    time_t mtime = fs->mounted_at;
    switch (n->kind) {
    case NODE_DIR:
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
        break;
    case NODE_BASE_FILE: {
        const struct manifest *m = n->version->manifest;
        st->st_mode = S_IFREG | 0444;
        st->st_nlink = 1;
        st->st_size = (off_t)m->size;
        st->st_blocks = (blkcnt_t)((m->size + 511) / 512);
        mtime = (time_t)m->created;
        break;
    }
    case NODE_BASE_LINK: {
        char target[80];
        tree_read_link(fs->tree, n, target, sizeof(target));
        st->st_mode = S_IFLNK | 0777;
        st->st_nlink = 1;
        st->st_size = (off_t)strlen(target);
        break;
    }
    case NODE_STATUS_FILE:
        st->st_mode = S_IFREG | 0444;
        st->st_nlink = 1;
        break;
    }
    st->st_mtime = st->st_ctime = st->st_atime = mtime;
}

static void reply_entry(fuse_req_t req, const struct node *n)
{
    struct fuse_entry_param e = {0};
    e.ino = n->ino;
    e.generation = 1;
    e.attr_timeout = e.entry_timeout = timeout_for(n);
    fill_attr(fs_of(req), n, &e.attr);
    fuse_reply_entry(req, &e);
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    /* Serve reads straight from cache files with splice(2). */
    if (conn->capable & FUSE_CAP_SPLICE_WRITE)
        conn->want |= FUSE_CAP_SPLICE_WRITE;
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS)
        conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    conn->max_readahead = 1u << 20;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_lookup(fs->tree, parent, name);
    if (!n && parent == INO_BASES) {
        maybe_refresh(fs);
        n = tree_lookup(fs->tree, parent, name);
    }
    if (!n) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    reply_entry(req, n);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_get(fs->tree, ino);
    if (!n) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct stat st;
    fill_attr(fs, n, &st);
    fuse_reply_attr(req, &st, timeout_for(n));
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    (void)ino, (void)attr, (void)to_set, (void)fi;
    fuse_reply_err(req, EROFS);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_get(fs->tree, ino);
    if (!n || n->kind != NODE_BASE_LINK) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    maybe_refresh(fs);
    char target[80];
    tree_read_link(fs->tree, n, target, sizeof(target));
    fuse_reply_readlink(req, target);
}

/* ---- directories ------------------------------------------------------------ */

struct dir_fill {
    fuse_req_t req;
    struct imgfs *fs;
    char *buf;
    size_t size;
    size_t used;
};

static int add_dirent(struct dir_fill *d, const char *name, const struct stat *st, off_t next)
{
    size_t need = fuse_add_direntry(d->req, NULL, 0, name, NULL, 0);
    if (d->used + need > d->size)
        return 1;
    fuse_add_direntry(d->req, d->buf + d->used, d->size - d->used, name, st, next);
    d->used += need;
    return 0;
}

static int fill_child(void *ctx, const struct node *n)
{
    struct dir_fill *d = ctx;
    struct stat st;
    fill_attr(d->fs, n, &st);
    /* Offsets 1 and 2 are "." and ".."; a child resumes after its inode. */
    return add_dirent(d, n->name, &st, (off_t)n->ino + 2);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_get(fs->tree, ino);
    if (!n || n->kind != NODE_DIR) {
        fuse_reply_err(req, n ? ENOTDIR : ENOENT);
        return;
    }
    if (ino == INO_BASES)
        maybe_refresh(fs);
    fuse_reply_open(req, fi);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)fi;
    struct imgfs *fs = fs_of(req);
    struct dir_fill d = {req, fs, malloc(size), size, 0};
    if (!d.buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    struct stat st = {0};
    st.st_mode = S_IFDIR;
    if (off < 1) {
        st.st_ino = ino;
        if (add_dirent(&d, ".", &st, 1))
            goto done;
    }
    if (off < 2) {
        struct node *n = tree_get(fs->tree, ino);
        st.st_ino = n ? n->parent : INO_ROOT;
        if (add_dirent(&d, "..", &st, 2))
            goto done;
    }
    tree_for_each_child(fs->tree, ino, off > 2 ? (fuse_ino_t)off - 2 : 0, fill_child, &d);
done:
    fuse_reply_buf(req, d.buf, d.used);
    free(d.buf);
}

/* ---- files ------------------------------------------------------------------ */

/* Rendered status files, one per open. The kernel may send RELEASE while a
 * READ of the same handle is still being answered (for example when the
 * reader was killed), so a snapshot is never touched outside open_status_lock:
 * a read copies its slice under the lock and replies after. */
struct status_snapshot {
    uint64_t id;
    size_t len;
    char *text;
    struct status_snapshot *next;
};

static pthread_mutex_t open_status_lock = PTHREAD_MUTEX_INITIALIZER;
static struct status_snapshot *open_status; /* guarded by open_status_lock */
static uint64_t next_status_id = 1;         /* guarded by open_status_lock */

static void open_status_file(fuse_req_t req, struct imgfs *fs, struct fuse_file_info *fi)
{
    maybe_refresh(fs);
    struct status_snapshot *snap = calloc(1, sizeof(*snap));
    int rc = snap ? status_render_stats(fs, &snap->text, &snap->len) : -ENOMEM;
    if (rc) {
        free(snap);
        fuse_reply_err(req, -rc);
        return;
    }
    pthread_mutex_lock(&open_status_lock);
    snap->id = next_status_id++;
    snap->next = open_status;
    open_status = snap;
    pthread_mutex_unlock(&open_status_lock);
    fi->fh = snap->id;
    fi->direct_io = 1;
    fuse_reply_open(req, fi);
}

static void read_status(fuse_req_t req, uint64_t id, size_t size, off_t off)
{
    char *slice = NULL;
    size_t len = 0;
    int err = EBADF;
    pthread_mutex_lock(&open_status_lock);
    for (struct status_snapshot *s = open_status; s; s = s->next) {
        if (s->id != id)
            continue;
        err = 0;
        if (off >= 0 && (uint64_t)off < s->len) {
            len = size < s->len - (size_t)off ? size : s->len - (size_t)off;
            slice = malloc(len);
            if (slice)
                memcpy(slice, s->text + off, len);
            else
                err = ENOMEM;
        }
        break;
    }
    pthread_mutex_unlock(&open_status_lock);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_buf(req, slice, len);
    free(slice);
}

static void release_status(uint64_t id)
{
    pthread_mutex_lock(&open_status_lock);
    for (struct status_snapshot **p = &open_status; *p; p = &(*p)->next) {
        if ((*p)->id == id) {
            struct status_snapshot *dead = *p;
            *p = dead->next;
            free(dead->text);
            free(dead);
            break;
        }
    }
    pthread_mutex_unlock(&open_status_lock);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_get(fs->tree, ino);
    if (!n) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC)) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (n->kind == NODE_BASE_FILE) {
        fi->keep_cache = 1; /* a version's bytes never change */
        fuse_reply_open(req, fi);
    } else if (n->kind == NODE_STATUS_FILE) {
        open_status_file(req, fs, fi);
    } else {
        fuse_reply_err(req, EISDIR);
    }
}

static void read_base(fuse_req_t req, struct imgfs *fs, struct base_version *v, size_t size, off_t off)
{
    const struct manifest *m = v->manifest;
    if (off < 0 || (uint64_t)off >= m->size || size == 0) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    uint64_t start = (uint64_t)off;
    uint64_t end = start + size < m->size ? start + size : m->size;
    uint64_t cs = m->chunk_size;
    uint64_t first = start / cs, last = (end - 1) / cs;
    size_t max_bufs = (size_t)(last - first + 1) + size / sizeof(zero_block) + 1;
    struct fuse_bufvec *bv = calloc(1, sizeof(*bv) + max_bufs * sizeof(struct fuse_buf));
    struct cache_pin *pins = calloc(max_bufs, sizeof(*pins));
    size_t npins = 0;
    int err = 0;
    if (!bv || !pins) {
        err = ENOMEM;
        goto out;
    }
    size_t nbufs = 0;
    for (uint64_t i = first; i <= last; i++) {
        uint64_t cstart = i * cs;
        uint64_t from = start > cstart ? start : cstart;
        uint64_t to = end < cstart + cs ? end : cstart + cs;
        if (chunk_hash_is_null(&m->chunks[i])) {
            for (uint64_t pos = from; pos < to; pos += sizeof(zero_block)) {
                struct fuse_buf *b = &bv->buf[nbufs++];
                b->mem = (void *)zero_block;
                b->size = to - pos < sizeof(zero_block) ? (size_t)(to - pos) : sizeof(zero_block);
            }
            continue;
        }
        if (fetch_acquire(fs->fetcher, &m->chunks[i], m->chunk_size, &v->counters, &pins[npins]) != 0) {
            err = EIO;
            goto out;
        }
        struct fuse_buf *b = &bv->buf[nbufs++];
        b->flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
        b->fd = pins[npins].fd;
        b->pos = (off_t)(from - cstart);
        b->size = (size_t)(to - from);
        npins++;
    }
    bv->count = nbufs;
    /* The pins keep every descriptor open until the reply has been sent. */
    fuse_reply_data(req, bv, FUSE_BUF_SPLICE_MOVE);
out:
    if (err)
        fuse_reply_err(req, err);
    for (size_t i = 0; i < npins; i++)
        fetch_release(fs->fetcher, &pins[i]);
    free(pins);
    free(bv);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_get(fs->tree, ino);
    if (n && n->kind == NODE_STATUS_FILE)
        read_status(req, fi->fh, size, off);
    else if (n && n->kind == NODE_BASE_FILE)
        read_base(req, fs, n->version, size, off);
    else
        fuse_reply_err(req, EBADF);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct node *n = tree_get(fs_of(req)->tree, ino);
    if (n && n->kind == NODE_STATUS_FILE)
        release_status(fi->fh);
    fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    (void)ino;
    struct statvfs sv;
    if (statvfs(cache_dir(fs_of(req)->cache), &sv) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
}

/* Nothing in the tree can be created, removed or renamed by users yet. */
static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    (void)parent, (void)name, (void)mode, (void)rdev;
    fuse_reply_err(req, EROFS);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    (void)parent, (void)name, (void)mode;
    fuse_reply_err(req, EROFS);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    (void)parent, (void)name;
    fuse_reply_err(req, EROFS);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                      const char *newname, unsigned int flags)
{
    (void)parent, (void)name, (void)newparent, (void)newname, (void)flags;
    fuse_reply_err(req, EROFS);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    (void)parent, (void)name, (void)mode, (void)fi;
    fuse_reply_err(req, EROFS);
}

const struct fuse_lowlevel_ops imgfs_ops = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .readlink = op_readlink,
    .mknod = op_mknod,
    .mkdir = op_mkdir,
    .unlink = op_unlink,
    .rmdir = op_unlink,
    .rename = op_rename,
    .create = op_create,
    .open = op_open,
    .read = op_read,
    .release = op_release,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .statfs = op_statfs,
};
