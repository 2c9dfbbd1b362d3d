#include "check.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "config.h"
#include "repo.h"
#include "sign.h"
#include "util.h"

/* The defaults of imgfs(8); options.h belongs to the FUSE side. */
#define DEFAULT_CACHE_DIR "/var/cache/imgfs"
#define DEFAULT_STATE_DIR "/var/lib/imgfs"
/* Below this much free space a directory is a failure, below 5% a warning. */
#define MIN_FREE_BYTES (256ull << 20)

struct findings {
    int failures;
    int warnings;
};

static void report(struct findings *f, const char *level, const char *subject, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void report(struct findings *f, const char *level, const char *subject, const char *fmt, ...)
{
    if (strcmp(level, "FAIL") == 0)
        f->failures++;
    else if (strcmp(level, "warn") == 0)
        f->warnings++;
    printf("%-5s %-11s ", level, subject);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
}

void check_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl check MOUNTPOINT|REPO [--cache DIR] [--state DIR] [--trust FILE]\n"
                 "\n"
                 "Says in plain lines (ok, warn or FAIL) what is right and wrong with imgfs on\n"
                 "this host: the repository is reachable, the trust file is readable (if one\n"
                 "is given or configured), the cache and state directories have free space,\n"
                 "who holds their owner lock, and the kernel's FUSE protocol and\n"
                 "FUSE_NOTIFY_RESEND (kernels from 6.9; probed when run as root).\n"
                 "For a MOUNTPOINT the directories are the running daemon's; for a REPO they\n"
                 "come from the options, else from " IMGFS_DEFAULT_CONFIG ", else the defaults.\n"
                 "Exit status: 0 when nothing is FAIL, 1 otherwise.\n");
}

/* One value of .imgfs/stats: KEY in [SECTION], copied to out. */
static bool stats_value(const char *text, const char *section, const char *key, char *out, size_t len)
{
    char header[128];
    snprintf(header, sizeof(header), "[%s]", section);
    bool inside = false;
    size_t klen = strlen(key);
    for (const char *line = text; line && *line;) {
        const char *nl = strchr(line, '\n');
        size_t n = nl ? (size_t)(nl - line) : strlen(line);
        if (line[0] == '[')
            inside = n == strlen(header) && strncmp(line, header, n) == 0;
        else if (inside && n > klen && strncmp(line, key, klen) == 0 && (line[klen] == ' ' || line[klen] == '\t')) {
            const char *v = line + klen;
            while (*v == ' ' || *v == '\t')
                v++;
            snprintf(out, len, "%.*s", (int)(n - (size_t)(v - line)), v);
            return true;
        }
        line = nl ? nl + 1 : NULL;
    }
    return false;
}

static void check_repository(struct findings *f, const char *location)
{
    char err[512];
    struct repo *repo;
    if (repo_open(location, &repo, err, sizeof(err)) != 0) {
        report(f, "FAIL", "repository", "%s", err);
        return;
    }
    struct repo_index index;
    if (repo_read_index(repo, &index, err, sizeof(err)) != 0) {
        report(f, "FAIL", "repository", "%s is reachable but its index cannot be read: %s", location, err);
    } else {
        report(f, "ok", "repository", "%s is reachable, %zu base%s in its index", location, index.count,
               index.count == 1 ? "" : "s");
        repo_index_free(&index);
    }
    repo_close(repo);
}

/* The trust file (keys for signed metadata), and for a mount the mode its
 * daemon runs in (mode is NULL for a repository check). */
static void check_trust(struct findings *f, const char *trust, const char *mode, const char *keys)
{
    if (mode && strcmp(mode, "insecure") == 0)
        report(f, "warn", "trust", "the mount serves its repository without signature checks (-o insecure)");
    else if (mode && strcmp(mode, "signed") == 0)
        report(f, "ok", "trust", "the mount accepts only metadata signed by its %s trusted key%s", keys ? keys : "?",
               keys && strcmp(keys, "1") == 0 ? "" : "s");
    else if (mode)
        report(f, "ok", "trust", "the mount checks chunks by hash only (no trust= for its local repository)");
    if (!trust) {
        if (!mode)
            report(f, "ok", "trust",
                   "no trust file given or configured (repository metadata is checked by hash only; http(s) needs "
                   "one or -o insecure)");
        return;
    }
    struct sign_keyring ring;
    char err[PATH_MAX + 256];
    if (sign_keyring_load(trust, &ring, err, sizeof(err)) != 0)
        report(f, "FAIL", "trust", "%s", err);
    else
        report(f, "ok", "trust", "the trust file %s holds %zu public key%s", trust, ring.count,
               ring.count == 1 ? "" : "s");
}

/* Free space of dir; limit is the configured cache_size (0: none), used
 * the bytes that the cache holds already. */
