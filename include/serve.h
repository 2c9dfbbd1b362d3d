/* serve: the server's receive loop on the shared /dev/fuse descriptor.
 *
 * imgfs runs its own loop instead of fuse_session_loop_mt for two reasons
 * (see takeover.h): it keeps the kernel's INIT request for the next server,
 * and it can stop reading cleanly for a hand-over. Each of a fixed number of
 * worker threads waits in epoll_pwait() on its own epoll instance
 * (EPOLLEXCLUSIVE, so one request wakes one worker), reads one request
 * without blocking (the descriptor is O_NONBLOCK: a worker that lost the race
 * for a request gets EAGAIN and waits again), and processes it with
 * fuse_session_process_buf(). SIGUSR1 is blocked in the workers except inside
 * epoll_pwait(), so serve_stop() can never lose its wake-up: a worker busy
 * with a request finds the signal pending at its next wait. A request a
 * worker has read is always processed, even after serve_stop(): libfuse's
 * fuse_session_exit() is not used for that, because after it libfuse drops
 * the request it has just read.
 *
 * Contract: serve_run() returns SERVE_UNMOUNTED when the connection ended
 * (unmount or abort), SERVE_STOPPED after serve_stop() once every worker has
 * finished the request it held, or a negative errno. serve_stop() may be
 * called from any thread, once serve_run() has started.
 */
#ifndef IMGFS_SERVE_H
#define IMGFS_SERVE_H

#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <stdbool.h>
#include <stdint.h>

#include "takeover.h"

enum { SERVE_UNMOUNTED = 0, SERVE_STOPPED = 1 };

struct server;

/* The signal that wakes workers; its handler does nothing. Installed (and
 * blocked) by serve_prepare_signals() before any thread is created. */
#define SERVE_WAKE_SIGNAL SIGUSR1
void serve_prepare_signals(void);

/* Whether the request the calling worker is processing was sent again by
 * the kernel after a takeover (FUSE_NOTIFY_RESEND sets bit 63 of its
 * unique): its effect may already have happened in the dead server, so an
 * operation that is not idempotent (create, unlink) treats "already done"
 * as done. Valid in an operation's handler, on its worker thread. */
bool serve_request_is_resent(void);

/* Serves se on the /dev/fuse descriptor fd through imgfs's own read, writev
 * and splice hooks (fuse_session_custom_io) instead of fuse_session_mount()
 * on /dev/fd/N. The writev hook is what lets an open reply carry flags that
 * libfuse 3.14's struct fuse_file_info cannot express. Returns 0 or -errno. */
int serve_attach(struct fuse_session *se, int fd);

/* FOPEN_PARALLEL_DIRECT_WRITES (Linux 6.2): the kernel lets direct writes to
 * one file that do not extend it run at once instead of taking the inode
 * lock for each; without it a guest's queue of O_DIRECT writes to its disk
 * reaches imgfs one at a time. */
#define SERVE_FOPEN_PARALLEL_DIRECT_WRITES FOPEN_PARALLEL_DIRECT_WRITES
/* Adds FOPEN_* flags to the open reply (fuse_reply_open or
 * fuse_reply_create) that the calling thread sends next; any other reply
 * it sends first clears them. Call just before replying. */
void serve_add_open_flags(uint32_t flags);

/* FUSE passthrough (Linux 6.9, CONFIG_FUSE_PASSTHROUGH), newer than the
 * <linux/fuse.h> of libfuse 3.14's systems (protocol 7.38), which has no API
 * for it: the replies are amended on their way out.
 *
 * serve_amend_init_passthrough(): the INIT reply that the calling thread
 * sends next (call it in op_init) asks for FUSE_PASSTHROUGH (flags2 bit 5)
 * with max_stack_depth 1 (the backing files are on a plain file system).
 * The kernel grants it unless the reply also asks for the writeback cache,
 * which it refuses passthrough with.
 *
 * serve_backing_open() registers fd with the connection
 * (FUSE_DEV_IOC_BACKING_OPEN; needs CAP_SYS_ADMIN and a granted INIT):
 * the backing id (> 0), or -errno. The id belongs to the connection, not to
 * this process: it outlives a takeover until serve_backing_close().
 *
 * serve_set_open_backing(id): the open reply the calling thread sends next
 * carries FOPEN_PASSTHROUGH and backing id (as serve_add_open_flags). The
 * kernel then reads and mmaps that file itself: READ never reaches the
 * server. It refuses (the open fails with EIO) FOPEN_KEEP_CACHE with it, a
 * passthrough open of an inode that is open without passthrough or the
 * other way round, and two different backing files (ids) for one inode. */
void serve_amend_init_passthrough(void);
int serve_backing_open(int fuse_fd, int fd);
int serve_backing_close(int fuse_fd, int id);
void serve_set_open_backing(int id);

struct server *serve_create(struct fuse_session *se, struct takeover *t, unsigned threads);
int serve_run(struct server *s);
void serve_stop(struct server *s);
void serve_destroy(struct server *s);

#endif
