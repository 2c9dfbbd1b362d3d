#include "serve.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fuse_passthrough_abi.h"
#include "util.h"

struct server {
    struct fuse_session *se;
    struct takeover *takeover; /* may be NULL */
    int fd;
    unsigned count;
    pthread_t *threads;
    atomic_uint running; /* threads[0..running) were created */
    /* lock guards exited[]: a worker sets its flag as the last thing it
     * does, and wake_all() signals only workers whose flag is clear, so no
     * signal goes to a thread that serve_run() may have joined already. */
    pthread_mutex_t lock;
    bool *exited;
    struct worker_arg *args;
    atomic_bool stop;
    atomic_bool ended; /* the connection is gone */
    atomic_int error;  /* first unexpected read error, as a negative errno */
};

static void on_wake(int sig) { (void)sig; }

#define UNIQUE_RESEND (1ull << 63) /* FUSE_UNIQUE_RESEND, Linux 6.9 */
static _Thread_local bool request_resent;

bool serve_request_is_resent(void) { return request_resent; }

/* ---- the connection's I/O hooks ------------------------------------------ */

/* As libfuse sends them (linux/fuse.h): an open reply is the out header and
 * one struct fuse_open_out; a create reply the header, struct fuse_entry_out
 * and struct fuse_open_out. */
static _Thread_local uint32_t open_flags_to_add;
static _Thread_local int open_backing_id;       /* > 0: the next open reply passes through */
static _Thread_local bool init_wants_passthrough; /* the next reply is INIT's: ask for it */

void serve_add_open_flags(uint32_t flags) { open_flags_to_add |= flags; }

void serve_amend_init_passthrough(void) { init_wants_passthrough = true; }

void serve_set_open_backing(int id)
{
    open_backing_id = id;
    open_flags_to_add |= PASSTHROUGH_OPEN_FLAG;
}

int serve_backing_open(int fuse_fd, int fd)
{
    struct passthrough_backing_map map = {.fd = fd};
    int id = ioctl(fuse_fd, PASSTHROUGH_BACKING_OPEN, &map);
    return id > 0 ? id : id == 0 ? -EPROTO : -errno;
}

int serve_backing_close(int fuse_fd, int id)
{
    uint32_t value = (uint32_t)id;
    return ioctl(fuse_fd, PASSTHROUGH_BACKING_CLOSE, &value) == 0 ? 0 : -errno;
}

/* INIT's reply, when op_init asked (its thread's next reply): passthrough
 * with a stack depth of 1. max_stack_depth is the first word after flags2
 * (unused[0] in the 7.38 layout). */
static void amend_init_reply(struct iovec *iov, int count)
{
    if (count != 2 || iov[0].iov_len != sizeof(struct fuse_out_header) || iov[1].iov_len != sizeof(struct fuse_init_out))
        return;
    struct fuse_init_out out;
    memcpy(&out, iov[1].iov_base, sizeof(out));
    out.flags2 |= PASSTHROUGH_INIT_FLAG2;
    out.unused[0] = 1;
    memcpy(iov[1].iov_base, &out, sizeof(out));
}

static ssize_t hook_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    uint32_t add = open_flags_to_add;
    int backing_id = open_backing_id;
    open_flags_to_add = 0;
    open_backing_id = 0;
    if (init_wants_passthrough) {
        init_wants_passthrough = false;
        amend_init_reply(iov, count);
    }
    if (add && count == 2 && iov[0].iov_len == sizeof(struct fuse_out_header)) {
        size_t at = iov[1].iov_len == sizeof(struct fuse_open_out) ? 0
                    : iov[1].iov_len == sizeof(struct fuse_entry_out) + sizeof(struct fuse_open_out)
                        ? sizeof(struct fuse_entry_out)
                        : SIZE_MAX;
        if (at != SIZE_MAX) { /* libfuse's own reply buffer: ours to change until sent */
            struct fuse_open_out out;
            memcpy(&out, (char *)iov[1].iov_base + at, sizeof(out));
            out.open_flags |= add;
            if (backing_id > 0)
                out.padding = (uint32_t)backing_id; /* backing_id in protocol 7.40 */
            memcpy((char *)iov[1].iov_base + at, &out, sizeof(out));
        }
    }
    return writev(fd, iov, count);
}

static ssize_t hook_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    return read(fd, buf, len);
}

static ssize_t hook_splice_send(int fdin, off_t *offin, int fdout, off_t *offout, size_t len, unsigned int flags,
                                void *userdata)
{
    (void)userdata;
    return splice(fdin, offin, fdout, offout, len, flags);
}

int serve_attach(struct fuse_session *se, int fd)
{
    static const struct fuse_custom_io io = {
        .writev = hook_writev, .read = hook_read, .splice_send = hook_splice_send};
    return fuse_session_custom_io(se, &io, fd) == 0 ? 0 : -EINVAL;
}

