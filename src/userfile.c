#include "userfile.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

static volatile sig_atomic_t caught_signal;

static void on_signal(int sig) { caught_signal = sig; }

void userfile_catch_signals(void)
{
    /* No SA_RESTART: a blocking wait returns EINTR and sees the flag. */
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

int userfile_signal(void) { return caught_signal; }

static int interrupted(const struct userfile *uf, char *err, size_t errlen)
{
    snprintf(err, errlen, "interrupted by SIG%s; %s was not written", sigabbrev_np(caught_signal), uf->path);
    return -EINTR;
}

/* Milliseconds left before deadline_ns (-1: none), at least 1 while some remain. */
static int ms_left(uint64_t deadline_ns)
{
    if (!deadline_ns)
        return -1;
    uint64_t now = now_ns();
    return now >= deadline_ns ? 0 : (int)((deadline_ns - now + 999999) / 1000000);
}

static uint64_t deadline_from_now(double timeout)
{
    return timeout > 0 ? now_ns() + (uint64_t)(timeout * 1e9) : 0;
}

/* A FIFO opened for writing without O_NONBLOCK waits for a reader in the
 * kernel; with it, ENXIO says "no reader yet", so we poll for one. */
static int open_stream(struct userfile *uf, char *err, size_t errlen)
{
    uint64_t deadline = deadline_from_now(uf->timeout);
    for (;;) {
        uf->fd = open(uf->path, O_WRONLY | O_NONBLOCK | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC);
        if (uf->fd >= 0)
            return 0;
        if (errno != ENXIO) {
            int rc = -errno;
            snprintf(err, errlen, "cannot open %s: %s", uf->path, strerror(errno));
            return rc;
        }
        if (caught_signal)
            return interrupted(uf, err, errlen);
        if (ms_left(deadline) == 0) {
            snprintf(err, errlen, "no reader opened the FIFO %s within %g s (see --timeout)", uf->path, uf->timeout);
            return -ETIMEDOUT;
        }
        struct timespec pause = {0, 20 * 1000000};
        nanosleep(&pause, NULL);
    }
}

int userfile_open(struct userfile *uf, const char *path, mode_t mode, double timeout, char *err, size_t errlen)
{
    memset(uf, 0, sizeof(*uf));
    uf->fd = -1;
    uf->timeout = timeout;
    if (path_join(uf->path, sizeof(uf->path), "%s", path) < 0) {
        snprintf(err, errlen, "the path %s is too long", path);
        return -ENAMETOOLONG;
    }
    struct stat st;
    int found = lstat(path, &st);
    if (found < 0 && errno != ENOENT) {
        int rc = -errno;
        snprintf(err, errlen, "cannot look at %s: %s", path, strerror(errno));
        return rc;
    }
    if (found == 0 && (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode))) {
        uf->stream = true;
        return open_stream(uf, err, errlen);
    }
    if (found == 0 && !S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode)) {
        snprintf(err, errlen, "%s is %s, not a file that can be replaced", path,
                 S_ISDIR(st.st_mode) ? "a directory" : "neither a file, a FIFO nor a character device");
        return -EINVAL;
    }
    uf->fd = create_temp_file(path, mode, uf->tmp);
    if (uf->fd < 0) {
        int rc = uf->fd;
        snprintf(err, errlen, "cannot create a file next to %s: %s", path, strerror(-rc));
        uf->tmp[0] = '\0';
        return rc;
    }
    return 0;
}

int userfile_write(struct userfile *uf, const void *buf, size_t len, char *err, size_t errlen)
{
    const char *p = buf;
    uint64_t deadline = deadline_from_now(uf->timeout);
    while (len > 0) {
        if (caught_signal)
            return interrupted(uf, err, errlen);
        ssize_t n = write(uf->fd, p, len);
        if (n > 0) {
            p += n, len -= (size_t)n;
            deadline = deadline_from_now(uf->timeout); /* progress: the deadline moves on */
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN && uf->stream) {
            struct pollfd pfd = {uf->fd, POLLOUT, 0};
            int wait = ms_left(deadline);
            int ready = wait == 0 ? 0 : poll(&pfd, 1, wait);
            if (ready == 0) {
                snprintf(err, errlen, "%s took no data for %g s: nobody reads it (see --timeout)", uf->path,
                         uf->timeout);
                return -ETIMEDOUT;
            }
            continue; /* ready, or EINTR: the loop looks at the signal */
        }
        int rc = n < 0 ? -errno : -EIO;
        if (rc == -EPIPE)
            snprintf(err, errlen, "the reader of %s went away before the end", uf->path);
        else
            snprintf(err, errlen, "cannot write %s: %s", uf->tmp[0] ? uf->tmp : uf->path, strerror(-rc));
        return rc;
    }
    return 0;
}

int userfile_commit(struct userfile *uf, char *err, size_t errlen)
{
    if (caught_signal)
        return interrupted(uf, err, errlen);
    int rc = 0;
    if (!uf->stream && fsync(uf->fd) < 0)
        rc = -errno;
    if (close(uf->fd) < 0 && !rc)
        rc = -errno;
    uf->fd = -1;
    if (!rc && uf->tmp[0] && rename(uf->tmp, uf->path) < 0)
        rc = -errno;
    if (rc) {
        snprintf(err, errlen, "cannot write %s: %s", uf->path, strerror(-rc));
        return rc;
    }
    uf->tmp[0] = '\0';
    if (!uf->stream && (rc = fsync_dir_of(uf->path)) != 0) {
        snprintf(err, errlen, "%s was written but its directory cannot be synced: %s", uf->path, strerror(-rc));
        return rc;
    }
    return 0;
}

void userfile_abort(struct userfile *uf)
{
    if (uf->fd >= 0)
        close(uf->fd);
    uf->fd = -1;
    if (uf->tmp[0])
        unlink(uf->tmp);
    uf->tmp[0] = '\0';
}

/* What a file that is not a regular one is, for the refusal. */
static const char *file_kind(mode_t mode)
{
    return S_ISDIR(mode) ? "a directory" : S_ISFIFO(mode) ? "a FIFO" : S_ISCHR(mode) ? "a character device"
         : S_ISBLK(mode) ? "a block device" : S_ISSOCK(mode) ? "a socket" : "not a file";
}

int userfile_open_source(const char *path, uint64_t *size, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) {
        int rc = -errno;
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return rc;
    }
    struct stat st;
    int rc = fstat(fd, &st) < 0 ? -errno : 0;
    if (!rc && !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s is %s, not a regular file: copy it into a file first", path, file_kind(st.st_mode));
        rc = -EINVAL;
    } else if (!rc && fcntl(fd, F_SETFL, 0) < 0) {
        rc = -errno;
    }
    if (rc) {
        if (rc != -EINVAL)
            snprintf(err, errlen, "cannot read %s: %s", path, strerror(-rc));
        close(fd);
        return rc;
    }
    *size = (uint64_t)st.st_size;
    return fd;
}
