/* imgfs: the FUSE daemon. See `imgfs --help` and fs.h. */
#include <errno.h>
#include <limits.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fs.h"
#include "util.h"

/* Re-reads a remote repository's index in the background (local ones are
 * refreshed on lookup). stop and wake are guarded by lock. */
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

/* Stops the thread; a refresh in progress finishes first (bounded by the
 * repository timeouts). */
static void refresher_stop(struct refresher *r)
{
    pthread_mutex_lock(&r->lock);
    r->stop = true;
    pthread_cond_signal(&r->wake);
    pthread_mutex_unlock(&r->lock);
    pthread_join(r->thread, NULL);
    pthread_cond_destroy(&r->wake);
    pthread_mutex_destroy(&r->lock);
}

static void add_vm_nodes(void *ctx, struct vm *vm)
{
    struct imgfs *fs = ctx;
    if (tree_add_vm(fs->tree, vm) != 0)
        fs->tree_error = -ENOMEM;
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
}

int main(int argc, char **argv)
{
    struct mount_options opts;
    int rc = mount_options_parse(argc, argv, &opts);
    if (rc != 0)
        return rc > 0 ? 0 : 1;
    if (opts.debug)
        log_set_level(LOG_LEVEL_DEBUG);

    struct imgfs fs = {.opts = &opts, .started = now_seconds(), .mounted_at = time(NULL)};
    int status = 1;
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
    if (fuse_set_signal_handlers(se) != 0)
        goto out_session;
    if (fuse_session_mount(se, opts.mountpoint) != 0) {
        fprintf(stderr, "imgfs: cannot mount on %s\n", opts.mountpoint);
        goto out_signals;
    }
    if (fuse_daemonize(opts.foreground) != 0)
        goto out_unmount;
    if (!opts.foreground)
        log_to_syslog("imgfs");
    log_info("mounted %s on %s (cache %s)", opts.repo, opts.mountpoint, opts.cache_dir);

    struct refresher refresher;
    bool refreshing = !repo_is_local(fs.repo) && refresher_start(&refresher, &fs);

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
    log_info("unmounted %s", opts.mountpoint);
out_unmount:
    fuse_session_unmount(se);
out_signals:
    fuse_remove_signal_handlers(se);
out_session:
    fuse_session_destroy(se);
out:
    teardown(&fs);
    mount_options_free(&opts);
    return status;
}
