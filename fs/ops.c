#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fs.h"
#include "serve.h"
#include "util.h"

/* Immutable names and attributes may be cached by the kernel for long;
 * the NAME.raw symlinks and status files only briefly. VM names are not
 * cached at all, so that a removed and re-created VM is seen at once. */
#define IMMUTABLE_TIMEOUT 3600.0
#define MUTABLE_TIMEOUT 1.0

/* Zero chunks and blank ranges are not stored anywhere: they come from this. */
static const char zero_block[1 << 20];

static struct imgfs *fs_of(fuse_req_t req) { return fuse_req_userdata(req); }

/* Local repositories are cheap to re-read, so new versions show up on the
 * next lookup (a refresh bounded in work: TREE_REFRESH_BUDGET manifests of a
 * local disk); remote ones only by the daemon's refresher thread, so that a
 * slow network never stalls a directory operation. */
static void maybe_refresh(struct imgfs *fs)
{
    if (repo_reads_are_cheap(fs->repo)) {
        char err[256];
        tree_refresh(fs->tree, true, err, sizeof(err));
    }
}

static bool is_vm_node(const struct node *n) { return n->kind == NODE_VM_FILE || n->kind == NODE_VM_SNAPSHOT; }

/* Status files are never cached: their size is the size of what the
 * caller's own open handle will read, or of the last read (see
 * status_file_size). */
static double attr_timeout(const struct node *n)
{
    if (n->kind == NODE_STATUS_FILE)
        return 0;
    return n->kind == NODE_BASE_FILE || n->kind == NODE_DIR ? IMMUTABLE_TIMEOUT : MUTABLE_TIMEOUT;
}

static double entry_timeout(const struct node *n) { return is_vm_node(n) ? 0 : attr_timeout(n); }

/* A node that is gone (a removed VM) looks like it does not exist. */
static struct node *live_node(struct imgfs *fs, fuse_ino_t ino)
{
    struct node *n = tree_get(fs->tree, ino);
    return n && (n->ino == INO_ROOT || n->parent) ? n : NULL;
}

static void fill_attr(struct imgfs *fs, const struct node *n, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = n->ino;
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_blksize = 4096;
    st->st_nlink = 1;
    time_t mtime = fs->mounted_at;
    switch (n->kind) {
    case NODE_DIR:
        st->st_mode = S_IFDIR | 0755;
        st->st_nlink = 2;
        break;
    case NODE_BASE_FILE: {
        const struct manifest *m = n->version->manifest;
        st->st_mode = S_IFREG | 0444;
        st->st_size = (off_t)m->size;
        st->st_blocks = (blkcnt_t)((m->size + 511) / 512);
        mtime = (time_t)m->created;
        break;
    }
    case NODE_BASE_LINK: {
        char target[80];
        tree_read_link(fs->tree, n, target, sizeof(target));
        st->st_mode = S_IFLNK | 0777;
        st->st_size = (off_t)strlen(target);
        break;
    }
    case NODE_STATUS_FILE:
        st->st_mode = S_IFREG | 0444;
        break;
    case NODE_CONTROL_FILE:
        st->st_mode = S_IFREG | 0600;
        break;
    case NODE_UNCLAIMED: /* never handed out: tree_get() skips it */
        st->st_mode = S_IFREG;
        break;
    case NODE_VM_FILE:
    case NODE_VM_SNAPSHOT: {
        struct vm *vm = n->vm;
        struct vm_attr va;
        vm_get_attr(vm, &va);
        st->st_mode = S_IFREG | (n->kind == NODE_VM_FILE ? va.mode : (va.mode & 0444));
        st->st_uid = va.uid;
        st->st_gid = va.gid;
        st->st_size = (off_t)vm_size(vm);
        st->st_blocks = (blkcnt_t)(n->kind == NODE_VM_FILE ? vm_layer_bytes(vm) / 512 : 0);
        /* The disk's times are its top layer's, which each write moves. */
        if (vm_get_times(vm, n->snapshot, &st->st_atim, &st->st_mtim) == 0) {
            st->st_ctim = st->st_mtim;
            return;
        }
        break;
    }
    }
    st->st_mtime = st->st_ctime = st->st_atime = mtime;
}

static off_t status_file_size(fuse_req_t req, const struct node *n);

/* fill_attr, plus what depends on who asks. */
static void fill_attr_for(fuse_req_t req, const struct node *n, struct stat *st)
{
    fill_attr(fs_of(req), n, st);
    if (n->kind == NODE_STATUS_FILE)
        st->st_size = status_file_size(req, n);
}

static void fill_entry(fuse_req_t req, const struct node *n, struct fuse_entry_param *e)
{
    memset(e, 0, sizeof(*e));
    e->ino = n->ino;
    e->generation = 1;
    e->attr_timeout = attr_timeout(n);
    e->entry_timeout = entry_timeout(n);
    fill_attr_for(req, n, &e->attr);
}

static void reply_entry(fuse_req_t req, const struct node *n)
{
    struct fuse_entry_param e;
    fill_entry(req, n, &e);
    fuse_reply_entry(req, &e);
}

/* Whether a takeover carries the first server's negotiation: then this
 * session believes exactly what the kernel was told (takeover.h). */
static bool init_from_takeover(struct takeover *t, struct fuse_conn_info *conn)
{
    if (!t || !t->negotiated)
        return false;
    if (t->want & ~conn->capable)
        log_error("takeover: the kernel no longer offers capabilities 0x%x", t->want & ~conn->capable);
    conn->want = t->want & conn->capable;
    conn->max_write = t->max_write;
    conn->max_readahead = t->max_readahead;
    conn->max_background = t->max_background;
    conn->congestion_threshold = t->congestion_threshold;
    conn->time_gran = t->time_gran;
    return true;
}

