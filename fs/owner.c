#include "owner.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include "util.h"

static int write_owner(int fd, pid_t pid, const char *mountpoint)
{
    char text[PATH_MAX + 64];
    int n = snprintf(text, sizeof(text), "pid %ld\nmount %s\n", (long)pid, mountpoint);
    if (n < 0 || (size_t)n >= sizeof(text))
        return -ENAMETOOLONG;
    if (ftruncate(fd, 0) < 0 || pwrite(fd, text, (size_t)n, 0) != n)
        return -errno;
    return 0;
}

/* Whether the pid a lock file names no longer exists. */
static bool owner_is_gone(int fd)
{
    char text[64] = "";
    long pid = 0;
    if (pread(fd, text, sizeof(text) - 1, 0) <= 0 || sscanf(text, "pid %ld", &pid) != 1 || pid <= 0)
        return false;
    bool gone = kill((pid_t)pid, 0) < 0 && errno == ESRCH;
    errno = EWOULDBLOCK;
    return gone;
}

int owner_lock(struct owner_lock *lock, const char *what, const char *dir, const char *mountpoint, char *err,
               size_t errlen)
{
    char path[PATH_MAX];
    int rc = path_join(path, sizeof(path), "%s/imgfs.lock", dir);
    if (rc) {
        snprintf(err, errlen, "the %s path %s is too long", what, dir);
        return -1;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open the lock file %s of the %s: %s", path, what, strerror(errno));
        return -1;
    }
    int locked = flock(fd, LOCK_EX | LOCK_NB);
    /* An owner that is gone while the lock is still held: its processes are
     * still exiting (a server killed with its supervisor). Wait for them. */
    for (int i = 0; locked < 0 && errno == EWOULDBLOCK && i < 200 && owner_is_gone(fd); i++) {
        usleep(50 * 1000);
        locked = flock(fd, LOCK_EX | LOCK_NB);
    }
    if (locked < 0) {
        int e = errno;
        char text[PATH_MAX + 64] = "";
        ssize_t n = e == EWOULDBLOCK ? pread(fd, text, sizeof(text) - 1, 0) : -1;
        close(fd);
        if (e != EWOULDBLOCK) {
            snprintf(err, errlen, "cannot lock the %s %s: %s", what, dir, strerror(e));
            return -1;
        }
        long pid = 0;
        char owner_mount[PATH_MAX] = "?";
        if (n > 0) {
            text[n] = 0;
            char *m = strstr(text, "\nmount ");
            sscanf(text, "pid %ld", &pid);
            if (m)
                snprintf(owner_mount, sizeof(owner_mount), "%.*s", (int)strcspn(m + 7, "\n"), m + 7);
        }
        snprintf(err, errlen, "the %s %s is in use by imgfs pid %ld mounted on %s; one daemon owns it", what, dir, pid,
                 owner_mount);
        return -1;
    }
    if ((rc = write_owner(fd, getpid(), mountpoint)) != 0) {
        close(fd);
        snprintf(err, errlen, "cannot write the lock file %s: %s", path, strerror(-rc));
        return -1;
    }
    lock->fd = fd;
    return 0;
}

int owner_set_pid(struct owner_lock *lock, pid_t pid, const char *mountpoint)
{
    return lock->fd < 0 ? 0 : write_owner(lock->fd, pid, mountpoint);
}

void owner_unlock(struct owner_lock *lock)
{
    if (lock->fd >= 0)
        close(lock->fd);
    lock->fd = -1;
}

void owner_unescape_mount_path(char *path)
{
    char *out = path;
    for (char *in = path; *in; in++) {
        if (in[0] == '\\' && in[1] >= '0' && in[1] <= '3' && in[2] >= '0' && in[2] <= '7' && in[3] >= '0' &&
            in[3] <= '7') {
            *out++ = (char)((in[1] - '0') * 64 + (in[2] - '0') * 8 + (in[3] - '0'));
            in += 3;
        } else {
            *out++ = *in;
        }
    }
    *out = 0;
}

/* The file system type of the topmost mount at path ("" when none), from
 * /proc/self/mountinfo: later lines are mounted on top of earlier ones. */
static int top_mount_type(const char *path, char *type, size_t typelen)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f)
        return -errno;
    type[0] = 0;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        /* ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - TYPE SOURCE SUPEROPTS */
        char mnt[PATH_MAX];
        if (sscanf(line, "%*s %*s %*s %*s %4095s", mnt) != 1)
            continue;
        owner_unescape_mount_path(mnt);
        char *sep = strstr(line, " - ");
        if (!sep || strcmp(mnt, path) != 0)
            continue;
        snprintf(type, typelen, "%.*s", (int)strcspn(sep + 3, " \n"), sep + 3);
    }
    free(line);
    fclose(f);
    return 0;
}

