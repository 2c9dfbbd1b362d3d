/* userfile: how imgfsctl writes a file that the operator named (vm export,
 * trace stop --output), and opens one to read (vm import), so that the
 * daemon never opens a user's path and a slow or stuck file holds up only
 * this imgfsctl.
 *
 * Contract for writing:
 *  - A path that does not exist, or is a regular file or a symlink, gets a
 *    new file: written under an unpredictable temp name next to it, created
 *    with O_CREAT|O_EXCL|O_NOFOLLOW and exactly the given mode (nothing
 *    planted at the temp name is written through), and renamed over path
 *    only by userfile_commit (after fsync), so that readers see the old
 *    file or the whole new one. A symlink at path is replaced, not followed.
 *  - An existing FIFO or character device (not through a symlink) is
 *    written into as it is, with no temp file and no rename, so that
 *    `mkfifo p; imgfsctl vm export MNT VM p & ssh host2 "cat > x" < p`
 *    and /dev/null work. Anything else (a directory, a block device, a
 *    socket) is refused.
 *  - Deadline: a FIFO must get a reader, and a stream must take some bytes,
 *    within timeout seconds (0: wait for ever); else the call fails with one
 *    sentence in err. A regular file is written with plain blocking writes.
 *  - After userfile_catch_signals(), SIGINT, SIGTERM and SIGHUP interrupt
 *    a wait: the call fails with -EINTR and says so. SIGPIPE is ignored (a
 *    reader that goes away is -EPIPE).
 *  - On any failure the caller calls userfile_abort(), which removes the
 *    temp file: a failed or interrupted write leaves nothing behind.
 * Every function returns 0 or a negative errno with one sentence in err.
 */
#ifndef IMGFS_USERFILE_H
#define IMGFS_USERFILE_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct userfile {
    int fd;
    bool stream;        /* an existing FIFO or character device, written into as it is */
    double timeout;     /* seconds a stream may take nothing; 0: no deadline */
    char path[PATH_MAX];
    char tmp[PATH_MAX]; /* the temp file until committed, else "" */
};

/* Installs the handlers described above (once, at the start of a command). */
void userfile_catch_signals(void);
/* The signal caught since userfile_catch_signals(), or 0. */
int userfile_signal(void);

int userfile_open(struct userfile *uf, const char *path, mode_t mode, double timeout, char *err, size_t errlen);
int userfile_write(struct userfile *uf, const void *buf, size_t len, char *err, size_t errlen);
/* Makes the file final (fsync, rename, fsync of the directory) and closes it. */
int userfile_commit(struct userfile *uf, char *err, size_t errlen);
/* Closes uf and removes its temp file; harmless after a commit. */
void userfile_abort(struct userfile *uf);

/* Opens path to read, with the caller's own permissions (imgfsctl sends
 * the bytes to the daemon: vm import). Only a regular file is taken, the
 * open itself uses O_NONBLOCK so that a FIFO cannot make it wait for a
 * writer (it is then refused), and the fd is blocking again for the reads.
 * The fd, with the file's size in *size, or a negative errno with one
 * sentence in err. */
int userfile_open_source(const char *path, uint64_t *size, char *err, size_t errlen);

#endif