static void check_space(struct findings *f, const char *subject, const char *dir, const char *default_dir,
                        uint64_t limit, uint64_t used)
{
    struct statvfs sv;
    if (statvfs(dir, &sv) < 0 && errno == ENOENT && strcmp(dir, default_dir) == 0) {
        report(f, "warn", subject, "%s does not exist yet; imgfs creates it at the first mount", dir);
        return;
    }
    if (statvfs(dir, &sv) < 0) {
        report(f, "FAIL", subject, "%s: %s", dir, strerror(errno));
        return;
    }
    if (access(dir, W_OK) < 0) {
        report(f, "FAIL", subject, "%s is not writable: %s", dir, strerror(errno));
        return;
    }
    uint64_t total = (uint64_t)sv.f_blocks * sv.f_frsize, avail = (uint64_t)sv.f_bavail * sv.f_frsize;
    char a[32], t[32], l[32];
    format_size(avail, a, sizeof(a));
    format_size(total, t, sizeof(t));
    int percent = total ? (int)(avail * 100 / total) : 0;
    if (avail < MIN_FREE_BYTES)
        report(f, "FAIL", subject, "%s has only %s free of %s", dir, a, t);
    else if (limit && limit > avail + used)
        report(f, "warn", subject, "%s: cache_size %s is more than the %s that the disk can give it", dir,
               format_size(limit, l, sizeof(l)), format_size(avail + used, t, sizeof(t)));
    else if (percent < 5)
        report(f, "warn", subject, "%s has %s free of %s (%d%%)", dir, a, t, percent);
    else
        report(f, "ok", subject, "%s has %s free of %s (%d%%)", dir, a, t, percent);
}

/* The pid that holds an flock on path, from /proc/locks; 0 if none. */
static long flock_holder(const char *path)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return -1;
    FILE *locks = fopen("/proc/locks", "r");
    if (!locks)
        return -1;
    char line[256];
    long holder = 0;
    while (!holder && fgets(line, sizeof(line), locks)) {
        char type[16];
        long pid;
        unsigned maj, min;
        unsigned long ino;
        if (strstr(line, "->")) /* a waiter, not a holder */
            continue;
        if (sscanf(line, "%*d: %15s %*s %*s %ld %x:%x:%lu", type, &pid, &maj, &min, &ino) == 5 &&
            strcmp(type, "FLOCK") == 0 && ino == (unsigned long)st.st_ino && maj == major(st.st_dev) &&
            min == minor(st.st_dev))
            holder = pid;
    }
    fclose(locks);
    return holder;
}

/* Who owns dir (DIR/imgfs.lock, "pid N\nmount PATH\n"); mountpoint is the
 * mount being checked, or NULL for a repository check. */
static void check_owner(struct findings *f, const char *what, const char *dir, const char *mountpoint)
{
    char path[PATH_MAX], subject[32];
    snprintf(subject, sizeof(subject), "%s lock", what);
    if (path_join(path, sizeof(path), "%s/imgfs.lock", dir) < 0) {
        report(f, "FAIL", subject, "%s: the path is too long", dir);
        return;
    }
    char *text = NULL;
    size_t len;
    int rc = read_file(path, 4096, &text, &len);
    if (rc == -ENOENT) {
        if (mountpoint)
            report(f, "warn", subject, "%s has no imgfs.lock: its daemon does not lock it (an older imgfs?)", dir);
        else
            report(f, "ok", subject, "%s is not in use (no imgfs.lock)", dir);
        return;
    }
    if (rc) {
        report(f, "FAIL", subject, "cannot read %s: %s", path, strerror(-rc));
        return;
    }
    long pid = 0;
    char owner_mount[PATH_MAX] = "";
    const char *m = strstr(text, "mount ");
    sscanf(text, "pid %ld", &pid);
    if (m)
        sscanf(m + 6, "%4095[^\n]", owner_mount);
    free(text);
    long holder = flock_holder(path);
    if (holder <= 0) {
        if (mountpoint)
            report(f, "FAIL", subject, "%s is not locked, but the mount %s uses it", dir, mountpoint);
        else
            report(f, "ok", subject, "%s is free (last used by pid %ld for %s)", dir, pid,
                   owner_mount[0] ? owner_mount : "?");
        return;
    }
    if (mountpoint && strcmp(owner_mount, mountpoint) != 0)
        report(f, "FAIL", subject, "%s is held by pid %ld for %s, not by the daemon of %s", dir, pid, owner_mount,
               mountpoint);
    else
        report(f, "ok", subject, "%s is held by pid %ld (mount %s)", dir, pid, owner_mount[0] ? owner_mount : "?");
}

/* The kernel's side of FUSE_INIT, from a private mount that is detached at
 * once: returns 0 with the protocol minor and flags2 of the kernel. */
