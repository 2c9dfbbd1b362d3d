/* fuse-null: FUSE ceilings for the benchmarks. One file, "disk", of SIZE
 * bytes, opened direct_io with FOPEN_PARALLEL_DIRECT_WRITES like an imgfs VM
 * disk in vm_cache=direct; with --base, opened read-only through the page
 * cache like an imgfs base file (keep_cache, the kernel's readahead of up to
 * 1 MiB, as fs/ops.c asks for), the passthrough of bench-cold-read.sh.
 * With --kernel (and a BACKING), read-only too, but READ never reaches this
 * server: the open hands BACKING to the kernel (FUSE_PASSTHROUGH, Linux 6.9,
 * CONFIG_FUSE_PASSTHROUGH; root), which reads it itself, as if the reader
 * had opened BACKING. What FUSE does at best when no request comes to the
 * server; an open fails (EIO) where the kernel has no passthrough.
 *
 * Without BACKING (null mode, bench-vm.sh's "FUSE null"): WRITE, FSYNC
 * and FLUSH are answered at once and READ returns zeros. Nothing is stored:
 * the cost of libfuse's request handling with nothing behind it.
 *
 * With a BACKING file (passthrough mode, bench-vm.sh's "FUSE passthrough"),
 * a minimal file system that stores what it is given, durably, and nothing
 * more:
 *   READ   one pread(2) of BACKING (bench-cold-read.sh's ceiling)
 *   WRITE  one pwrite(2) into BACKING at the same offset. When the client
 *          opened "disk" with O_DIRECT (the kernel passes the open flags with
 *          each write), through a second, O_DIRECT descriptor of BACKING, from
 *          a per-thread aligned copy when FUSE's buffer is not aligned (it
 *          never is: the payload follows the request header); offsets and
 *          lengths that are not multiples of ALIGN, and a BACKING on a file
 *          system without O_DIRECT, use the buffered descriptor.
 *   FSYNC  fdatasync(2) of BACKING, for fsync and fdatasync alike (the size
 *          of a disk never changes), as an imgfs VM flush is one fdatasync
 *   FLUSH  answered at once: close without fsync promises nothing, and imgfs
 *          does the same (fs/ops.c op_flush)
 * BACKING must be at least SIZE bytes (bench-vm.sh gives it a preallocated
 * copy of the base, as the local file is).
 *
 * usage: fuse-null [--base|--kernel] MOUNTPOINT SIZE THREADS [BACKING]  (as root; stops on unmount)
 * THREADS workers each block in read(2) on the one /dev/fuse descriptor; in
 * passthrough mode a worker also waits for its pwrite or fdatasync, so
 * THREADS bounds the writes the device sees at once. */
#define _GNU_SOURCE /* O_DIRECT */
#define FUSE_USE_VERSION 34
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../include/fuse_passthrough_abi.h" /* Linux 6.9's passthrough interface */

static struct fuse_session *se;
static off_t disk_size;
static int backing_fd = -1;        /* passthrough mode: BACKING, buffered */
static int backing_direct_fd = -1; /* BACKING with O_DIRECT, or -1 where it has none */
static size_t max_write;           /* the largest WRITE, from init: a bounce buffer's size */
enum { ALIGN = 4096 };             /* O_DIRECT alignment of memory, offset and length */
static _Thread_local uint32_t open_flags; /* added to the next open reply */
static int base_mode;                     /* --base or --kernel: read-only, like an imgfs base file */
static int kernel_mode;                   /* --kernel: the kernel reads BACKING (FUSE_PASSTHROUGH) */
static int fuse_fd = -1;
static int backing_id = -1;               /* --kernel: BACKING registered with the kernel */
static pthread_mutex_t backing_lock = PTHREAD_MUTEX_INITIALIZER;

static void fill_stat(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = ino == FUSE_ROOT_ID ? S_IFDIR | 0755 : S_IFREG | 0644;
    st->st_nlink = ino == FUSE_ROOT_ID ? 2 : 1;
    st->st_size = ino == FUSE_ROOT_ID ? 0 : disk_size;
}