/* Detaches a dead mount: umount2 as root, fusermount3 otherwise. */
static int detach_mount(const char *mountpoint)
{
    if (geteuid() == 0)
        return umount2(mountpoint, MNT_DETACH) == 0 ? 0 : -errno;
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        execlp("fusermount3", "fusermount3", "-uz", mountpoint, (char *)NULL);
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0)
        return -errno;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EPERM;
}

int owner_check_mountpoint(const char *mountpoint, char *err, size_t errlen)
{
    char type[64];
    int rc = top_mount_type(mountpoint, type, sizeof(type));
    if (rc) {
        snprintf(err, errlen, "cannot read /proc/self/mountinfo: %s", strerror(-rc));
        return -1;
    }
    bool is_fuse = strncmp(type, "fuse", 4) == 0;
    /* statfs always asks the daemon; a stat may be answered from the
     * attributes the kernel still caches. */
    struct statfs sf;
    if (is_fuse && statfs(mountpoint, &sf) < 0 && errno == ENOTCONN) {
        /* The daemon (and whatever held its connection) is gone: nothing
         * can be served there again. A fresh mount replaces it; the files
         * that were open on the dead one stay broken. */
        if ((rc = detach_mount(mountpoint)) != 0) {
            snprintf(err, errlen,
                     "%s holds a dead FUSE mount (its daemon is gone) that cannot be detached (%s); run "
                     "'fusermount3 -uz %s' and mount again",
                     mountpoint, strerror(-rc), mountpoint);
            return -1;
        }
        log_warn("%s held a dead FUSE mount (its daemon was gone); detached it", mountpoint);
        return 0;
    }
    if (strcmp(type, "fuse.imgfs") == 0) {
        snprintf(err, errlen, "%s is already a live imgfs mount; mounting another imgfs on top of it is refused",
                 mountpoint);
        return -1;
    }
    return 0;
}

#define OWNER_DIR_PREFIX "imgfs-layers-"
#define OWNER_DIR_LOCK ".lock"

/* Empties and removes the directory name under parent_fd (it holds files
 * only). */
static int remove_tree(int parent_fd, const char *name)
{
    int fd = openat(parent_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -errno;
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        return -e;
    }
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0 && unlinkat(fd, e->d_name, 0) < 0 &&
            errno != ENOENT && rc == 0)
            rc = -errno;
    closedir(d);
    if (unlinkat(parent_fd, name, AT_REMOVEDIR) < 0 && errno != ENOENT && rc == 0)
        rc = -errno;
    return rc;
}

/* Removes parent/name and then parent/name.lock, whose lock the caller
 * holds. */
static int remove_owned(int parent_fd, const char *name)
{
    char lock_name[NAME_MAX + 1];
    if (snprintf(lock_name, sizeof(lock_name), "%s" OWNER_DIR_LOCK, name) >= (int)sizeof(lock_name))
        return -ENAMETOOLONG;
    int rc = remove_tree(parent_fd, name);
    if (rc == 0 && unlinkat(parent_fd, lock_name, 0) < 0)
        rc = -errno;
    return rc;
}