static void note_negotiated(struct takeover *t, const struct fuse_conn_info *conn)
{
    if (!t)
        return;
    t->want = conn->want;
    t->max_write = conn->max_write;
    t->max_readahead = conn->max_readahead;
    t->max_background = conn->max_background;
    t->congestion_threshold = conn->congestion_threshold;
    t->time_gran = conn->time_gran;
    t->negotiated = 1;
    if (t->has_resend)
        log_info("the kernel has FUSE_NOTIFY_RESEND: a server that crashes is replaced, and the requests it "
                 "held are sent again");
    else
        log_warn("the kernel has no FUSE_NOTIFY_RESEND (Linux before 6.9): a crash of the server ends the "
                 "mount; imgfsctl restart still hands it over");
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    struct imgfs *fs = userdata;
    if (init_from_takeover(fs->takeover, conn)) {
        if (fs->passthrough)
            passthrough_init_done(fs->passthrough);
        return;
    }
    /* Only VM files are ever written through the page cache (bases and
     * snapshots refuse writers, status files are direct), so the writeback
     * cache concerns VM disks alone. */
    if (fs->opts->vm_writeback) {
        if (conn->capable & FUSE_CAP_WRITEBACK_CACHE)
            conn->want |= FUSE_CAP_WRITEBACK_CACHE;
        else
            log_warn("vm_cache=writeback: the kernel has no FUSE writeback cache; VM writes go through");
    }
    /* Serve reads straight from cache and layer files with splice(2). */
    if (conn->capable & FUSE_CAP_SPLICE_WRITE)
        conn->want |= FUSE_CAP_SPLICE_WRITE;
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS)
        conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    conn->max_readahead = 1u << 20;
    /* The kernel's default of 12 background requests caps a guest's
     * asynchronous direct I/O (libaio, io_uring) below a queue depth of 16,
     * and readahead with it. */
    conn->max_background = 64;
    conn->congestion_threshold = 48;
    if (fs->passthrough) {
        passthrough_negotiate(fs->passthrough, (conn->want & FUSE_CAP_WRITEBACK_CACHE) != 0);
        passthrough_init_done(fs->passthrough);
    }
    note_negotiated(fs->takeover, conn);
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
    struct node *n = live_node(fs, ino);
    if (!n) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct stat st;
    fill_attr_for(req, n, &st);
    fuse_reply_attr(req, &st, attr_timeout(n));
}

/* ftruncate: only a disk created as a file, before anything is written to
 * it, takes a size (libvirt and qemu-img create do O_CREAT, then ftruncate). */
static int set_vm_size(struct imgfs *fs, struct vm *vm, uint64_t size)
{
    char err[256];
    int rc = vm_resize_blank(fs->vms, vm, size, err, sizeof(err));
    if (rc && rc != -EPERM)
        log_warn("%s", err);
    return rc;
}

/* touch and utimensat: the times of the disk's top layer. */
static int set_vm_times(struct vm *vm, const struct stat *attr, int to_set)
{
    struct timespec times[2] = {{.tv_nsec = UTIME_OMIT}, {.tv_nsec = UTIME_OMIT}};
    if (to_set & FUSE_SET_ATTR_ATIME_NOW)
        times[0].tv_nsec = UTIME_NOW;
    else if (to_set & FUSE_SET_ATTR_ATIME)
        times[0] = attr->st_atim;
    if (to_set & FUSE_SET_ATTR_MTIME_NOW)
        times[1].tv_nsec = UTIME_NOW;
    else if (to_set & FUSE_SET_ATTR_MTIME)
        times[1] = attr->st_mtim;
    return vm_set_times(vm, times);
}

/* VM disks take chmod and chown (for the hypervisor's user), times, and
 * a size only while blank; nothing else can change. */
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
    (void)fi;
    struct imgfs *fs = fs_of(req);
    struct node *n = live_node(fs, ino);
    if (!n) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (n->kind != NODE_VM_FILE) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if ((to_set & FUSE_SET_ATTR_SIZE) && (uint64_t)attr->st_size != vm_size(n->vm)) {
        int rc = attr->st_size < 0 ? -EINVAL : set_vm_size(fs, n->vm, (uint64_t)attr->st_size);
        if (rc) {
            fuse_reply_err(req, -rc);
            return;
        }
    }
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    struct vm_attr va;
    vm_get_attr(n->vm, &va);
    uid_t owner = va.uid;
    if ((to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID | FUSE_SET_ATTR_MODE)) && ctx->uid != 0 && ctx->uid != owner) {
        fuse_reply_err(req, EPERM);
        return;
    }
    mode_t mode = attr->st_mode & 07777;
    uid_t uid = attr->st_uid;
    gid_t gid = attr->st_gid;
    int rc = 0;
    if (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID | FUSE_SET_ATTR_MODE))
        rc = vm_set_attr(fs->vms, n->vm, (to_set & FUSE_SET_ATTR_MODE) ? &mode : NULL,
                         (to_set & FUSE_SET_ATTR_UID) ? &uid : NULL, (to_set & FUSE_SET_ATTR_GID) ? &gid : NULL);
    if (!rc && (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
                          FUSE_SET_ATTR_MTIME_NOW)))
        rc = set_vm_times(n->vm, attr, to_set);
    if (rc) {
        fuse_reply_err(req, -rc);
        return;
    }
    struct stat st;
    fill_attr(fs, n, &st);
    fuse_reply_attr(req, &st, attr_timeout(n));
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = live_node(fs, ino);
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
    struct stat st = {0};
    st.st_ino = n->ino;
    st.st_mode = n->kind == NODE_DIR ? S_IFDIR : n->kind == NODE_BASE_LINK ? S_IFLNK : S_IFREG;
    /* Offsets 1 and 2 are "." and ".."; a child resumes after its inode. */
    return add_dirent(d, n->name, &st, (off_t)n->ino + 2);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = live_node(fs, ino);
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
        fuse_ino_t parent = n ? n->parent : 0; /* read once: a removal may detach it meanwhile */
        st.st_ino = parent ? parent : INO_ROOT;
        if (add_dirent(&d, "..", &st, 2))
            goto done;
    }
    tree_for_each_child(fs->tree, ino, off > 2 ? (fuse_ino_t)off - 2 : 0, fill_child, &d);
done:
    fuse_reply_buf(req, d.buf, d.used);
    free(d.buf);
}

/* ---- text files: .imgfs/stats and .imgfs/control ----------------------------
 *
 * Each open holds a text: the rendered status, or the reply to the last
 * command written to the control file. The kernel may send RELEASE while a
 * READ of the same handle is still being answered (for example when the
 * reader was killed), so a text is never touched outside open_texts_lock: a
 * read copies its slice under the lock and replies after.
 *
 * A status file's size in stat is the length of the text that the calling
 * thread's newest open handle of it holds (read_file() opens, fstats, then
 * reads exactly st_size bytes); for a thread with none, the length of the
 * file's newest rendering (the last open's), so that `ls -l` shows the size
 * of the last read. A stat renders only a file that was never rendered: the
 * LOOKUP and GETATTR before every open used to render it twice more, and at
 * thousands of VMs a rendering is most of a read's cost. The reader does not
 * need the size: status files are direct_io, read until a short read. */

struct open_text {
    uint64_t id;
    fuse_ino_t ino;
    pid_t pid; /* the thread that opened it */
    size_t len;
    char *text;
    /* A control handle's payload after its text (vm-export): an unnamed
     * file of data_len bytes, or -1. A read dup()s it under the lock. */
    int data_fd;
    uint64_t data_len;
    struct control_deferred *deferred; /* an import stream, or work for the first read (fs.h), or NULL */
    bool running;       /* a read does that work, or a write adds to the stream (the others get EBUSY) */
    struct open_text *next;
};

