/* supervisor: the process that holds a mount while servers come and go.
 *
 * It is what `imgfs REPO MNT` (and mount.fuse3 from fstab) runs. It takes
 * the owner locks (owner.h), mounts, goes to the background unless -f,
 * creates the takeover region (takeover.h) and runs the serving process by
 * re-executing the imgfs binary from the path it was started from. Then it
 * only waits for signals:
 *
 *   server exits 0            the mount ended (unmounted): exit 0
 *   server exits 75           it handed over (imgfsctl restart): start the
 *                             binary from disk again at once
 *   server dies otherwise     (crash, kill -9) start it again: at once the
 *                             first time, then after 0.25 s, 0.5 s, ... 4 s
 *                             while each one dies within 5 s of its start;
 *                             after 6 such deaths in a row, give up: log
 *                             one line, detach the mount, exit 1. Without
 *                             FUSE_NOTIFY_RESEND in the kernel, a crash
 *                             ends the mount at once (takeover.h).
 *   SIGUSR1 (from a server)   imgfsctl restart: ask the server to hand over
 *                             (SIGUSR2)
 *   SIGTERM, SIGINT           unmount, unless a VM disk is open: then refuse
 *                             with a log line naming the open disks. The
 *                             unmount is a plain one: the kernel refuses it
 *                             while any file is open.
 *   SIGHUP                    ignored with a log line (options are read at
 *                             mount time; imgfsctl restart re-reads them)
 *
 * The supervisor reads no FUSE request, opens no repository and holds no
 * lock of its own beyond the owner locks (owner.h: those of the state and
 * cache directories, and that of its directory in /dev/shm, where the
 * layers keep their pending entries for a takeover, removed at exit or by
 * the next supervisor once the lock is free); it is the one process of a mount
 * that has nothing to crash on. A server is started with PR_SET_PDEATHSIG
 * SIGKILL, so killing the supervisor takes the whole mount down as killing
 * the daemon did before (the next mount replaces the dead one).
 *
 * Contract: supervisor_run() returns the process exit status.
 */
#ifndef IMGFS_SUPERVISOR_H
#define IMGFS_SUPERVISOR_H

#include <signal.h>

#include "options.h"

/* argv: the command line as given, passed unchanged to each server. */
int supervisor_run(struct mount_options *opts, char **argv);

/* The signals the supervisor takes with sigwaitinfo(): blocked in every
 * thread before anything else starts. */
void supervisor_signal_set(sigset_t *set);

/* The -o fsname=... argument both the supervisor and servers add. */
void supervisor_add_fsname(struct mount_options *opts);

#endif
