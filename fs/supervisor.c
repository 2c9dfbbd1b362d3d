#include "supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fs.h"
#include "owner.h"
#include "takeover.h"
#include "util.h"

#define MAX_EARLY_DEATHS 6 /* in a row, of servers that finished no request */
#define MAX_BACKOFF_SECONDS 4.0

struct supervisor {
    struct mount_options *opts;
    char **argv;
    char self[PATH_MAX]; /* the imgfs binary, re-executed for each server */
    char cwd[PATH_MAX];  /* where imgfs was started: argv may hold relative paths */
    struct fuse_session *se;
    int fuse_fd;
    struct takeover *t;
    int state_fd;
    struct owner_lock state_lock, cache_lock;
    struct owner_lock layer_lock; /* held for the life of t->layer_dir */
    pid_t server;     /* 0: none running */
    bool handing_over; /* asked the server to hand over */
    unsigned early_deaths; /* in a row */
    bool detached;         /* the mount was ended here */
};

void supervisor_add_fsname(struct mount_options *opts)
{
    char fsname[PATH_MAX + 64];
    /* default_permissions: the kernel enforces file modes, so a VM disk
     * chown'd to the hypervisor's user is writable by that user only, even
     * with allow_other. */
    snprintf(fsname, sizeof(fsname), "-ofsname=%s,subtype=imgfs,default_permissions", opts->repo);
    if (strchr(opts->repo, ',')) /* commas would split the option list */
        snprintf(fsname, sizeof(fsname), "-ofsname=imgfs,subtype=imgfs,default_permissions");
    fuse_opt_add_arg(&opts->fuse_args, fsname);
}

static int clear_cloexec(int fd)
{
    int flags = fcntl(fd, F_GETFD);
    return flags < 0 ? -1 : fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
}

/* Forks and execs a server; ready_fd (or -1) gets one byte once it serves. */
static pid_t spawn_server(struct supervisor *s, int ready_fd)
{
    char env[PATH_MAX + 64];
    snprintf(env, sizeof(env), "%d,%d,%d,%s", s->fuse_fd, s->state_fd, ready_fd, s->opts->mountpoint);
    atomic_store(&s->t->requests_done, 0);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    /* The child: the descriptors it needs survive exec; the owner locks too,
     * so that they are held as long as any process may write. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(1);
    if (clear_cloexec(s->fuse_fd) < 0 || clear_cloexec(s->state_fd) < 0 ||
        (ready_fd >= 0 && clear_cloexec(ready_fd) < 0) ||
        (s->state_lock.fd >= 0 && clear_cloexec(s->state_lock.fd) < 0) ||
        (s->cache_lock.fd >= 0 && clear_cloexec(s->cache_lock.fd) < 0))
        _exit(126);
    setenv(TAKEOVER_ENV, env, 1);
    /* The supervisor went to / but a server parses the same argv, whose
     * paths (REPO, MOUNTPOINT, cache=, config=) may be relative. */
    if (s->cwd[0] && chdir(s->cwd) != 0)
        fprintf(stderr, "imgfs: cannot change to %s, where imgfs was started: %s\n", s->cwd, strerror(errno));
    execv(s->self, s->argv);
    fprintf(stderr, "imgfs: cannot run the server %s: %s\n", s->self, strerror(errno));
    _exit(127);
}

