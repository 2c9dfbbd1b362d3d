/* options: the command line and -o options of the imgfs daemon.
 *
 *   imgfs REPO MOUNTPOINT [-o OPTIONS] [-f] [-d]
 *
 * The options of the config files (config.h) come first, as if given with
 * -o before the command line, so the command line overrides them and every
 * option works in a file. imgfs's own options are consumed here; libfuse's
 * (allow_other, nodev, ...) are left in fuse_args; those meant for mount(8)
 * and systemd (nofail, _netdev, x-systemd.*) are dropped; anything else is
 * refused with its name (and the file and line it came from). The default
 * cache and state locations are created (0700) when missing, also when
 * spelled out; other directories must exist.
 *
 * Contract: mount_options_parse() either fills opts and returns 0, returns 1
 * when --help/--version was handled (exit 0), or prints one sentence to
 * stderr and returns -1.
 */
#ifndef IMGFS_OPTIONS_H
#define IMGFS_OPTIONS_H

#include <fuse_lowlevel.h>
#include <stdbool.h>
#include <stdint.h>

#define IMGFS_DEFAULT_CACHE_DIR "/var/cache/imgfs"
#define IMGFS_DEFAULT_PREFETCH_AHEAD (64ull << 20)
#define IMGFS_DEFAULT_STATE_DIR "/var/lib/imgfs"
#define IMGFS_DEFAULT_REFRESH_SECONDS 2.0

struct mount_options {
    char *repo;       /* malloc'd */
    char *mountpoint; /* malloc'd, absolute */
    char *cache_dir;  /* malloc'd */
    char *state_dir;  /* malloc'd */
    double timeout_seconds;
    uint64_t cache_size; /* 0: no cap */
    uint64_t background_rate; /* bytes/s of background fill, 0: off */
    double connect_timeout;
    double stall_timeout;
    char *mirrors[8];  /* malloc'd, from repeated -o mirror=URL */
    int mirror_count;
    char *proxy;       /* malloc'd or NULL */
    char *prefetch;    /* malloc'd: "none", "boot" (default) or a list name */
    uint64_t prefetch_ahead; /* bytes of list replay may lead the guest by, 0: no bound */
    bool offline;
    bool base_passthrough; /* -o base_passthrough (passthrough.h) */
    bool vm_writeback;  /* VM disks use the kernel's writeback cache; else direct I/O */
    char *trust_file;   /* malloc'd, absolute, or NULL: nothing is verified */
    bool insecure;      /* an http(s) repository without trust_file was asked for */
    double max_index_age; /* seconds, 0: not checked */
    char *credentials_file; /* malloc'd, absolute, or NULL */
    double refresh_seconds;
    bool foreground;
    bool debug;
    unsigned max_threads;
    struct fuse_args fuse_args; /* what is left for libfuse */
};

int mount_options_parse(int argc, char **argv, struct mount_options *opts);
/* The same for a serving process (takeover.h), whose mount point is given
 * (already resolved) and never looked at. */
int mount_options_parse_served(int argc, char **argv, const char *mountpoint, struct mount_options *opts);
void mount_options_free(struct mount_options *opts);

#endif
