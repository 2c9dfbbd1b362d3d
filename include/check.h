/* check: `imgfsctl check MOUNTPOINT|REPO`, what is wrong with a host's imgfs
 * set-up, in plain lines.
 *
 * Each line is one finding: "ok", "warn" or "FAIL", a subject, and one
 * sentence. The subjects are the repository (reachable, index readable),
 * the trust file (readable, when one is given or configured), the free
 * space of the cache and state directories (and a cache_size that the disk
 * cannot hold), the owner lock of the state and cache directories (who
 * holds DIR/imgfs.lock, read from /proc/locks, so checking never takes the
 * lock from a daemon that is starting), and the kernel's FUSE protocol with
 * FUSE_NOTIFY_RESEND (kernels from 6.9), probed as root with a private
 * mount that is detached at once.
 *
 * For a mount point the repository and directories are the running
 * daemon's (its .imgfs/stats); for a repository they come from --cache,
 * --state and --trust, else from the config file (see config.h), else the
 * defaults.
 *
 * Contract: check_main() prints the findings on stdout and returns 0 when
 * none is FAIL, 1 when one is, 2 for a usage error.
 */
#ifndef IMGFS_CHECK_H
#define IMGFS_CHECK_H

#include <stdio.h>

int check_main(int argc, char **argv);
void check_help(FILE *out);

#endif