static void describe_exit(int status, char *out, size_t len)
{
    if (WIFSIGNALED(status))
        snprintf(out, len, "killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(out, len, "exit status %d", WEXITSTATUS(status));
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

static void on_terminate(struct supervisor *s, int sig)
{
    /* The distinct open VM disks, by inode. */
    uint64_t disks[32];
    unsigned open = 0;
    char names[256] = "";
    for (size_t i = 0; i < TAKEOVER_MAX_HANDLES && open < 32; i++) {
        uint64_t ino = atomic_load(&s->t->handles[i].ino);
        if (!ino || !atomic_load_explicit(&s->t->handles[i].vm_disk, memory_order_relaxed) || ino > TAKEOVER_MAX_INODES)
            continue;
        unsigned k = 0;
        while (k < open && disks[k] != ino)
            k++;
        if (k < open)
            continue;
        disks[open++] = ino;
        const char *file = s->t->inodes[ino - 1].name; /* VM.raw */
        size_t used = strlen(names), len = strlen(file);
        snprintf(names + used, sizeof(names) - used, "%s%.*s", used ? ", " : "", (int)(len > 4 ? len - 4 : len),
                 file);
    }
    const char *mnt = s->opts->mountpoint;
    if (open) {
        log_warn("%s refused: %u VM disk(s) open (%s); stop those VMs first, or replace the daemon with "
                 "'imgfsctl restart %s'",
                 strsignal(sig), open, names, mnt);
        return;
    }
    int rc = unmount_plain(mnt);
    if (rc)
        log_warn("%s: cannot unmount %s (%s): something in it is still open", strsignal(sig), mnt, strerror(-rc));
    else
        log_info("%s: unmounted %s", strsignal(sig), mnt);
}

/* Starts the next server after one ended with status; returns false when
 * the mount must end. *delay is set to how long to wait first. */
static bool plan_restart(struct supervisor *s, int status, double *delay)
{
    char how[96];
    describe_exit(status, how, sizeof(how));
    *delay = 0;
    if (s->handing_over && WIFEXITED(status) && WEXITSTATUS(status) == TAKEOVER_EXIT_HANDED_OVER) {
        s->handing_over = false;
        log_info("server handed over; starting %s", s->self);
        return true;
    }
    s->handing_over = false;
    if (!s->t->has_resend && s->t->init_len) {
        log_error("the imgfs server (pid %d) died (%s), and this kernel cannot send its requests again "
                  "(no FUSE_NOTIFY_RESEND): the mount at %s ends",
                  (int)s->server, how, s->opts->mountpoint);
        return false;
    }
    /* A server that finished no request died starting up, or on the first
     * request it read (which the kernel would send again to the next). */
    if (atomic_load(&s->t->requests_done) == 0)
        s->early_deaths++;
    else
        s->early_deaths = 0;
    if (s->early_deaths >= MAX_EARLY_DEATHS) {
        log_error("the imgfs server %s died %u times in a row before finishing a request (last: %s); giving up: "
                  "the mount at %s ends",
                  s->self, s->early_deaths, how, s->opts->mountpoint);
        return false;
    }
    if (s->early_deaths > 1) {
        *delay = 0.125 * (double)(1u << (s->early_deaths - 1));
        if (*delay > MAX_BACKOFF_SECONDS)
            *delay = MAX_BACKOFF_SECONDS;
    }
    if (*delay > 0)
        log_warn("the imgfs server (pid %d) died (%s), %u times in a row before finishing a request; starting a "
                 "new one in %.2f s",
                 (int)s->server, how, s->early_deaths, *delay);
    else
        log_warn("the imgfs server (pid %d) died (%s); starting a new one", (int)s->server, how);
    return true;
}

/* The layers' pending entries live in /dev/shm for exactly as long as this
 * supervisor (owner.h, owner_dir_create); directories left by supervisors
 * that were killed (kill -9 leaves them behind) go first. So do the records
 * of flat files checked (flat.h): a new mount has none and checks in full. */
static void make_layer_dir(struct supervisor *s)
{
    owner_dir_sweep("/dev/shm");
    int rc = owner_dir_create("/dev/shm", s->t->layer_dir, sizeof(s->t->layer_dir), &s->layer_lock);
    if (rc)
        log_warn("cannot create a directory in /dev/shm (%s): after a crash of the server, writes it had answered "
                 "but not yet flushed are lost",
                 strerror(-rc));
}

/* Detaches the mount so that the mount point can be used again. */
static void end_mount(struct supervisor *s)
{
    s->detached = true;
    if (geteuid() == 0)
        umount2(s->opts->mountpoint, MNT_DETACH);
    else
        fuse_session_unmount(s->se);
}

void supervisor_signal_set(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGCHLD);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    sigaddset(set, SIGUSR1);
}

/* Waits for signals until the mount ends; returns the exit status. */
static int supervise(struct supervisor *s)
{
    sigset_t set;
    supervisor_signal_set(&set);
    double restart_at = -1; /* now_seconds() when the next server starts, -1: none pending */
    for (;;) {
        if (restart_at >= 0 && now_seconds() >= restart_at) {
            restart_at = -1;
            s->server = spawn_server(s, -1);
            if (s->server < 0) {
                log_error("cannot fork a server: %s; the mount at %s ends", strerror(errno), s->opts->mountpoint);
                end_mount(s);
                return 1;
            }
            atomic_fetch_add(&s->t->takeovers, 1);
        }
        siginfo_t info;
        int sig;
        if (restart_at >= 0) {
            double wait = restart_at - now_seconds();
            struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
            if (wait < 0)
                ts = (struct timespec){0, 0};
            sig = sigtimedwait(&set, &info, &ts);
        } else {
            sig = sigwaitinfo(&set, &info);
        }
        if (sig < 0)
            continue; /* EAGAIN (the pause is over) or EINTR */
        switch (sig) {
        case SIGCHLD: {
            int status;
            pid_t pid;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
                if (pid != s->server)
                    continue;
                if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
                    log_info("unmounted %s", s->opts->mountpoint);
                    return 0;
                }
                double delay;
                if (!plan_restart(s, status, &delay)) {
                    end_mount(s);
                    return 1;
                }
                s->server = 0;
                restart_at = now_seconds() + delay;
            }
            break;
        }
        case SIGUSR1:
            if (s->server > 0 && !s->handing_over) {
                s->handing_over = true;
                log_info("imgfsctl restart: asking server pid %d to hand over", (int)s->server);
                kill(s->server, SIGUSR2);
            }
            break;
        case SIGHUP:
            log_info("SIGHUP ignored: options are read at mount time; 'imgfsctl restart %s' starts a fresh "
                     "server that reads them again",
                     s->opts->mountpoint);
            break;
        default:
            on_terminate(s, sig);
        }
    }
}

/* Goes to the background: the parent waits until the child reports whether
 * the mount is served (one byte on the pipe) and exits with that status. */