void serve_prepare_signals(void)
{
    struct sigaction sa = {.sa_handler = on_wake}; /* no SA_RESTART: waits end with EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SERVE_WAKE_SIGNAL, &sa, NULL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SERVE_WAKE_SIGNAL);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
}

struct worker_arg {
    struct server *server;
    unsigned index;
};

static void wake_all(struct server *s)
{
    pthread_mutex_lock(&s->lock);
    unsigned n = atomic_load(&s->running);
    for (unsigned i = 0; i < n; i++)
        if (!s->exited[i])
            pthread_kill(s->threads[i], SERVE_WAKE_SIGNAL);
    pthread_mutex_unlock(&s->lock);
}

static void worker_exit(struct server *s, unsigned index)
{
    pthread_mutex_lock(&s->lock);
    s->exited[index] = true;
    pthread_mutex_unlock(&s->lock);
}

static void worker_loop(struct server *s);

/* The receive buffer. libfuse reads each request into buf.mem, the whole
 * of its buffer size at most (libfuse 3.14: FUSE_MAX_MAX_PAGES, 256
 * pages, and a header page); a WRITE's data follows its fuse_in_header and
 * fuse_write_in. Placed so that this data starts 4 KiB aligned, a guest's
 * O_DIRECT write goes to the log from it with no copy (the layer copies an
 * unaligned one for O_DIRECT: 20% of the server's CPU in 1 MiB writes).
 * Other libfuse versions, whose size is not known here, get libfuse's own
 * buffer (NULL: it allocates one). */
#define RECV_ALIGN 4096u
#define RECV_DATA_AT (sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in))
#if FUSE_MAJOR_VERSION == 3 && FUSE_MINOR_VERSION == 14
#define RECV_KNOWN 1 /* libfuse's size: FUSE_MAX_MAX_PAGES pages of the machine's page size and 4 KiB */
#else
#define RECV_KNOWN 0
#endif
static void *recv_buffer(void **base)
{
    *base = NULL;
    long page = sysconf(_SC_PAGESIZE); /* 64 KiB on some arm64 and ppc64le kernels: not a constant 4 KiB */
    size_t size = page > 0 ? 256u * (size_t)page + 4096u : 0;
    if (!RECV_KNOWN || !size || RECV_DATA_AT > RECV_ALIGN || posix_memalign(base, RECV_ALIGN, size + RECV_ALIGN) != 0)
        return *base = NULL;
    return (char *)*base + RECV_ALIGN - RECV_DATA_AT;
}

static void *worker(void *arg)
{
    const struct worker_arg *wa = arg;
    worker_loop(wa->server);
    worker_exit(wa->server, wa->index);
    return NULL;
}

static void worker_loop(struct server *s)
{
    sigset_t waiting; /* the mask inside epoll_pwait: the wake signal let through */
    pthread_sigmask(SIG_SETMASK, NULL, &waiting);
    sigdelset(&waiting, SERVE_WAKE_SIGNAL);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) < 0) {
        int e = -errno;
        int none = 0;
        atomic_compare_exchange_strong(&s->error, &none, e);
        if (ep >= 0)
            close(ep);
        atomic_store(&s->stop, true);
        wake_all(s);
        return;
    }
    struct fuse_buf buf = {0};
    void *recv_base;
    buf.mem = recv_buffer(&recv_base);
    while (!atomic_load(&s->stop)) {
        int n = epoll_pwait(ep, &ev, 1, -1, &waiting);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (n == 0)
            continue;
        int res = fuse_session_receive_buf(s->se, &buf);
        if (res == -EAGAIN || res == -EINTR)
            continue; /* another worker took it */
        if (res <= 0) {
            /* 0: ENODEV, the file system was unmounted or the connection
             * aborted; anything else is unexpected and ends the server. */
            if (res < 0) {
                int none = 0;
                atomic_compare_exchange_strong(&s->error, &none, res);
            }
            atomic_store(&s->ended, true);
            atomic_store(&s->stop, true);
            wake_all(s);
            break;
        }
        request_resent = false;
        if (!(buf.flags & FUSE_BUF_IS_FD) && (size_t)res >= 16) {
            uint64_t unique;
            memcpy(&unique, (const char *)buf.mem + 8, sizeof(unique)); /* fuse_in_header.unique */
            request_resent = (unique & UNIQUE_RESEND) != 0;
            if (s->takeover)
                takeover_note_request(s->takeover, buf.mem, (size_t)res);
        }
        fuse_session_process_buf(s->se, &buf);
        if (s->takeover)
            atomic_fetch_add_explicit(&s->takeover->requests_done, 1, memory_order_relaxed);
    }
    free(recv_base ? recv_base : buf.mem);
    close(ep);
}

struct server *serve_create(struct fuse_session *se, struct takeover *t, unsigned threads)
{
    struct server *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    pthread_mutex_init(&s->lock, NULL);
    s->threads = calloc(threads, sizeof(*s->threads));
    s->exited = calloc(threads, sizeof(*s->exited));
    s->args = calloc(threads, sizeof(*s->args));
    if (!s->threads || !s->exited || !s->args) {
        serve_destroy(s);
        return NULL;
    }
    s->se = se;
    s->takeover = t;
    s->fd = fuse_session_fd(se);
    s->count = threads;
    return s;
}

int serve_run(struct server *s)
{
    int flags = fcntl(s->fd, F_GETFL);
    if (flags < 0 || fcntl(s->fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -errno;
    unsigned started = 0;
    for (; started < s->count && !atomic_load(&s->stop); started++) {
        s->args[started] = (struct worker_arg){.server = s, .index = started};
        if (pthread_create(&s->threads[started], NULL, worker, &s->args[started]) != 0) {
            int none = 0;
            atomic_compare_exchange_strong(&s->error, &none, -EAGAIN);
            serve_stop(s);
            break;
        }
        atomic_store(&s->running, started + 1);
    }
    for (unsigned i = 0; i < started; i++)
        pthread_join(s->threads[i], NULL);
    int err = atomic_load(&s->error);
    if (err)
        return err;
    return atomic_load(&s->ended) ? SERVE_UNMOUNTED : SERVE_STOPPED;
}

void serve_stop(struct server *s)
{
    atomic_store(&s->stop, true);
    wake_all(s);
}

void serve_destroy(struct server *s)
{
    if (!s)
        return;
    pthread_mutex_destroy(&s->lock);
    free(s->threads);
    free(s->exited);
    free(s->args);
    free(s);
}