int owner_dir_create(const char *parent, char *path, size_t len, struct owner_lock *lock)
{
    /* The lock file is locked before it has a name, so no sweeper ever
     * sees it unlocked while its owner lives. */
    int fd = open(parent, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    int rc = flock(fd, LOCK_EX) == 0 ? 0 : -errno;
    char proc[64];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    for (int attempt = 0; rc == 0; attempt++) {
        uint64_t random;
        if (getrandom(&random, sizeof(random), 0) != (ssize_t)sizeof(random)) {
            rc = -errno;
            break;
        }
        char lock_path[PATH_MAX];
        if (path_join(path, len, "%s/" OWNER_DIR_PREFIX "%016llx", parent, (unsigned long long)random) != 0 ||
            path_join(lock_path, sizeof(lock_path), "%s" OWNER_DIR_LOCK, path) != 0) {
            rc = -ENAMETOOLONG;
            break;
        }
        /* Through /proc, or without it with AT_EMPTY_PATH (which needs
         * CAP_DAC_READ_SEARCH). */
        int linked = linkat(AT_FDCWD, proc, AT_FDCWD, lock_path, AT_SYMLINK_FOLLOW);
        if (linked < 0 && errno == ENOENT)
            linked = linkat(fd, "", AT_FDCWD, lock_path, AT_EMPTY_PATH);
        if (linked < 0) {
            rc = errno == EEXIST && attempt < 16 ? 0 : -errno;
            continue;
        }
        /* The name is ours now. A directory already there has lost its
         * lock file, which no live owner does: it goes. */
        const char *name = strrchr(path, '/') + 1;
        int parent_fd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (parent_fd < 0 || (rc = remove_tree(parent_fd, name)) != 0 || mkdirat(parent_fd, name, 0700) < 0) {
            if (rc == 0)
                rc = -errno;
            if (parent_fd >= 0) {
                unlinkat(parent_fd, strrchr(lock_path, '/') + 1, 0);
                close(parent_fd);
            }
            break;
        }
        close(parent_fd);
        lock->fd = fd;
        return 0;
    }
    close(fd);
    path[0] = 0;
    return rc;
}

int owner_dir_remove(const char *path, struct owner_lock *lock)
{
    char parent[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (!slash || path_join(parent, sizeof(parent), "%.*s", (int)(slash - path), path) != 0)
        return -EINVAL;
    int parent_fd = open(slash == path ? "/" : parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = parent_fd < 0 ? -errno : remove_owned(parent_fd, slash + 1);
    if (parent_fd >= 0)
        close(parent_fd);
    owner_unlock(lock); /* last: a sweeper must not see the lock free first */
    return rc;
}

/* Whether name under parent_fd is a lock file whose lock fd could take
 * while the name still named it (a sweeper that locked a file that another
 * one removed meanwhile owns nothing). */
static bool owner_is_dead(int parent_fd, const char *name, int fd)
{
    struct stat held, named;
    return flock(fd, LOCK_EX | LOCK_NB) == 0 && fstat(fd, &held) == 0 &&
           fstatat(parent_fd, name, &named, AT_SYMLINK_NOFOLLOW) == 0 && held.st_dev == named.st_dev &&
           held.st_ino == named.st_ino;
}

/* Whether a file under dir_fd is open by no process, in any PID namespace:
 * a write lease is granted only then (and given back at once). SIGURG, not
 * SIGIO (whose default ends the process), for an open that would break it
 * in the instant it is held. */
static bool file_unopened(int dir_fd, const char *name)
{
    int fd = openat(dir_fd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT;
    bool unopened = fcntl(fd, F_SETSIG, SIGURG) == 0 && fcntl(fd, F_SETLEASE, F_WRLCK) == 0;
    if (unopened)
        fcntl(fd, F_SETLEASE, F_UNLCK);
    close(fd);
    return unopened;
}

/* Whether parent/name is the directory of an older imgfs (imgfs-PID: no
 * lock beside it) whose supervisor is gone: no process has its pid here
 * (the supervisor lives through its servers' takeovers), and none, of any
 * PID namespace, has a file in it open (a server keeps its layers' pending
 * files open and mapped). What it cannot tell apart: a supervisor of
 * another PID namespace, sharing this /dev/shm, between a crashed server
 * and the next. */
static bool old_owner_is_gone(int parent_fd, const char *name)
{
    char *end;
    errno = 0;
    long pid = strncmp(name, "imgfs-", 6) == 0 && name[6] >= '1' && name[6] <= '9' ? strtol(name + 6, &end, 10) : 0;
    if (pid <= 0 || pid > INT32_MAX || errno || *end || kill((pid_t)pid, 0) == 0 || errno != ESRCH)
        return false;
    int fd = openat(parent_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    if (!d) {
        if (fd >= 0)
            close(fd);
        return false;
    }
    bool gone = true;
    struct dirent *e;
    while (gone && (e = readdir(d)))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            gone = file_unopened(fd, e->d_name);
    closedir(d);
    return gone;
}

void owner_dir_sweep(const char *parent)
{
    int parent_fd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = parent_fd < 0 ? NULL : fdopendir(parent_fd);
    if (!d) {
        log_warn("cannot read %s to remove the directories of dead imgfs supervisors: %s", parent, strerror(errno));
        if (parent_fd >= 0)
            close(parent_fd);
        return;
    }
    size_t prefix = strlen(OWNER_DIR_PREFIX), suffix = strlen(OWNER_DIR_LOCK);
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (old_owner_is_gone(parent_fd, e->d_name)) {
            int rc = remove_tree(parent_fd, e->d_name);
            if (rc)
                log_warn("cannot remove %s/%s of a dead imgfs supervisor: %s", parent, e->d_name, strerror(-rc));
            continue;
        }
        if (n <= prefix + suffix || strncmp(e->d_name, OWNER_DIR_PREFIX, prefix) != 0 ||
            strcmp(e->d_name + n - suffix, OWNER_DIR_LOCK) != 0)
            continue;
        int fd = openat(parent_fd, e->d_name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            continue; /* removed meanwhile, or another user's */
        if (owner_is_dead(parent_fd, e->d_name, fd)) {
            char name[NAME_MAX + 1];
            snprintf(name, sizeof(name), "%.*s", (int)(n - suffix), e->d_name);
            int rc = remove_owned(parent_fd, name);
            if (rc)
                log_warn("cannot remove %s/%s of a dead imgfs supervisor: %s", parent, name, strerror(-rc));
        }
        close(fd);
    }
    closedir(d);
}