static pthread_mutex_t open_texts_lock = PTHREAD_MUTEX_INITIALIZER;
static struct open_text *open_texts; /* guarded by open_texts_lock */
/* Ids start from this server's pid, so that a handle a previous server
 * gave (before a takeover) never names a text of this one. */
static uint64_t next_text_id;        /* guarded by open_texts_lock */
/* The length of each status file's newest rendering, by inode, once it
 * has one. Guarded by open_texts_lock. */
static size_t status_lens[INO_FIRST_DYNAMIC];
static bool status_rendered[INO_FIRST_DYNAMIC];

/* Remembers len as the newest rendering of status file ino. */
static void note_status_len(fuse_ino_t ino, size_t len)
{
    if (ino >= INO_FIRST_DYNAMIC)
        return;
    pthread_mutex_lock(&open_texts_lock);
    status_lens[ino] = len;
    status_rendered[ino] = true;
    pthread_mutex_unlock(&open_texts_lock);
}

/* Takes ownership of text; returns the handle id, or 0 when out of memory. */
static uint64_t text_open(fuse_ino_t ino, pid_t pid, char *text, size_t len)
{
    struct open_text *t = calloc(1, sizeof(*t));
    if (!t) {
        free(text);
        return 0;
    }
    t->ino = ino;
    t->pid = pid;
    t->text = text;
    t->len = len;
    t->data_fd = -1;
    pthread_mutex_lock(&open_texts_lock);
    if (!next_text_id)
        next_text_id = (uint64_t)getpid() << 32 | 1;
    uint64_t id = t->id = next_text_id++;
    t->next = open_texts;
    open_texts = t;
    pthread_mutex_unlock(&open_texts_lock);
    return id; /* t is not ours once the lock is released */
}

static struct open_text *find_text_locked(uint64_t id)
{
    for (struct open_text *t = open_texts; t; t = t->next)
        if (t->id == id)
            return t;
    return NULL;
}

static off_t status_file_size(fuse_req_t req, const struct node *n)
{
    pid_t pid = fuse_req_ctx(req)->pid;
    bool found = false;
    size_t len = 0;
    pthread_mutex_lock(&open_texts_lock);
    for (struct open_text *t = open_texts; t && !found; t = t->next) /* newest first */
        if (t->ino == n->ino && t->pid == pid)
            found = true, len = t->len;
    if (!found && n->ino < INO_FIRST_DYNAMIC && status_rendered[n->ino])
        found = true, len = status_lens[n->ino];
    pthread_mutex_unlock(&open_texts_lock);
    char *text;
    if (!found && status_render_file(fs_of(req), n->ino, &text, &len) == 0) {
        free(text);
        note_status_len(n->ino, len);
    }
    return (off_t)len;
}

/* 0 when handle id may take a command: -EBADF when it is not ours, -EBUSY
 * while a read does the deferred work of its last one. */
static int text_takes_command(uint64_t id)
{
    pthread_mutex_lock(&open_texts_lock);
    struct open_text *t = find_text_locked(id);
    int rc = !t ? -EBADF : t->running ? -EBUSY : 0;
    pthread_mutex_unlock(&open_texts_lock);
    return rc;
}

static bool request_interrupted(void *req) { return fuse_req_interrupted(req); }

/* Takes the deferred work of handle id out of it for one op, marked
 * running (the others get EBUSY), if it has some that wanted says is for
 * this op (control_ready for a read, control_receiving for a write); else
 * NULL, with *rc -EBADF when the handle is not ours, -EBUSY while another
 * op has it, or 0. */
static struct control_deferred *take_deferred(uint64_t id, bool (*wanted)(const struct control_deferred *), int *rc)
{
    pthread_mutex_lock(&open_texts_lock);
    struct open_text *t = find_text_locked(id);
    *rc = !t ? -EBADF : t->running ? -EBUSY : 0;
    struct control_deferred *d = *rc ? NULL : t->deferred;
    if (d && !wanted(d))
        d = NULL;
    if (d) {
        t->deferred = NULL;
        t->running = true;
    }
    pthread_mutex_unlock(&open_texts_lock);
    return d;
}

/* The first read of a handle with deferred work (vm-export,
 * vm-import-stream) does it. The write that asked for it has returned, so
 * the kernel lets other commands through meanwhile; an interrupted reader
 * stops an export or an import (and the import is undone). */
static int run_deferred(fuse_req_t req, uint64_t id)
{
    int rc;
    struct control_deferred *d = take_deferred(id, control_ready, &rc);
    if (!d)
        return rc;
    struct open_text *t;
    int fd;
    uint64_t size = 0;
    char *answer;
    control_run_deferred(fs_of(req), d, request_interrupted, req, &fd, &size, &answer);
    control_deferred_free(d);
    pthread_mutex_lock(&open_texts_lock);
    if ((t = find_text_locked(id)) != NULL) { /* else released meanwhile */
        t->running = false;
        if (answer) {
            free(t->text);
            t->text = answer, answer = NULL;
            t->len = strlen(t->text);
            t->data_fd = fd, fd = -1;
            t->data_len = size;
        } else {
            rc = -ENOMEM;
        }
    }
    pthread_mutex_unlock(&open_texts_lock);
    free(answer);
    if (fd >= 0)
        close(fd);
    return rc;
}

static void text_read(fuse_req_t req, uint64_t id, size_t size, off_t off)
{
    int err = -run_deferred(req, id);
    char *slice = NULL;
    size_t len = 0;
    int data_fd = -1;
    off_t data_off = 0;
    pthread_mutex_lock(&open_texts_lock);
    struct open_text *t = err ? NULL : find_text_locked(id);
    if (!err && !t)
        err = EBADF;
    if (t && off >= 0 && (uint64_t)off < t->len) {
        len = size < t->len - (size_t)off ? size : t->len - (size_t)off;
        if ((slice = malloc(len)) != NULL)
            memcpy(slice, t->text + off, len);
        else
            err = ENOMEM;
    } else if (t && off >= 0 && t->data_fd >= 0 && (uint64_t)off - t->len < t->data_len) {
        /* A dup, so that a RELEASE meanwhile cannot close it under us. */
        data_off = (off_t)((uint64_t)off - t->len);
        len = size < t->data_len - (uint64_t)data_off ? size : (size_t)(t->data_len - (uint64_t)data_off);
        if ((data_fd = fcntl(t->data_fd, F_DUPFD_CLOEXEC, 0)) < 0)
            err = errno;
    }
    pthread_mutex_unlock(&open_texts_lock);
    if (err) {
        fuse_reply_err(req, err);
    } else if (data_fd >= 0) {
        struct fuse_bufvec buf = FUSE_BUFVEC_INIT(len);
        buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
        buf.buf[0].fd = data_fd;
        buf.buf[0].pos = data_off;
        fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
        close(data_fd);
    } else {
        fuse_reply_buf(req, slice, len);
    }
    free(slice);
}

