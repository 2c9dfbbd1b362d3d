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

/* A directory that lives exactly as long as its owner process: the
 * supervisor's tmpfs directory for the layers' pending entries (takeover.h).
 * owner_dir_create() makes PARENT/imgfs-layers-RANDOM and beside it
 * PARENT/imgfs-layers-RANDOM.lock, which it flocks for the life of the lock
 * (O_CLOEXEC: servers do not inherit it). owner_dir_sweep() removes the
 * directories of owners that are gone: those whose lock it can take. A pid
 * says nothing here (the owner may live in another PID namespace, or be
 * dead with its pid reused); the lock is dropped by the kernel however the
 * owner ends.
 *
 * Safe against owners and sweepers running at once: the lock file appears
 * already locked (made with O_TMPFILE, flocked, then linked), before its
 * directory, and a sweeper removes the directory before the lock file, and
 * only after checking that the name it locked still names that file. So a
 * directory whose lock file is missing is one being made, and is left alone.
 *
 * Contract: owner_dir_create() returns 0 with path (len bytes) set and the
 * lock held, or -errno. owner_dir_remove() empties and removes the
 * directory, then the lock file, and drops the lock; it returns 0 or -errno
 * of the first failure. owner_dir_sweep() also removes the directories
 * older imgfs versions made, PARENT/imgfs-PID with no lock, once their
 * owner is gone as far as can be seen: no process has that pid here (a
 * supervisor lives through its servers' takeovers), and no process of any
 * PID namespace has a file in it open (a write lease is granted; servers
 * keep their pending files open). One that a supervisor of another PID
 * namespace sharing PARENT holds between two of its servers looks the
 * same, and goes: the writes its crashed server answered and did not flush
 * are then lost, as without a takeover (what an fsync returned for stays:
 * layer.h promise 1). */
int owner_dir_create(const char *parent, char *path, size_t len, struct owner_lock *lock);
int owner_dir_remove(const char *path, struct owner_lock *lock);
void owner_dir_sweep(const char *parent);

int owner_check_mountpoint(const char *mountpoint, char *err, size_t errlen);

/* Unescapes a path field of /proc/self/mountinfo (\040 for a space, ...)
 * in place. */
void owner_unescape_mount_path(char *path);

#endif