static void null_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (parent != FUSE_ROOT_ID || strcmp(name, "disk") != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    struct fuse_entry_param e = {.ino = 2, .attr_timeout = 3600, .entry_timeout = 3600};
    fill_stat(2, &e.attr);
    fuse_reply_entry(req, &e);
}

static void null_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    struct stat st;
    fill_stat(ino, &st);
    fuse_reply_attr(req, &st, 3600);
}

static void null_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    if (base_mode) {
        if ((fi->flags & O_ACCMODE) != O_RDONLY) {
            fuse_reply_err(req, EROFS);
            return;
        }
        if (kernel_mode) {
            /* Registered once, at the first open: INIT has enabled
             * passthrough by then. keep_cache would ask for FUSE's own page
             * cache, which a passthrough file does not use (the open fails). */
            pthread_mutex_lock(&backing_lock);
            if (backing_id < 0) {
                struct passthrough_backing_map map = {.fd = backing_fd};
                backing_id = ioctl(fuse_fd, PASSTHROUGH_BACKING_OPEN, &map);
                if (backing_id < 0)
                    fprintf(stderr, "fuse-null: the kernel refuses passthrough: %s\n", strerror(errno));
            }
            int id = backing_id;
            pthread_mutex_unlock(&backing_lock);
            if (id < 0) {
                fuse_reply_err(req, EIO);
                return;
            }
            open_flags = PASSTHROUGH_OPEN_FLAG;
        } else {
            fi->keep_cache = 1;
        }
    } else {
        fi->direct_io = 1;
        open_flags = FOPEN_PARALLEL_DIRECT_WRITES;
    }
    fuse_reply_open(req, fi);
}

/* The O_DIRECT descriptor for a write of SIZE bytes at OFF from a client
 * that opened the file with FLAGS, and the aligned bytes to write (BUF
 * itself, or this thread's copy of it); the buffered descriptor and BUF
 * when O_DIRECT does not apply. */
static int write_fd(int flags, const char **buf, size_t size, off_t off)
{
    static _Thread_local void *bounce; /* max_write bytes, aligned; lives as long as its thread */
    if (!(flags & O_DIRECT) || backing_direct_fd < 0 || size > max_write || off % ALIGN || size % ALIGN)
        return backing_fd;
    if ((uintptr_t)*buf % ALIGN) {
        if (!bounce && posix_memalign(&bounce, ALIGN, max_write) != 0) {
            bounce = NULL;
            return backing_fd;
        }
        *buf = memcpy(bounce, *buf, size);
    }
    return backing_direct_fd;
}

static void null_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    (void)ino;
    if (backing_fd < 0) {
        fuse_reply_write(req, size);
        return;
    }
    int fd = write_fd(fi->flags, &buf, size, off);
    ssize_t put = pwrite(fd, buf, size, off);
    if (put < 0)
        fuse_reply_err(req, errno);
    else
        fuse_reply_write(req, (size_t)put);
}

static void null_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)ino, (void)fi;
    static const char zeros[1 << 20];
    size_t left = off < disk_size ? (size_t)(disk_size - off) : 0;
    size = size < left ? size : left;
    size = size < sizeof(zeros) ? size : sizeof(zeros);
    if (backing_fd < 0) {
        fuse_reply_buf(req, zeros, size);
        return;
    }
    static _Thread_local char buf[1 << 20];
    ssize_t got = pread(backing_fd, buf, size, off);
    if (got < 0)
        fuse_reply_err(req, errno);
    else
        fuse_reply_buf(req, buf, (size_t)got);
}

static void null_ok(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino, (void)fi;
    fuse_reply_err(req, 0);
}

static void null_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)ino, (void)datasync, (void)fi;
    fuse_reply_err(req, backing_fd >= 0 && fdatasync(backing_fd) != 0 ? errno : 0);
}

static void null_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    conn->max_background = 64; /* as imgfs: a queue of 16 is not cut to 12 */
    conn->congestion_threshold = 48;
    max_write = conn->max_write;
    if (base_mode)
        conn->max_readahead = 1u << 20; /* as imgfs (fs/ops.c op_init) */
}