/* Puts the answer of a control command on handle id (taking ownership of
 * its text); the payload of the command before goes. */
static int text_answer(uint64_t id, struct control_answer *a)
{
    int old_fd = -1;
    pthread_mutex_lock(&open_texts_lock);
    struct open_text *t = find_text_locked(id);
    struct control_deferred *old_deferred = NULL;
    if (t && !t->running) {
        free(t->text);
        t->text = a->text, a->text = NULL;
        t->len = a->len;
        old_fd = t->data_fd;
        t->data_fd = -1;
        t->data_len = 0;
        old_deferred = t->deferred;
        t->deferred = a->deferred, a->deferred = NULL;
    }
    bool busy = t && t->running;
    pthread_mutex_unlock(&open_texts_lock);
    control_answer_free(a);
    control_deferred_free(old_deferred);
    if (old_fd >= 0)
        close(old_fd);
    return !t ? -EBADF : busy ? -EBUSY : 0;
}

/* A write to a handle that took vm-import-stream carries the stream's next
 * bytes (fs.h), never a command: returns false when it is not such a
 * handle. The bytes go to the staged copy with no lock held; a RELEASE
 * meanwhile (a killed imgfsctl) finds the stream gone from its handle, and
 * the copy is dropped here. */
static bool text_receive(fuse_req_t req, uint64_t id, const char *buf, size_t size, off_t off)
{
    int rc;
    struct control_deferred *d = take_deferred(id, control_receiving, &rc);
    if (!d && rc == -EBUSY) {
        /* A read runs this handle's deferred work: these bytes may be the
         * stream's, never a command. */
        fuse_reply_err(req, EBUSY);
        return true;
    }
    if (!d)
        return false;
    rc = control_receive(fs_of(req), d, buf, size, off < 0 ? UINT64_MAX : (uint64_t)off);
    pthread_mutex_lock(&open_texts_lock);
    struct open_text *t = find_text_locked(id);
    if (t) {
        t->running = false;
        t->deferred = d, d = NULL;
    }
    pthread_mutex_unlock(&open_texts_lock);
    control_deferred_free(d);
    if (rc)
        fuse_reply_err(req, -rc);
    else
        fuse_reply_write(req, size);
    return true;
}

static void text_release(uint64_t id)
{
    struct open_text *dead = NULL;
    pthread_mutex_lock(&open_texts_lock);
    for (struct open_text **p = &open_texts; *p; p = &(*p)->next) {
        if ((*p)->id == id) {
            dead = *p;
            *p = dead->next;
            break;
        }
    }
    pthread_mutex_unlock(&open_texts_lock);
    if (dead) {
        if (dead->data_fd >= 0)
            close(dead->data_fd);
        control_deferred_free(dead->deferred); /* a stream cut short: its staged copy goes */
        free(dead->text);
        free(dead);
    }
}

/* ---- open / read / write ------------------------------------------------------ */

static void open_text_file(fuse_req_t req, struct imgfs *fs, const struct node *n, struct fuse_file_info *fi)
{
    char *text = NULL;
    size_t len = 0;
    int rc = 0;
    if (n->kind == NODE_STATUS_FILE) {
        maybe_refresh(fs);
        rc = status_render_file(fs, n->ino, &text, &len);
        if (!rc)
            note_status_len(n->ino, len);
    } else if (fuse_req_ctx(req)->uid != 0) {
        rc = -EACCES; /* commands change VMs: root only, with or without default_permissions */
    } else {
        text = strdup("");
        rc = text ? 0 : -ENOMEM;
    }
    if (rc) {
        fuse_reply_err(req, -rc);
        return;
    }
    fi->fh = text_open(n->ino, fuse_req_ctx(req)->pid, text, len);
    if (!fi->fh) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    fi->direct_io = 1;
    fuse_reply_open(req, fi);
}

/* Work that goes with an open VM disk: the base's recorded working set goes
 * ahead of the guest, and the background fill if asked for. */
static void start_vm_disk_work(struct imgfs *fs, struct vm *vm)
{
    const struct vm_base *base = vm_get_base(vm, NULL);
    if (base && strcmp(fs->opts->prefetch, "none") != 0)
        prefetch_replay(fs->prefetcher, fs->repo, base->manifest, fs->opts->prefetch, fs->opts->prefetch_ahead,
                        base->marks);
    if (base && fs->opts->background_rate)
        prefetch_background(fs->prefetcher, base->manifest, fs->opts->background_rate, base->marks);
}

/* Gives an open image file a handle slot that outlives this server
 * (takeover.h); fails only when the table is full. */
static bool take_handle(struct imgfs *fs, const struct node *n, struct fuse_file_info *fi)
{
    if (!fs->takeover)
        return true;
    fi->fh = takeover_handle_open(fs->takeover, n->ino, n->kind == NODE_VM_FILE);
    if (!fi->fh)
        log_warn("open %s: all %d file handles are in use", n->name, TAKEOVER_MAX_HANDLES);
    return fi->fh != 0;
}

/* Opens the live disk of VM node n for fi: counted (-ENOENT once removed),
 * given a handle slot (-ENFILE when the table is full), its base's work
 * started and its cache mode set. */
static int open_vm_disk(struct imgfs *fs, const struct node *n, struct fuse_file_info *fi)
{
    struct vm *vm = n->vm;
    int rc = vm_open(vm, NULL);
    if (rc)
        return rc;
    if (!take_handle(fs, n, fi)) {
        vm_close(vm, NULL);
        return -ENFILE;
    }
    start_vm_disk_work(fs, vm);
    if (fs->opts->vm_writeback) {
        /* Every change to a VM disk passes through this kernel, so its
         * page cache stays right and may be kept across opens. */
        fi->keep_cache = 1;
    } else {
        /* Each request goes to us as it is: no readahead of a guest's
         * random reads, and no attribute round trip before every write
         * (the kernel asks for the size before each write-through); and a
         * guest's queue of writes reaches us at once, not one at a time. */
        fi->direct_io = 1;
        serve_add_open_flags(SERVE_FOPEN_PARALLEL_DIRECT_WRITES);
    }
    return 0;
}

