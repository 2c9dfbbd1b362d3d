/* imgfs: the FUSE daemon. See `imgfs --help`, fs.h, and takeover.h for its
 * two processes: the supervisor (supervisor.h) and the server (below). */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
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
#include "layer.h"
#include "serve.h"
#include "sign.h"
#include "supervisor.h"
#include "takeover.h"
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
                              .netrc_file = opts->credentials_file,
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
            /* A server taking over serves from the cached index when the
             * repository does not answer: the mount was set up already. */
            repo_set_meta_cache(fs->repo, meta, opts->offline || fs->takeover_server);
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
    if (!rc && fs->takeover)
        tree_use_inode_map(fs->tree, fs->takeover);
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
    passthrough_destroy(fs->passthrough); /* its thread uses the cache and the tree */
    prefetcher_destroy(fs->prefetcher); /* its jobs use everything below */
    vm_registry_close(fs->vms);
    tree_destroy(fs->tree);
    fetcher_destroy(fs->fetcher);
    cache_close(fs->cache);
    repo_close(fs->repo);
    trust_destroy(fs->trust);
}

/* ---- the serving process (takeover.h) ---------------------------------------- */

struct serve_env {
    int fuse_fd, state_fd, ready_fd;
    char mountpoint[PATH_MAX];
};

static int parse_serve_env(const char *text, struct serve_env *e)
{
    int used = 0;
    if (sscanf(text, "%d,%d,%d,%n", &e->fuse_fd, &e->state_fd, &e->ready_fd, &used) != 3 || !used)
        return -1;
    snprintf(e->mountpoint, sizeof(e->mountpoint), "%s", text + used);
    return e->mountpoint[0] == '/' ? 0 : -1;
}

/* The server's signals: SIGUSR2 from the supervisor asks for a hand-over;
 * the supervisor answers SIGTERM, SIGINT and SIGHUP (they reach a server
 * too, from a terminal's Ctrl-C or a kill by process group). */
struct server_signals {
    struct server *server;
    pthread_t thread;
    atomic_bool done; /* set before the SIGUSR2 that ends the loop */
};

static void server_signal_set(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGUSR2);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
}

static void *server_signal_loop(void *arg)
{
    struct server_signals *w = arg;
    sigset_t set;
    server_signal_set(&set);
    for (;;) {
        int sig;
        if (sigwait(&set, &sig) != 0)
            continue;
        if (atomic_load(&w->done))
            break;
        if (sig == SIGUSR2) {
            log_info("handing over: finishing the requests in progress");
            serve_stop(w->server);
        }
    }
    return NULL;
}

static void block_server_signals(void)
{
    sigset_t set;
    server_signal_set(&set);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    serve_prepare_signals();
}

/* Gives the new session the INIT the kernel sent the first server, and
 * has the kernel send again what a dead server held (takeover.h). */
static void resume_connection(struct fuse_session *se, struct takeover *t, int fuse_fd)
{
    if (!t->init_len)
        return; /* the first server: the kernel's INIT is still to come */
    struct fuse_buf init = {.size = t->init_len, .mem = malloc(t->init_len)};
    if (!init.mem) {
        log_error("takeover: out of memory");
        return;
    }
    memcpy(init.mem, t->init, t->init_len);
    fuse_session_process_buf(se, &init);
    free(init.mem);
    if (!t->has_resend)
        return;
    int rc = takeover_notify_resend(fuse_fd);
    if (rc)
        log_error("takeover: FUSE_NOTIFY_RESEND failed: %s", strerror(-rc));
}

