/* imgfs: the FUSE daemon. See `imgfs --help` and fs.h. */
#include <errno.h>
#include <limits.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fs.h"
#include "owner.h"
#include "sign.h"
#include "trust.h"
#include "util.h"

/* Re-reads the repository's index in the background (a local one is also
 * refreshed on lookup, without waiting). stop and wake are guarded by lock. */
struct refresher {
    struct imgfs *fs;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    bool stop;
};

static void *refresh_loop(void *arg)
{
    struct refresher *r = arg;
    pthread_mutex_lock(&r->lock);
    while (!r->stop) {
        cond_wait_until(&r->wake, &r->lock, now_ns() + (uint64_t)(r->fs->opts->refresh_seconds * 1e9));
        if (r->stop)
            break;
        pthread_mutex_unlock(&r->lock);
        char err[256];
        tree_refresh(r->fs->tree, true, err, sizeof(err));
        pthread_mutex_lock(&r->lock);
    }
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

static bool refresher_start(struct refresher *r, struct imgfs *fs)
{
    r->fs = fs;
    r->stop = false;
    pthread_mutex_init(&r->lock, NULL);
    cond_init_monotonic(&r->wake);
    return pthread_create(&r->thread, NULL, refresh_loop, r) == 0;
}

/* Stops the thread; a refresh in progress stops at its next version, so
 * this waits for at most one repository request (bounded by its timeouts). */
static void refresher_stop(struct refresher *r)
{
    tree_stop_refresh(r->fs->tree);
    pthread_mutex_lock(&r->lock);
    r->stop = true;
    pthread_cond_signal(&r->wake);
    pthread_mutex_unlock(&r->lock);
    pthread_join(r->thread, NULL);
    pthread_cond_destroy(&r->wake);
    pthread_mutex_destroy(&r->lock);
}

/* ---- signals ----------------------------------------------------------------
 *
 * SIGTERM and SIGINT unmount only when no VM disk is open: while one is, the
 * signal is refused with a log line that names the open disks (stop the VMs,
 * or replace the daemon with `imgfsctl restart`). The unmount is a plain one
 * (not lazy), so the kernel also refuses it while anything else is open.
 * SIGHUP is ignored with a log line: options are read at mount time. The
 * signals are blocked in every thread and taken by sigwait() in one. */

struct signal_watch {
    struct imgfs *fs;
    pthread_t thread;
};

struct open_disks {
    unsigned count;
    char names[256];
};

static void count_open_disk(void *ctx, struct vm *vm)
{
    struct open_disks *d = ctx;
    pthread_mutex_lock(&vm->attr_lock);
    unsigned n = vm->open_count;
    pthread_mutex_unlock(&vm->attr_lock);
    if (!n)
        return;
    size_t used = strlen(d->names);
    snprintf(d->names + used, sizeof(d->names) - used, "%s%s", d->count ? ", " : "", vm->name);
    d->count++;
}

/* A plain unmount, as root or through fusermount3 (as `fusermount3 -u`). */
static int unmount_plain(const char *mountpoint)
{
    if (geteuid() == 0)
        return umount2(mountpoint, 0) == 0 ? 0 : -errno;
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        execlp("fusermount3", "fusermount3", "-u", mountpoint, (char *)NULL);
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0)
        return -errno;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EBUSY;
}

static void *signal_loop(void *arg)
{
    struct signal_watch *w = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    for (;;) {
        int sig;
        if (sigwait(&set, &sig) != 0)
            continue;
        const char *mnt = w->fs->opts->mountpoint;
        if (sig == SIGHUP) {
            log_info("SIGHUP ignored: options are read at mount time; 'imgfsctl restart %s' starts a fresh daemon",
                     mnt);
            continue;
        }
        struct open_disks open = {0};
        vm_registry_each(w->fs->vms, count_open_disk, &open);
        if (open.count) {
            log_warn("%s refused: %u VM disk(s) open (%s); stop those VMs first, or replace the daemon with "
                     "'imgfsctl restart %s'",
                     strsignal(sig), open.count, open.names, mnt);
            continue;
        }
        int rc = unmount_plain(mnt);
        if (rc)
            log_warn("%s: cannot unmount %s (%s): something in it is still open", strsignal(sig), mnt,
                     strerror(-rc));
        else
            log_info("%s: unmounting %s", strsignal(sig), mnt);
    }
    return NULL;
}

static void block_exit_signals(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
}