void fs_restore_open_handles(struct imgfs *fs)
{
    unsigned disks = 0, files = 0;
    for (size_t i = 0; fs->takeover && i < TAKEOVER_MAX_HANDLES; i++) {
        uint64_t ino = atomic_load(&fs->takeover->handles[i].ino);
        struct node *n = ino ? tree_get(fs->tree, ino) : NULL;
        if (!n)
            continue;
        files++;
        if (n->kind == NODE_BASE_FILE && fs->passthrough)
            passthrough_restore(fs->passthrough, n->version, atomic_load(&fs->takeover->handles[i].backing_id));
        if (is_vm_node(n))
            vm_open_taken_over(n->vm, n->snapshot);
        if (n->kind == NODE_VM_FILE) {
            disks++;
            start_vm_disk_work(fs, n->vm);
        }
    }
    if (files)
        log_info("took over %u open files (%u VM disks)", files, disks);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = live_node(fs, ino);
    if (!n) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    bool writing = (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC);
    switch (n->kind) {
    case NODE_BASE_FILE:
    case NODE_VM_SNAPSHOT:
        if (writing) {
            fuse_reply_err(req, EROFS);
            return;
        }
        if (!take_handle(fs, n, fi)) {
            fuse_reply_err(req, ENFILE);
            return;
        }
        if (n->kind == NODE_BASE_FILE && fs->opts->background_rate)
            prefetch_background(fs->prefetcher, n->version->manifest, fs->opts->background_rate,
                                &n->version->marks);
        if (n->kind == NODE_VM_SNAPSHOT)
            vm_open(n->vm, n->snapshot); /* cannot fail for a snapshot */
        bool counted = n->kind == NODE_BASE_FILE && fs->passthrough && fs->takeover;
        int backing = counted ? passthrough_open(fs->passthrough, n->version, fi->fh) : 0;
        if (backing)
            serve_set_open_backing(backing); /* the kernel refuses keep_cache with it */
        else
            fi->keep_cache = 1; /* these bytes never change */
        /* An open that never reached the caller gets no RELEASE: a normal
         * one left counted would keep its version from passing through. */
        if (fuse_reply_open(req, fi) != 0 && counted) {
            passthrough_release(fs->passthrough, n->version, fi->fh);
            takeover_handle_release(fs->takeover, fi->fh, n->ino);
        }
        return;
    case NODE_VM_FILE: {
        int rc = open_vm_disk(fs, n, fi);
        if (rc)
            fuse_reply_err(req, -rc);
        else
            fuse_reply_open(req, fi);
        return;
    }
    case NODE_STATUS_FILE:
        if (writing) {
            fuse_reply_err(req, EROFS);
            return;
        }
        open_text_file(req, fs, n, fi);
        return;
    case NODE_CONTROL_FILE:
        open_text_file(req, fs, n, fi);
        return;
    default:
        fuse_reply_err(req, EISDIR);
    }
}

/* ---- reading base and VM disks ------------------------------------------------
 *
 * Replies are asynchronous: libfuse allows fuse_reply_* from any thread once
 * the op has returned. A read maps its range (under chain_lock, briefly),
 * asks the fetch engine for every base chunk it needs at once, and returns.
 * The reply is built when the last chunk is in hand: at once, in the FUSE
 * worker, when they were all cached; otherwise in the engine thread that
 * completed the last one. A read waiting on the network so holds neither a
 * FUSE worker nor a lock, and the workers stay free for ls, the status
 * files, control commands and cached reads however many reads wait (the
 * other choice, a pool of threads kept apart for waiting reads, only runs
 * out later). */

/* A zero-copy reply: buffers that point into pinned chunks in cache packs, chunks in
 * memory, layer data or the zero block. Layer extents are released after
 * the reply has been sent. */
struct reply_bufs {
    struct fuse_bufvec *bv;
    size_t cap;
    struct layer_extent *extents;
    struct layer **extent_layers;
    size_t nextents;
};

static int bufs_init(struct reply_bufs *r, size_t cap)
{
    r->cap = cap;
    r->nextents = 0;
    r->bv = calloc(1, sizeof(*r->bv) + cap * sizeof(struct fuse_buf));
    r->extents = calloc(cap, sizeof(*r->extents));
    r->extent_layers = calloc(cap, sizeof(*r->extent_layers));
    return r->bv && r->extents && r->extent_layers ? 0 : -ENOMEM;
}

static void bufs_free(struct reply_bufs *r)
{
    for (size_t i = 0; i < r->nextents; i++)
        layer_extent_release(r->extent_layers[i], &r->extents[i]);
    free(r->extents);
    free(r->extent_layers);
    free(r->bv);
}

static struct fuse_buf *bufs_next(struct reply_bufs *r)
{
    return r->bv->count < r->cap ? &r->bv->buf[r->bv->count++] : NULL;
}

static int bufs_add_fd(struct reply_bufs *r, int fd, uint64_t pos, uint64_t size)
{
    struct fuse_buf *b = bufs_next(r);
    if (!b)
        return -E2BIG;
    b->flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    b->fd = fd;
    b->pos = (off_t)pos;
    b->size = (size_t)size;
    return 0;
}

static int bufs_add_mem(struct reply_bufs *r, const char *mem, uint64_t size)
{
    struct fuse_buf *b = bufs_next(r);
    if (!b)
        return -E2BIG;
    b->mem = (void *)mem;
    b->size = (size_t)size;
    return 0;
}

static int bufs_add_zero(struct reply_bufs *r, uint64_t size)
{
    for (uint64_t done = 0; done < size;) {
        uint64_t n = size - done < sizeof(zero_block) ? size - done : sizeof(zero_block);
        int rc = bufs_add_mem(r, zero_block, n);
        if (rc)
            return rc;
        done += n;
    }
    return 0;
}

/* Adds [start, start+len) of a layer that owns all of it. */
static int bufs_add_layer(struct reply_bufs *r, struct layer *layer, uint64_t start, uint64_t len)
{
    for (uint64_t end = start + len; start < end;) {
        if (r->nextents == r->cap)
            return -E2BIG;
        struct layer_extent *e = &r->extents[r->nextents];
        int rc = layer_extent_at(layer, start, end - start, e);
        if (rc)
            return rc;
        r->extent_layers[r->nextents++] = layer;
        rc = e->kind == LAYER_EXTENT_DATA   ? bufs_add_fd(r, e->fd, e->pos, e->len)
             : e->kind == LAYER_EXTENT_ZERO ? bufs_add_zero(r, e->len)
                                            : -EIO; /* not owned: the chain changed under us */
        if (rc)
            return rc;
        start += e->len;
    }
    return 0;
}

/* One read of a base or VM disk, from its submission to its reply. */
struct image_read {
    fuse_req_t req;
    struct imgfs *fs;
    const struct node *n;
    struct vm *vm;                   /* a VM disk's read, or NULL for a base's */
    const struct vm_snapshot *snap;  /* which disk of vm: NULL for the live one */
    const struct vm_base *base;      /* the disk's base, or NULL */
    struct disk base_only;           /* a base read: the base under no layer */
    struct chunk_trace *trace;  /* recording the VM's reads, or NULL */
    uint64_t start, end;
    uint64_t first;     /* index of the first base chunk of the range */
    size_t count;       /* base chunks in the range */
    atomic_int pending; /* chunk requests outstanding, plus one while submitting */
    atomic_int err;     /* fetch_note_error */
    uint8_t *wanted;         /* per chunk: the reply needs it */
    bool reads_base;         /* some of the range is the base's (data or zero chunks) */
    struct fetch_ref refs[]; /* per chunk: what the engine gave */
};

