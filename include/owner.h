/* owner: one imgfs per state directory, per cache directory and per mount
 * point.
 *
 * A daemon holds an exclusive flock(2) on DIR/imgfs.lock of its state
 * directory and of its cache directory for its whole life. The file says who
 * holds it ("pid N\nmount PATH\n"), so a refused second daemon can name the
 * owner. flock belongs to the open file description: the lock is kept across
 * fork and exec by every process that inherits the descriptor, and the kernel
 * drops it when the last of them exits, whatever way it ends (a crash leaves
 * no stale lock to clean up).
 *
 * Contract: owner_lock() returns 0 with the lock held, or -1 with one
 * sentence in err. owner_check_mountpoint() returns 0 when MOUNTPOINT may be
 * mounted on (after detaching a dead mount left there by a crash), or -1
 * with one sentence in err (a live imgfs mount is there, or a dead one that
 * could not be detached: err then says what to run).
 */
#ifndef IMGFS_OWNER_H
#define IMGFS_OWNER_H

#include <stddef.h>
#include <sys/types.h>

struct owner_lock {
    int fd; /* -1 when not held */
};

#define OWNER_LOCK_INIT {.fd = -1}

/* Locks DIR (what: "state directory" or "cache directory", for the message)
 * for this process and records pid and mountpoint in the lock file. */
int owner_lock(struct owner_lock *lock, const char *what, const char *dir, const char *mountpoint, char *err,
               size_t errlen);
/* Rewrites the owner's pid (after fork, or when another process serves). */
int owner_set_pid(struct owner_lock *lock, pid_t pid, const char *mountpoint);
void owner_unlock(struct owner_lock *lock);

int owner_check_mountpoint(const char *mountpoint, char *err, size_t errlen);

/* Unescapes a path field of /proc/self/mountinfo (\040 for a space, ...)
 * in place. */
void owner_unescape_mount_path(char *path);

#endif