static void add_vm_nodes(void *ctx, struct vm *vm)
{
    struct imgfs *fs = ctx;
    if (tree_add_vm(fs->tree, vm) != 0)
        fs->tree_error = -ENOMEM;
}

/* What the repository is checked against: -o trust=FILE, -o insecure, or a
 * local directory as it is. The newest accepted index is remembered in
 * meta/trust-state. */
static int setup_trust(struct imgfs *fs, const struct mount_options *opts, const char *meta, char *err,
                       size_t errlen)
{
    static struct sign_keyring ring;
    enum trust_mode mode = opts->trust_file ? TRUST_SIGNED : opts->insecure ? TRUST_INSECURE : TRUST_UNSIGNED;
    if (opts->trust_file && sign_keyring_load(opts->trust_file, &ring, err, errlen) != 0)
        return -EINVAL;
    char state[PATH_MAX];
    int rc = path_join(state, sizeof(state), "%s/trust-state", meta);
    if (!rc)
        rc = trust_create(mode, opts->trust_file ? &ring : NULL, state, opts->max_index_age, &fs->trust, err, errlen);
    if (rc)
        return rc;
    repo_set_trust(fs->repo, fs->trust);
    if (mode == TRUST_INSECURE)
        log_warn("repository %s is mounted with -o insecure: its metadata and chunks are not authenticated; "
                 "whoever controls the network path can change what the VMs read",
                 opts->repo);
    return 0;
}

static int setup(struct imgfs *fs, const struct mount_options *opts)
{
    char err[512];
    struct repo_options ro = {.proxy = opts->proxy,
                              .connect_timeout = opts->connect_timeout,
                              .stall_timeout = opts->stall_timeout,
                              .offline = opts->offline,
                              .mirror_count = opts->mirror_count};
    for (int i = 0; i < opts->mirror_count; i++)
        ro.mirrors[i] = opts->mirrors[i];
    int rc = repo_open_with(opts->repo, &ro, &fs->repo, err, sizeof(err));
    if (!rc && (rc = cache_open(opts->cache_dir, &fs->cache, err, sizeof(err))) == 0) {
        cache_set_limit(fs->cache, opts->cache_size);
        struct fetch_options fo = {.timeout_seconds = opts->timeout_seconds};
        rc = fetcher_create(fs->cache, fs->repo, &fo, &fs->fetcher);
        if (rc)
            snprintf(err, sizeof(err), "out of memory");
    }
    if (!rc) {
        /* Index and manifests are kept next to the cache: manifests are read
         * from there first, and the index stands in when offline. */
        char meta[PATH_MAX];
        rc = path_join(meta, sizeof(meta), "%s/meta", opts->cache_dir);
        if (!rc)
            rc = mkdir_p(meta);
        if (rc)
            snprintf(err, sizeof(err), "cannot create %s/meta: %s", opts->cache_dir, strerror(-rc));
        else
            repo_set_meta_cache(fs->repo, meta, opts->offline);
        if (!rc)
            rc = setup_trust(fs, opts, meta, err, sizeof(err));
    }
    if (!rc) {
        char pins[PATH_MAX];
        rc = path_join(pins, sizeof(pins), "%s/pins", opts->cache_dir);
        if (!rc)
            rc = prefetcher_create(fs->cache, fs->fetcher, pins, &fs->prefetcher);
        if (!rc)
            rc = prefetch_load_pins(fs->prefetcher);
        if (rc)
            snprintf(err, sizeof(err), "cannot set up pre-copy pins in the cache directory: %s", strerror(-rc));
    }
    if (!rc && (rc = tree_create(fs->repo, opts->refresh_seconds, &fs->tree)) != 0)
        snprintf(err, sizeof(err), "out of memory");
    if (!rc)
        rc = tree_refresh(fs->tree, true, err, sizeof(err));
    /* After the bases: every VM is checked against the base it sits on. */
    if (!rc)
        rc = vm_registry_open(opts->state_dir, fs_lookup_base, fs, &fs->vms, err, sizeof(err));
    if (!rc) {
        vm_registry_each(fs->vms, add_vm_nodes, fs);
        rc = fs->tree_error;
        if (rc)
            snprintf(err, sizeof(err), "out of memory");
    }
    if (rc)
        fprintf(stderr, "imgfs: %s\n", err);
    return rc;
}

static void teardown(struct imgfs *fs)
{
    prefetcher_destroy(fs->prefetcher); /* its jobs use everything below */
    vm_registry_close(fs->vms);
    tree_destroy(fs->tree);
    fetcher_destroy(fs->fetcher);
    cache_close(fs->cache);
    repo_close(fs->repo);
    trust_destroy(fs->trust);
}