#define FUSE_OPCODE_INIT 26
#define FUSE_INIT_FLAGS2_HAS_RESEND (1u << 7) /* FUSE_HAS_RESEND, bit 39 of the flags */
struct probe_result {
    uint32_t major, minor, flags2;
};

static int probe_fuse(struct probe_result *out, char *err, size_t errlen)
{
    char dir[] = "/tmp/imgfs-check.XXXXXX";
    if (!mkdtemp(dir)) {
        snprintf(err, errlen, "cannot make a probe directory: %s", strerror(errno));
        return -1;
    }
    int rc = -1;
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open /dev/fuse: %s", strerror(errno));
        goto out_dir;
    }
    char data[128];
    snprintf(data, sizeof(data), "fd=%d,rootmode=40000,user_id=0,group_id=0", fd);
    if (mount("imgfs-check", dir, "fuse.imgfs-check", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, data) < 0) {
        snprintf(err, errlen, "cannot mount a FUSE probe: %s", strerror(errno));
        goto out_fd;
    }
    struct pollfd p = {.fd = fd, .events = POLLIN};
    /* 1 MiB + header: the kernel refuses reads smaller than its max write. */
    size_t buf_len = (1u << 20) + 4096;
    unsigned char *buf = malloc(buf_len);
    ssize_t n = -1;
    if (buf && poll(&p, 1, 2000) == 1)
        n = read(fd, buf, buf_len);
    /* header: len, opcode (u32), unique, nodeid (u64), uid, gid, pid (u32),
     * total_extlen, padding (u16): 40 bytes; then fuse_init_in. */
    uint32_t opcode = 0;
    if (n >= 40 + 20) {
        memcpy(&opcode, buf + 4, 4);
        memcpy(&out->major, buf + 40, 4);
        memcpy(&out->minor, buf + 44, 4);
        out->flags2 = 0;
        if (n >= 40 + 24)
            memcpy(&out->flags2, buf + 56, 4);
    }
    free(buf);
    if (n < 60 || opcode != FUSE_OPCODE_INIT)
        snprintf(err, errlen, "the FUSE probe got no INIT request from the kernel");
    else
        rc = 0;
    umount2(dir, MNT_DETACH);
out_fd:
    close(fd);
out_dir:
    rmdir(dir);
    return rc;
}

static void check_kernel(struct findings *f)
{
    struct utsname u;
    uname(&u);
    unsigned kmaj = 0, kmin = 0;
    sscanf(u.release, "%u.%u", &kmaj, &kmin);
    bool kernel_has_resend = kmaj > 6 || (kmaj == 6 && kmin >= 9);
    if (access("/dev/fuse", R_OK | W_OK) < 0) {
        report(f, "FAIL", "kernel", "%s: /dev/fuse is not usable (%s); load the fuse module", u.release,
               strerror(errno));
        return;
    }
    if (geteuid() != 0) {
        report(f, "warn", "kernel", "%s: run as root to probe the FUSE protocol; FUSE_NOTIFY_RESEND is %s", u.release,
               kernel_has_resend ? "expected (6.9 or later)" : "missing (before 6.9)");
        return;
    }
    struct probe_result pr;
    char err[256];
    if (probe_fuse(&pr, err, sizeof(err)) != 0) {
        report(f, "FAIL", "kernel", "%s: %s", u.release, err);
        return;
    }
    bool resend = pr.minor >= 40 && (pr.flags2 & FUSE_INIT_FLAGS2_HAS_RESEND);
    if (resend)
        report(f, "ok", "kernel", "%s: FUSE protocol %u.%u, FUSE_NOTIFY_RESEND supported", u.release, pr.major,
               pr.minor);
    else
        report(f, "warn", "kernel",
               "%s: FUSE protocol %u.%u, no FUSE_NOTIFY_RESEND (kernel 6.9 or later): requests in flight when a "
               "daemon hands over may fail",
               u.release, pr.major, pr.minor);
}

/* Reads MOUNT/.imgfs/stats to its end (a status file need not report its
 * size in stat). */
static bool is_mount(const char *path, char **stats)
{
    char p[PATH_MAX];
    if (path_join(p, sizeof(p), "%s/.imgfs/stats", path) < 0)
        return false;
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    size_t len = 0, cap = 1u << 16;
    char *text = malloc(cap);
    ssize_t n = 0;
    while (text && (n = read(fd, text + len, cap - len - 1)) > 0) {
        len += (size_t)n;
        if (cap - len < 4096 && cap < (64u << 20)) {
            char *grown = realloc(text, cap * 2);
            if (!grown)
                break;
            text = grown;
            cap *= 2;
        }
    }
    close(fd);
    if (!text || n < 0 || len == 0) {
        free(text);
        return false;
    }
    text[len] = '\0';
    *stats = text;
    return true;
}