/* The disk of the read, with a VM disk's chain held stable until
 * read_release (vm_read_begin); a base has no chain. */
static const struct disk *read_hold(struct image_read *op, struct chunk_trace **trace)
{
    if (op->vm)
        return vm_read_begin(op->vm, op->snap, trace);
    *trace = NULL;
    return &op->base_only;
}

static void read_release(struct image_read *op)
{
    if (op->vm)
        vm_read_end(op->vm);
}

/* disk_map callback while submitting: marks the base chunks the read needs
 * and records them in the VM's trace. */
static int want_extent(void *ctx, const struct disk_extent *e)
{
    struct image_read *op = ctx;
    if (e->kind != DISK_EXTENT_LAYER)
        op->reads_base = true;
    if (e->kind == DISK_EXTENT_BASE) {
        op->wanted[e->chunk - op->first] = 1;
        if (op->trace)
            trace_note(op->trace, e->chunk);
    }
    return 0;
}

struct reply_walk {
    struct reply_bufs *r;
    struct image_read *op;
};

/* disk_map callback while replying: one buffer per extent, from the chunks
 * in hand, the layers or the zero block. */
static int reply_extent(void *ctx, const struct disk_extent *e)
{
    struct reply_walk *w = ctx;
    const struct fetch_ref *ref;
    switch (e->kind) {
    case DISK_EXTENT_LAYER:
        return bufs_add_layer(w->r, e->layer, e->off, e->len);
    case DISK_EXTENT_ZERO:
        return bufs_add_zero(w->r, e->len);
    case DISK_EXTENT_BASE:
        if (!w->op->wanted[e->chunk - w->op->first])
            return -EIO; /* not mapped to the base when submitted: cannot happen */
        ref = &w->op->refs[e->chunk - w->op->first];
        if (ref->data)
            return bufs_add_mem(w->r, ref->data + e->chunk_off, e->len);
        /* The bytes the cache just read to check them, else the pack. */
        const char *checked = cache_pin_bytes(&ref->pin, e->chunk_off, e->len);
        return checked ? bufs_add_mem(w->r, checked, e->len)
                       : bufs_add_fd(w->r, ref->pin.fd, ref->pin.off + e->chunk_off, e->len);
    }
    return -EIO;
}

/* Sends the buffers. When none is a file (chunks in memory, bytes the
 * cache checked, zeros) they go out in one writev, which fuse_reply_data()
 * would only do for a single buffer (more go through a pipe or a copy). */
#define REPLY_IOV_MAX 64
static void bufs_reply(fuse_req_t req, const struct reply_bufs *r)
{
    const struct fuse_bufvec *bv = r->bv;
    struct iovec iov[REPLY_IOV_MAX];
    bool in_memory = bv->count <= REPLY_IOV_MAX;
    for (size_t i = 0; in_memory && i < bv->count; i++) {
        in_memory = !(bv->buf[i].flags & FUSE_BUF_IS_FD);
        iov[i] = (struct iovec){.iov_base = bv->buf[i].mem, .iov_len = bv->buf[i].size};
    }
    if (in_memory)
        fuse_reply_iov(req, iov, (int)bv->count);
    else
        fuse_reply_data(req, r->bv, FUSE_BUF_SPLICE_MOVE);
}

static void read_reply(struct image_read *op)
{
    struct reply_bufs r;
    /* Worst case: every 4 KiB block from a different place, plus zero runs. */
    size_t size = (size_t)(op->end - op->start);
    int rc = atomic_load(&op->err);
    if (!rc)
        rc = bufs_init(&r, (size / 4096 + 2) * 2 + size / sizeof(zero_block) + 2);
    if (rc) {
        fuse_reply_err(op->req, rc == -ENOMEM ? ENOMEM : EIO);
        return;
    }
    struct chunk_trace *unused;
    const struct disk *disk = read_hold(op, &unused);
    struct reply_walk walk = {&r, op};
    rc = disk_map(disk, op->start, op->end - op->start, reply_extent, &walk);
    if (rc)
        fuse_reply_err(op->req, rc == -ENOMEM ? ENOMEM : EIO);
    else
        bufs_reply(op->req, &r);
    read_release(op);
    bufs_free(&r);
}

static void read_finish(struct image_read *op)
{
    read_reply(op);
    for (size_t k = 0; k < op->count; k++) {
        if (!op->wanted[k])
            continue;
        if (!atomic_load(&op->err))
            prefetch_note_read(op->base->marks, op->first + k, op->refs[k].hit);
        fetch_ref_release(op->fs->fetcher, &op->refs[k]);
    }
    free(op);
}

static void read_put(struct image_read *op)
{
    if (atomic_fetch_sub(&op->pending, 1) == 1)
        read_finish(op);
}

static void read_chunk_done(void *arg, int err)
{
    struct image_read *op = arg;
    if (err)
        fetch_note_error(&op->err, err);
    read_put(op);
}