int main(int argc, char **argv)
{
    struct mount_options opts;
    int rc = mount_options_parse(argc, argv, &opts);
    if (rc != 0)
        return rc > 0 ? 0 : 1;
    if (opts.debug)
        log_set_level(LOG_LEVEL_DEBUG);

    if (sign_init() != 0) {
        fprintf(stderr, "imgfs: libsodium cannot be initialised\n");
        mount_options_free(&opts);
        return 1;
    }
    /* Before any thread exists, so that every thread inherits the mask. */
    block_exit_signals();
    struct imgfs fs = {.opts = &opts, .started = now_seconds(), .mounted_at = time(NULL)};
    struct owner_lock state_lock = OWNER_LOCK_INIT, cache_lock = OWNER_LOCK_INIT;
    int status = 1;
    char err[PATH_MAX + 256];
    if (owner_check_mountpoint(opts.mountpoint, err, sizeof(err)) != 0 ||
        owner_lock(&state_lock, "state directory", opts.state_dir, opts.mountpoint, err, sizeof(err)) != 0 ||
        (strcmp(opts.cache_dir, opts.state_dir) != 0 &&
         owner_lock(&cache_lock, "cache directory", opts.cache_dir, opts.mountpoint, err, sizeof(err)) != 0)) {
        fprintf(stderr, "imgfs: %s\n", err);
        goto out;
    }
    if (setup(&fs, &opts) != 0)
        goto out;

    char fsname[PATH_MAX + 16];
    /* default_permissions: the kernel enforces file modes, so a VM disk
     * chown'd to the hypervisor's user is writable by that user only, even
     * with allow_other. */
    snprintf(fsname, sizeof(fsname), "-ofsname=%s,subtype=imgfs,default_permissions", opts.repo);
    if (strchr(opts.repo, ',')) /* commas would split the option list */
        snprintf(fsname, sizeof(fsname), "-ofsname=imgfs,subtype=imgfs,default_permissions");
    fuse_opt_add_arg(&opts.fuse_args, fsname);

    struct fuse_session *se = fuse_session_new(&opts.fuse_args, &imgfs_ops, sizeof(imgfs_ops), &fs);
    if (!se)
        goto out; /* libfuse has printed why (for example an unknown option) */
    if (fuse_session_mount(se, opts.mountpoint) != 0) {
        fprintf(stderr, "imgfs: cannot mount on %s\n", opts.mountpoint);
        goto out_session;
    }
    if (fuse_daemonize(opts.foreground) != 0)
        goto out_unmount;
    if (!opts.foreground)
        log_to_syslog("imgfs");
    /* fuse_daemonize forked: the locks are inherited, the pid is new. */
    owner_set_pid(&state_lock, getpid(), opts.mountpoint);
    owner_set_pid(&cache_lock, getpid(), opts.mountpoint);
    struct signal_watch watch = {.fs = &fs};
    if (pthread_create(&watch.thread, NULL, signal_loop, &watch) != 0) {
        log_error("cannot start the signal thread");
        goto out_unmount;
    }
    log_info("mounted %s on %s (cache %s)", opts.repo, opts.mountpoint, opts.cache_dir);

    struct refresher refresher;
    bool refreshing = refresher_start(&refresher, &fs);

    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_clone_fd(cfg, 1);
    fuse_loop_cfg_set_max_threads(cfg, opts.max_threads);
    /* Keep every worker: libfuse otherwise ends and re-creates threads under load. */
    fuse_loop_cfg_set_idle_threads(cfg, opts.max_threads);
    status = fuse_session_loop_mt(se, cfg) == 0 ? 0 : 1;
    /* Reads still waiting reply from engine threads: end them while the
     * session they reply to exists. */
    fetcher_shutdown(fs.fetcher);
    fuse_loop_cfg_destroy(cfg);
    if (refreshing)
        refresher_stop(&refresher);
    pthread_cancel(watch.thread); /* it waits in sigwait(), a cancellation point */
    pthread_join(watch.thread, NULL);
    log_info("unmounted %s", opts.mountpoint);
out_unmount:
    fuse_session_unmount(se);
out_session:
    fuse_session_destroy(se);
out:
    teardown(&fs);
    owner_unlock(&cache_lock);
    owner_unlock(&state_lock);
    mount_options_free(&opts);
    return status;
}