int check_main(int argc, char **argv)
{
    const char *target = NULL, *cache = NULL, *state = NULL, *trust = NULL;
    for (int i = 1; i < argc; i++) {
        const char **slot = strcmp(argv[i], "--cache") == 0   ? &cache
                            : strcmp(argv[i], "--state") == 0 ? &state
                            : strcmp(argv[i], "--trust") == 0 ? &trust
                                                              : NULL;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            check_help(stdout);
            return 0;
        }
        if (slot && i + 1 < argc) {
            *slot = argv[++i];
        } else if (slot || argv[i][0] == '-' || target) {
            fprintf(stderr, "imgfsctl check: %s '%s' (see imgfsctl check --help)\n",
                    slot ? "a value is missing after" : argv[i][0] == '-' ? "unknown option" : "unexpected argument",
                    argv[i]);
            return 2;
        } else {
            target = argv[i];
        }
    }
    if (!target) {
        fprintf(stderr, "imgfsctl check: needs MOUNTPOINT or REPO (see imgfsctl check --help)\n");
        return 2;
    }
    struct findings f = {0};
    struct config cfg = {0};
    char err[PATH_MAX + 256];
    bool named;
    const char *config_path = config_default_path(&named);
    if (config_read(config_path, named, &cfg, err, sizeof(err)) != 0)
        report(&f, "FAIL", "config", "%s", err);
    else if (cfg.file_count)
        report(&f, "ok", "config", "%zu option%s from %s%s", cfg.count, cfg.count == 1 ? "" : "s", config_path,
               cfg.file_count > 1 ? " and its .d directory" : "");

    char *stats = NULL;
    char repository[PATH_MAX + 64] = "", cache_dir[PATH_MAX] = "", state_dir[PATH_MAX] = "", value[64];
    uint64_t limit = 0, used = 0;
    char mountpoint[PATH_MAX] = "";
    bool mounted = is_mount(target, &stats);
    if (mounted) {
        if (!realpath(target, mountpoint))
            snprintf(mountpoint, sizeof(mountpoint), "%s", target);
        stats_value(stats, "daemon", "repository", repository, sizeof(repository));
        stats_value(stats, "cache", "directory", cache_dir, sizeof(cache_dir));
        stats_value(stats, "vms", "state_directory", state_dir, sizeof(state_dir));
        if (stats_value(stats, "cache", "limit", value, sizeof(value)))
            parse_u64(value, &limit);
        if (stats_value(stats, "cache", "bytes", value, sizeof(value)))
            parse_u64(value, &used);
        report(&f, "ok", "mount", "%s is an imgfs mount, its daemon answers", mountpoint);
    } else {
        snprintf(repository, sizeof(repository), "%s", target);
    }
    /* The daemon's own values first, then the options, then the config. */
    const char *conf_cache = config_lookup(&cfg, "cache"), *conf_state = config_lookup(&cfg, "state");
    if (!cache_dir[0])
        snprintf(cache_dir, sizeof(cache_dir), "%s", cache ? cache : conf_cache ? conf_cache : DEFAULT_CACHE_DIR);
    if (!state_dir[0])
        snprintf(state_dir, sizeof(state_dir), "%s", state ? state : conf_state ? conf_state : DEFAULT_STATE_DIR);
    if (!trust)
        trust = config_lookup(&cfg, "trust");
    const char *conf_limit = config_lookup(&cfg, "cache_size");
    if (!mounted && conf_limit)
        parse_size(conf_limit, &limit);

    if (repository[0])
        check_repository(&f, repository);
    else
        report(&f, "FAIL", "repository", "the mount's status does not name its repository");
    char trust_mode[32] = "", trust_keys[32] = "";
    if (mounted) {
        stats_value(stats, "trust", "mode", trust_mode, sizeof(trust_mode));
        stats_value(stats, "trust", "keys", trust_keys, sizeof(trust_keys));
    }
    check_trust(&f, trust && *trust ? trust : NULL, trust_mode[0] ? trust_mode : NULL,
                trust_keys[0] ? trust_keys : NULL);
    check_space(&f, "cache", cache_dir, DEFAULT_CACHE_DIR, limit, used);
    check_space(&f, "state", state_dir, DEFAULT_STATE_DIR, 0, 0);
    check_owner(&f, "state", state_dir, mounted ? mountpoint : NULL);
    check_owner(&f, "cache", cache_dir, mounted ? mountpoint : NULL);
    check_kernel(&f);
    printf("%d problem%s, %d warning%s\n", f.failures, f.failures == 1 ? "" : "s", f.warnings,
           f.warnings == 1 ? "" : "s");
    free(stats);
    config_free(&cfg);
    return f.failures ? 1 : 0;
}