static const struct fuse_lowlevel_ops ops = {
    .init = null_init, .lookup = null_lookup, .getattr = null_getattr, .open = null_open,
    .read = null_read, .write = null_write, .flush = null_ok, .fsync = null_fsync};

/* libfuse 3.14 cannot set FOPEN_PARALLEL_DIRECT_WRITES: add it to the open
 * reply on its way out (as imgfs's fs/serve.c does). */
static ssize_t hook_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    if (open_flags && count == 2 && iov[1].iov_len == sizeof(struct fuse_open_out)) {
        struct fuse_open_out *out = iov[1].iov_base;
        out->open_flags |= open_flags;
        if (open_flags & PASSTHROUGH_OPEN_FLAG)
            out->padding = (uint32_t)backing_id; /* backing_id in protocol 7.40 */
    }
    open_flags = 0;
    if (kernel_mode && count == 2 && iov[1].iov_len == sizeof(struct fuse_init_out)) {
        struct fuse_init_out *out = iov[1].iov_base; /* the INIT reply: ask for passthrough */
        out->flags2 |= PASSTHROUGH_INIT_FLAG2;
        out->unused[0] = 1; /* max_stack_depth in 7.40: BACKING is on a plain file system */
        if (out->minor < 40)
            out->minor = 40;
    }
    return writev(fd, iov, count);
}

static ssize_t hook_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    return read(fd, buf, len);
}

static void *worker(void *arg)
{
    (void)arg;
    struct fuse_buf buf = {0};
    for (;;) {
        int res = fuse_session_receive_buf(se, &buf);
        if (res == -EINTR || res == -EAGAIN)
            continue;
        if (res <= 0)
            break; /* unmounted */
        fuse_session_process_buf(se, &buf);
    }
    exit(0);
}

int main(int argc, char **argv)
{
    if (argc > 1 && (strcmp(argv[1], "--base") == 0 || strcmp(argv[1], "--kernel") == 0)) {
        base_mode = 1;
        kernel_mode = strcmp(argv[1], "--kernel") == 0;
        argv[1] = argv[0];
        argv++, argc--;
    }
    if ((argc != 4 && argc != 5) || (disk_size = strtoll(argv[2], NULL, 10)) <= 0 || atoi(argv[3]) <= 0) {
        fprintf(stderr, "usage: fuse-null [--base|--kernel] MOUNTPOINT SIZE THREADS [BACKING]\n");
        return 2;
    }
    if (kernel_mode && argc != 5) {
        fprintf(stderr, "fuse-null: --kernel needs a BACKING file\n");
        return 2;
    }
    if (argc == 5) {
        if ((backing_fd = open(argv[4], (base_mode ? O_RDONLY : O_RDWR) | O_CLOEXEC)) < 0) {
            fprintf(stderr, "fuse-null: cannot open %s: %s\n", argv[4], strerror(errno));
            return 1;
        }
        if (!base_mode) /* writes only */
            backing_direct_fd = open(argv[4], O_RDWR | O_DIRECT | O_CLOEXEC); /* -1 (EINVAL) on tmpfs */
    }
    char *fuse_argv[] = {argv[0], NULL};
    struct fuse_args args = FUSE_ARGS_INIT(1, fuse_argv);
    se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    int fd = fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    char opts[128];
    snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fd);
    if (!se || fd < 0 || mount("fuse-null", argv[1], "fuse.fuse-null", MS_NOSUID | MS_NODEV, opts) != 0) {
        fprintf(stderr, "fuse-null: cannot mount %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    static const struct fuse_custom_io io = {.writev = hook_writev, .read = hook_read};
    if (fuse_session_custom_io(se, &io, fd) != 0) {
        fprintf(stderr, "fuse-null: fuse_session_custom_io failed\n");
        return 1;
    }
    for (int i = 1; i < atoi(argv[3]); i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, NULL) != 0) {
            fprintf(stderr, "fuse-null: cannot start a thread\n");
            return 1;
        }
    }
    worker(NULL);
    return 0;
}