static void read_image(fuse_req_t req, struct imgfs *fs, struct node *n, size_t size, off_t off)
{
    struct vm *vm = is_vm_node(n) ? n->vm : NULL;
    const struct vm_snapshot *snap = n->kind == NODE_VM_SNAPSHOT ? n->snapshot : NULL;
    uint64_t disk_size = vm ? vm_size(vm) : n->version->manifest->size;
    if (off < 0 || (uint64_t)off >= disk_size || size == 0) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    uint64_t start = (uint64_t)off;
    uint64_t end = start + size < disk_size ? start + size : disk_size;
    const struct vm_base *base = vm ? vm_get_base(vm, snap) : &n->version->view;
    uint64_t cs = base ? base->manifest->chunk_size : 1;
    size_t count = base ? (size_t)((end - 1) / cs - start / cs + 1) : 0;
    struct image_read *op = calloc(1, sizeof(*op) + count * (sizeof(struct fetch_ref) + 1));
    if (!op) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    *op = (struct image_read){.req = req, .fs = fs, .n = n, .vm = vm, .snap = snap, .base = base, .start = start,
                              .end = end, .first = start / cs, .count = count};
    if (!vm)
        op->base_only = (struct disk){.size = disk_size, .base = base};
    op->wanted = (uint8_t *)&op->refs[count];
    atomic_init(&op->pending, 1);
    const struct disk *disk = read_hold(op, &op->trace);
    disk_map(disk, start, end - start, want_extent, op);
    op->trace = NULL; /* valid only while held: not used after this */
    read_release(op);
    /* Every missing chunk of the read is asked for at once. */
    uint64_t deadline = fetch_deadline(fs->fetcher);
    for (size_t k = 0; k < count; k++) {
        if (!op->wanted[k])
            continue;
        atomic_fetch_add(&op->pending, 1);
        /* The reply reads only the part of the chunk inside the read. */
        uint64_t chunk_start = (op->first + k) * cs;
        uint64_t lo = start > chunk_start ? start - chunk_start : 0;
        uint64_t hi = end < chunk_start + cs ? end - chunk_start : cs;
        int rc = fetch_start_range(fs->fetcher, &base->manifest->chunks[op->first + k], (uint32_t)cs, (uint32_t)lo,
                                   (uint32_t)(hi - lo), FETCH_DEMAND, deadline, base->counters, &op->refs[k],
                                   read_chunk_done, op);
        if (rc != FETCH_PENDING) {
            if (rc < 0)
                fetch_note_error(&op->err, rc);
            atomic_fetch_sub(&op->pending, 1);
        }
    }
    /* A read of the base's zero chunks goes on with the run too: else a
     * sequential reader of a disk with holes (a quarter of the benchmark
     * image) lost its readahead at each hole and waited on every chunk. */
    if (base && op->reads_base)
        prefetch_readahead(fs->fetcher, base->manifest, &n->readahead, base->counters, op->first,
                           op->first + count - 1);
    read_put(op);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_get(fs->tree, ino);
    if (n && (n->kind == NODE_STATUS_FILE || n->kind == NODE_CONTROL_FILE))
        text_read(req, fi->fh, size, off);
    else if (n && (n->kind == NODE_BASE_FILE || is_vm_node(n))) {
        if (n->kind == NODE_BASE_FILE)
            atomic_fetch_add_explicit(&n->version->pt.reads, 1, memory_order_relaxed);
        read_image(req, fs, n, size, off);
    }
    else
        fuse_reply_err(req, EBADF);
}

struct write_reply {
    fuse_req_t req;
    size_t size;
    bool cut_is_error; /* cut at the end of the disk, in writeback mode */
};