static int background(int *report_fd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return -errno;
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid > 0) {
        close(p[1]);
        char status = 1;
        ssize_t n = read(p[0], &status, 1);
        _exit(n == 1 ? status : 1);
    }
    close(p[0]);
    setsid();
    *report_fd = p[1];
    return 0;
}

static void detach_stdio(void)
{
    int fd = open("/dev/null", O_RDWR);
    if (fd < 0)
        return;
    dup2(fd, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    if (fd > 2)
        close(fd);
}

int supervisor_run(struct mount_options *opts, char **argv)
{
    struct supervisor s = {.opts = opts, .argv = argv, .fuse_fd = -1, .state_fd = -1};
    s.state_lock = (struct owner_lock)OWNER_LOCK_INIT;
    s.cache_lock = (struct owner_lock)OWNER_LOCK_INIT;
    s.layer_lock = (struct owner_lock)OWNER_LOCK_INIT;
    int status = 1, report_fd = -1, rc;
    char err[PATH_MAX + 256];
    ssize_t n = readlink("/proc/self/exe", s.self, sizeof(s.self) - 1);
    if (n <= 0) {
        fprintf(stderr, "imgfs: cannot find its own binary: %s\n", strerror(errno));
        return 1;
    }
    s.self[n] = 0;
    if (!getcwd(s.cwd, sizeof(s.cwd)))
        s.cwd[0] = '\0';
    if (owner_check_mountpoint(opts->mountpoint, err, sizeof(err)) != 0 ||
        owner_lock(&s.state_lock, "state directory", opts->state_dir, opts->mountpoint, err, sizeof(err)) != 0 ||
        (strcmp(opts->cache_dir, opts->state_dir) != 0 &&
         owner_lock(&s.cache_lock, "cache directory", opts->cache_dir, opts->mountpoint, err, sizeof(err)) != 0)) {
        fprintf(stderr, "imgfs: %s\n", err);
        goto out;
    }
    if ((s.t = takeover_create(&s.state_fd)) == NULL) {
        fprintf(stderr, "imgfs: cannot create the takeover state: %s\n", strerror(errno));
        goto out;
    }
    if (!opts->foreground && background(&report_fd) != 0) {
        fprintf(stderr, "imgfs: cannot go to the background: %s\n", strerror(errno));
        goto out;
    }
    /* The locks and the pid the lock files name are the supervisor's. */
    owner_set_pid(&s.state_lock, getpid(), opts->mountpoint);
    owner_set_pid(&s.cache_lock, getpid(), opts->mountpoint);
    s.t->supervisor_pid = getpid();
    s.t->started = time(NULL);
    snprintf(s.t->state_dir, sizeof(s.t->state_dir), "%s", opts->state_dir);
    snprintf(s.t->cache_dir, sizeof(s.t->cache_dir), "%s", opts->cache_dir);
    make_layer_dir(&s);

    supervisor_add_fsname(opts);
    /* The session is only for mounting: no request is ever read here. */
    s.se = fuse_session_new(&opts->fuse_args, &imgfs_ops, sizeof(imgfs_ops), NULL);
    if (!s.se)
        goto out; /* libfuse has printed why (for example an unknown option) */
    if (fuse_session_mount(s.se, opts->mountpoint) != 0) {
        fprintf(stderr, "imgfs: cannot mount on %s\n", opts->mountpoint);
        goto out_session;
    }
    s.fuse_fd = fuse_session_fd(s.se);

    int ready[2];
    if (pipe2(ready, O_CLOEXEC) < 0)
        goto out_unmount;
    s.server = spawn_server(&s, ready[1]);
    close(ready[1]);
    char byte;
    bool served = s.server > 0 && read(ready[0], &byte, 1) == 1;
    close(ready[0]);
    if (!served) { /* the server has said why on stderr */
        if (s.server > 0)
            waitpid(s.server, NULL, 0);
        goto out_unmount;
    }
    if (!opts->foreground) {
        log_to_syslog("imgfs");
        if (chdir("/") != 0)
            log_warn("cannot change to /: %s", strerror(errno));
        detach_stdio();
    }
    log_info("supervising %s (server pid %d, binary %s)", opts->mountpoint, (int)s.server, s.self);
    if (report_fd >= 0) {
        char ok = 0;
        if (write(report_fd, &ok, 1) != 1)
            log_warn("cannot report the mount to the starting process");
        close(report_fd);
        report_fd = -1;
    }
    status = supervise(&s);
out_unmount:
    if (!s.detached)
        fuse_session_unmount(s.se); /* nothing to do when the kernel ended the connection */
out_session:
    fuse_session_destroy(s.se);
out:
    if (report_fd >= 0)
        close(report_fd); /* the waiting parent exits 1 */
    if (s.t && s.t->layer_dir[0] && (rc = owner_dir_remove(s.t->layer_dir, &s.layer_lock)) != 0)
        log_warn("cannot remove %s: %s", s.t->layer_dir, strerror(-rc));
    owner_unlock(&s.cache_lock);
    owner_unlock(&s.state_lock);
    return status;
}