static int serve_main(int argc, char **argv, const char *env_text)
{
    struct serve_env env;
    if (parse_serve_env(env_text, &env) != 0) {
        fprintf(stderr, "imgfs: %s=%s is not FUSE_FD,STATE_FD,READY_FD,MOUNTPOINT\n", TAKEOVER_ENV, env_text);
        return 1;
    }
    unsetenv(TAKEOVER_ENV); /* not for the processes we start */
    struct mount_options opts;
    int rc = mount_options_parse_served(argc, argv, env.mountpoint, &opts);
    if (rc != 0)
        return 1;
    if (opts.debug)
        log_set_level(LOG_LEVEL_DEBUG);
    if (!opts.foreground)
        log_to_syslog("imgfs");
    if (sign_init() != 0) {
        fprintf(stderr, "imgfs: libsodium cannot be initialised\n");
        mount_options_free(&opts);
        return 1;
    }
    /* Before any thread exists, so that every thread inherits the mask. */
    block_server_signals();
    struct imgfs fs = {.opts = &opts, .started = now_seconds(), .mounted_at = time(NULL)};
    int status = 1;
    fs.takeover = takeover_attach(env.state_fd);
    if (!fs.takeover) {
        fprintf(stderr, "imgfs: cannot use the takeover state of the supervisor: %s\n",
                errno == EPROTO ? "it was made by an imgfs with another layout" : strerror(errno));
        goto out;
    }
    if (strcmp(fs.takeover->state_dir, opts.state_dir) != 0 || strcmp(fs.takeover->cache_dir, opts.cache_dir) != 0) {
        fprintf(stderr,
                "imgfs: the options now name state %s and cache %s, but this mount locked state %s and cache %s; "
                "unmount and mount again to change them\n",
                opts.state_dir, opts.cache_dir, fs.takeover->state_dir, fs.takeover->cache_dir);
        goto out;
    }
    fs.takeover_server = fs.takeover->init_len > 0;
    layer_share_pending(fs.takeover->layer_dir);
    if (fs.takeover->started)
        fs.mounted_at = (time_t)fs.takeover->started;
    if (setup(&fs, &opts) != 0)
        goto out;
    char err[512];
    if (passthrough_create(opts.base_passthrough, fs.cache, fs.tree, fs.takeover, env.fuse_fd, &fs.passthrough, err,
                           sizeof(err)) != 0) {
        fprintf(stderr, "imgfs: %s\n", err);
        goto out;
    }
    fs_restore_open_handles(&fs);

    supervisor_add_fsname(&opts);
    struct fuse_session *se = fuse_session_new(&opts.fuse_args, &imgfs_ops, sizeof(imgfs_ops), &fs);
    if (!se)
        goto out;
    if (serve_attach(se, env.fuse_fd) != 0) {
        fprintf(stderr, "imgfs: cannot serve the connection on descriptor %d\n", env.fuse_fd);
        goto out_session;
    }
    resume_connection(se, fs.takeover, env.fuse_fd);
    struct server *server = serve_create(se, fs.takeover, opts.max_threads);
    struct server_signals sig = {.server = server};
    if (!server || pthread_create(&sig.thread, NULL, server_signal_loop, &sig) != 0) {
        log_error("cannot start serving: out of resources");
        serve_destroy(server);
        goto out_session;
    }
    if (passthrough_start(fs.passthrough) != 0)
        log_warn("base_passthrough: cannot start its thread; base files are read through the daemon");
    atomic_store(&fs.takeover->server_pid, getpid());
    log_info("serving %s (pid %d%s)", opts.mountpoint, (int)getpid(), fs.takeover_server ? ", a takeover" : "");

    struct refresher refresher;
    bool refreshing = refresher_start(&refresher, &fs);
    if (env.ready_fd >= 0) {
        char ok = 1;
        if (write(env.ready_fd, &ok, 1) != 1)
            log_warn("cannot tell the supervisor that the mount is served");
        close(env.ready_fd);
    }
    if (!opts.foreground) {
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0), dup2(null, 1), dup2(null, 2);
            if (null > 2)
                close(null);
        }
    }
    rc = serve_run(server);
    /* Reads waiting on the fetch engine are answered from its threads. On a
     * hand-over this daemon still answers them (the connection is shared),
     * so none becomes an error for a VM; on unmount they end now, while
     * the session they reply to exists. */
    if (rc == SERVE_STOPPED)
        fetcher_drain(fs.fetcher);
    fetcher_shutdown(fs.fetcher);
    /* Woken rather than cancelled: a thread cancelled in sigwait() leaves
     * its frames poisoned for AddressSanitizer, which then reports its own
     * clean-up of the thread as a stack-buffer-overflow. */
    atomic_store(&sig.done, true);
    pthread_kill(sig.thread, SIGUSR2);
    pthread_join(sig.thread, NULL);
    serve_destroy(server);
    if (refreshing)
        refresher_stop(&refresher);
    if (rc == SERVE_STOPPED) {
        log_info("handed over %s", opts.mountpoint);
        status = TAKEOVER_EXIT_HANDED_OVER;
    } else if (rc == SERVE_UNMOUNTED) {
        status = 0;
    } else {
        log_error("reading the FUSE connection failed: %s", strerror(-rc));
    }
out_session:
    fuse_session_destroy(se); /* closes our copy of the connection */
out:
    teardown(&fs);
    mount_options_free(&opts);
    return status;
}

int main(int argc, char **argv)
{
    const char *serving = getenv(TAKEOVER_ENV);
    if (serving)
        return serve_main(argc, argv, serving);
    /* The supervisor's signals are taken with sigwaitinfo(). */
    sigset_t set;
    supervisor_signal_set(&set);
    sigprocmask(SIG_BLOCK, &set, NULL);
    struct mount_options opts;
    int rc = mount_options_parse(argc, argv, &opts);
    if (rc != 0)
        return rc > 0 ? 0 : 1;
    if (opts.debug)
        log_set_level(LOG_LEVEL_DEBUG);
    int status = supervisor_run(&opts, argv);
    mount_options_free(&opts);
    return status;
}