static void write_done(void *arg, int rc)
{
    struct write_reply *w = arg;
    if (!rc && w->cut_is_error)
        rc = -ENOSPC;
    if (rc)
        fuse_reply_err(w->req, -rc);
    else
        fuse_reply_write(w->req, w->size);
    free(w);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_get(fs->tree, ino);
    if (n && n->kind == NODE_CONTROL_FILE) {
        /* A handle from a previous server (takeover.h) runs nothing: its
         * imgfsctl would never read the answer. */
        int rc = text_takes_command(fi->fh);
        if (rc) {
            fuse_reply_err(req, -rc);
            return;
        }
        if (text_receive(req, fi->fh, buf, size, off))
            return;
        struct control_answer answer;
        rc = control_execute(fs, buf, size, &answer);
        if (!rc)
            rc = text_answer(fi->fh, &answer);
        if (rc)
            fuse_reply_err(req, -rc);
        else
            fuse_reply_write(req, size);
        return;
    }
    if (!n || n->kind != NODE_VM_FILE) {
        fuse_reply_err(req, EBADF);
        return;
    }
    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    /* A disk does not grow: a write that starts past the end fails, one
     * that crosses it is cut there (a short write, as on a block device).
     * The writeback cache ignores short writes, so there the part inside is
     * kept and the error is reported, on fsync or close. */
    uint64_t disk_size = vm_size(n->vm);
    if ((uint64_t)off >= disk_size) {
        fuse_reply_err(req, ENOSPC);
        return;
    }
    struct write_reply *w = malloc(sizeof(*w));
    if (!w) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    bool cut = size > disk_size - (uint64_t)off;
    if (cut)
        size = (size_t)(disk_size - (uint64_t)off);
    *w = (struct write_reply){.req = req, .size = size, .cut_is_error = cut && fs->opts->vm_writeback};
    /* A copy-up that must fetch base chunks replies from the fetch engine
     * once they came: no FUSE worker waits on the network. */
    /* The kernel passes the file's open flags with each write: a guest that
     * opened its disk with O_DIRECT gets its bytes written to the device
     * before the reply, as a local file would (writeback pages never). */
    unsigned flags = (fi->flags & O_DIRECT) && !fi->writepage ? VM_WRITE_THROUGH : 0;
    int rc = vm_write_start(n->vm, fs->fetcher, buf, size, (uint64_t)off, flags, write_done, w);
    if (rc != VM_WRITE_PENDING)
        write_done(w, rc);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)datasync, (void)fi;
    struct node *n = tree_get(fs_of(req)->tree, ino);
    int rc = n && n->kind == NODE_VM_FILE ? vm_flush(n->vm) : 0;
    fuse_reply_err(req, -rc);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino, (void)fi;
    fuse_reply_err(req, 0); /* durability is fsync's job */
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, struct fuse_file_info *fi)
{
    (void)fi;
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_get(fs->tree, ino);
    if (!n || n->kind != NODE_VM_FILE) {
        fuse_reply_err(req, n && is_vm_node(n) ? EROFS : EOPNOTSUPP);
        return;
    }
    if (off < 0 || len <= 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    int rc;
    if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) || mode == FALLOC_FL_ZERO_RANGE ||
        mode == (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
        rc = vm_discard(n->vm, fs->fetcher, (uint64_t)off, (uint64_t)len);
    else if (mode == 0 || mode == FALLOC_FL_KEEP_SIZE)
        rc = (uint64_t)off + (uint64_t)len <= vm_size(n->vm) ? 0 : -EFBIG; /* a disk is fully sized */
    else
        rc = -EOPNOTSUPP;
    fuse_reply_err(req, -rc);
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
    (void)fi;
    struct imgfs *fs = fs_of(req);
    struct node *n = tree_get(fs->tree, ino);
    if (!n || (whence != SEEK_DATA && whence != SEEK_HOLE) || off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    int64_t pos;
    if (n->kind == NODE_BASE_FILE) {
        struct disk base_only = {.size = n->version->manifest->size, .base = &n->version->view};
        pos = disk_seek(&base_only, (uint64_t)off, whence);
    } else if (is_vm_node(n)) {
        pos = vm_seek(n->vm, n->kind == NODE_VM_SNAPSHOT ? n->snapshot : NULL, (uint64_t)off, whence);
    } else {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (pos < 0)
        fuse_reply_err(req, (int)-pos);
    else
        fuse_reply_lseek(req, (off_t)pos);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct node *n = tree_get(fs_of(req)->tree, ino);
    if (n && (n->kind == NODE_STATUS_FILE || n->kind == NODE_CONTROL_FILE)) {
        text_release(fi->fh);
        if (n->kind == NODE_CONTROL_FILE)
            fs_control_released(fs_of(req));
    } else if (n && (is_vm_node(n) || n->kind == NODE_BASE_FILE)) {
        /* A handle that is not in the table (given before a takeover whose
         * table it did not reach) was not counted either. */
        struct imgfs *fs = fs_of(req);
        if (n->kind == NODE_BASE_FILE && fs->passthrough && fs->takeover && fi->fh && fi->fh <= TAKEOVER_MAX_HANDLES &&
            atomic_load(&fs->takeover->handles[fi->fh - 1].ino) == ino)
            passthrough_release(fs->passthrough, n->version, fi->fh);
        bool counted = !fs_of(req)->takeover || takeover_handle_release(fs_of(req)->takeover, fi->fh, ino);
        if (counted && is_vm_node(n))
            vm_close(n->vm, n->snapshot);
    }
    fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    (void)ino;
    struct imgfs *fs = fs_of(req);
    struct statvfs sv;
    const char *dir = fs->opts->state_dir ? fs->opts->state_dir : cache_dir(fs->cache);
    if (statvfs(dir, &sv) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
}

/* ---- extended attributes: user.imgfs.*, read-only (status.h) ------------------ */

/* Replies to a getxattr/listxattr of size bytes with value (NULL: none). */
static void reply_xattr_value(fuse_req_t req, size_t size, const char *value, size_t len)
{
    if (size == 0)
        fuse_reply_xattr(req, len);
    else if (size < len)
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, value, len);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = live_node(fs, ino);
    char *value = NULL;
    size_t len = 0;
    /* Only the user namespace exists here. ENOTSUP (not ENODATA) for the
     * others tells libvirt not to try to remember owners in trusted.* */
    int rc = !n ? -ENOENT : strncmp(name, "user.", 5) != 0 ? -ENOTSUP : status_xattr_get(fs, n, name, &value, &len);
    if (rc)
        fuse_reply_err(req, -rc);
    else
        reply_xattr_value(req, size, value, len);
    free(value);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    struct imgfs *fs = fs_of(req);
    struct node *n = live_node(fs, ino);
    char *names = NULL;
    size_t len = 0;
    int rc = n ? status_xattr_list(fs, n, &names, &len) : -ENOENT;
    if (rc)
        fuse_reply_err(req, -rc);
    else
        reply_xattr_value(req, size, names, len);
    free(names);
}

/* The user.imgfs.* values are figures of the daemon; nothing else is kept. */
static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size,
                        int flags)
{
    (void)ino, (void)value, (void)size, (void)flags;
    fuse_reply_err(req, strncmp(name, "user.imgfs.", 11) == 0 ? EPERM : ENOTSUP);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    (void)ino;
    fuse_reply_err(req, strncmp(name, "user.imgfs.", 11) == 0 ? EPERM : ENOTSUP);
}

/* Files are created and removed with imgfsctl, not with the usual calls. */
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

/* The VM name of "NAME.raw" in vms/ into out; -EINVAL for other names
 * (snapshots, VM@SNAP.raw, are made with imgfsctl vm snapshot). */
static int vm_file_name(const char *file, bool allow_snapshot, char *out, size_t len)
{
    size_t n = strlen(file);
    if (n <= 4 || n - 4 >= len || strcmp(file + n - 4, ".raw") != 0)
        return -EINVAL;
    snprintf(out, len, "%.*s", (int)(n - 4), file);
    return allow_snapshot || !strchr(out, '@') ? 0 : -EINVAL;
}

/* unlink of vms/VM.raw is vm rm, of vms/VM@SNAP.raw the removal of that
 * snapshot, with the same rules (EBUSY while open or cloned from). */
static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct imgfs *fs = fs_of(req);
    char vm_name[160], err[256];
    if (parent != INO_VMS) {
        fuse_reply_err(req, parent == INO_BASES ? EROFS : EPERM);
        return;
    }
    int rc = vm_file_name(name, true, vm_name, sizeof(vm_name));
    if (!rc && !tree_lookup(fs->tree, INO_VMS, name))
        rc = -ENOENT;
    if (!rc && (rc = fs_remove_disk(fs, vm_name, err, sizeof(err))) != 0)
        log_info("unlink vms/%s: %s", name, err);
    else if (!rc)
        log_info("unlink vms/%s: removed", name);
    if (rc == -ENOENT && serve_request_is_resent())
        rc = 0; /* the server that died had removed it (serve.h) */
    fuse_reply_err(req, rc == -EINVAL ? ENOENT : -rc);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
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

/* Creating vms/NAME.raw makes a blank VM disk of size 0, owned by the
 * caller; its first ftruncate gives it its size. */
static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
    struct imgfs *fs = fs_of(req);
    char vm_name[80], err[256];
    if (parent != INO_VMS) {
        fuse_reply_err(req, parent == INO_BASES ? EROFS : EPERM);
        return;
    }
    if (vm_file_name(name, false, vm_name, sizeof(vm_name)) != 0 || !S_ISREG(mode)) {
        log_info("create vms/%s: only NAME.raw files (VM disks) can be created in vms/", name);
        fuse_reply_err(req, EINVAL);
        return;
    }
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    struct vm *vm;
    int rc = vm_create_empty(fs->vms, vm_name, mode & 07777, ctx->uid, ctx->gid, &vm, err, sizeof(err));
    if (rc == -EEXIST && serve_request_is_resent() && (vm = vm_find(fs->vms, vm_name)) != NULL)
        rc = 0; /* the server that died had made it (serve.h): open it */
    if (!rc && (rc = tree_add_vm(fs->tree, vm)) != 0)
        snprintf(err, sizeof(err), "out of memory");
    struct node *n = rc ? NULL : tree_lookup(fs->tree, INO_VMS, name);
    if (!rc && !n)
        rc = -ENOMEM;
    if (!rc)
        rc = open_vm_disk(fs, n, fi);
    if (rc) {
        log_info("create vms/%s: %s", name, err);
        fuse_reply_err(req, -rc);
        return;
    }
    log_info("create vms/%s: blank VM disk %s", name, vm_name);
    struct fuse_entry_param e;
    fill_entry(req, n, &e);
    if (fuse_reply_create(req, &e, fi) != 0) { /* the open never reached the caller */
        if (fs->takeover)
            takeover_handle_release(fs->takeover, fi->fh, n->ino);
        vm_close(vm, NULL);
    }
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
    .rmdir = op_rmdir,
    .rename = op_rename,
    .create = op_create,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .fsync = op_fsync,
    .release = op_release,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .statfs = op_statfs,
    .fallocate = op_fallocate,
    .lseek = op_lseek,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .setxattr = op_setxattr,
    .removexattr = op_removexattr,
};
