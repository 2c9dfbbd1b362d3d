#include "options.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "config.h"
#include "util.h"

/* Raw -o values as libfuse's option parser hands them to us. */
struct raw_options {
    char *cache;
    char *state;
    char *timeout;
    char *refresh;
    char *threads;
    char *connect_timeout;
    char *stall_timeout;
    char *cache_size;
    char *prefetch;
    char *prefetch_ahead;
    char *background;
    char *proxy;
    char *mirrors[8];
    int mirror_count;
    int offline;
    int base_passthrough;
    char *vm_cache;
    char *trust;
    int insecure;
    char *max_index_age;
    char *credentials;
    int show_help;
    int show_version;
    int foreground;
    int debug;
    int positional;
    int on_command_line; /* the options below come from argv, not a config file */
    int command_line_mirrors;
    char *config; /* read before parsing (note_config); ignored here */
    char *repo;
    char *mountpoint;
};

enum { KEY_HELP, KEY_VERSION, KEY_FOREGROUND, KEY_DEBUG, KEY_MIRROR, KEY_COMMAND_LINE };

/* Put between the config file's options and argv's: mirror= lines of a file
 * are replaced, not extended, by mirror= on the command line. */
#define COMMAND_LINE_MARK "imgfs:command-line"

#define OPT(t, p) {t, offsetof(struct raw_options, p), 1}
static const struct fuse_opt option_spec[] = {
    OPT("cache=%s", cache),
    OPT("state=%s", state),
    OPT("timeout=%s", timeout),
    OPT("refresh=%s", refresh),
    OPT("threads=%s", threads),
    OPT("connect_timeout=%s", connect_timeout),
    OPT("cache_size=%s", cache_size),
    OPT("prefetch=%s", prefetch),
    OPT("prefetch_ahead=%s", prefetch_ahead),
    OPT("background=%s", background),
    OPT("stall_timeout=%s", stall_timeout),
    OPT("proxy=%s", proxy),
    OPT("offline", offline),
    OPT("base_passthrough", base_passthrough),
    OPT("vm_cache=%s", vm_cache),
    OPT("trust=%s", trust),
    OPT("insecure", insecure),
    OPT("max_index_age=%s", max_index_age),
    OPT("credentials=%s", credentials),
    OPT("config=%s", config),
    FUSE_OPT_KEY("mirror=", KEY_MIRROR),
    FUSE_OPT_KEY(COMMAND_LINE_MARK, KEY_COMMAND_LINE),
    FUSE_OPT_KEY("-h", KEY_HELP),
    FUSE_OPT_KEY("--help", KEY_HELP),
    FUSE_OPT_KEY("-V", KEY_VERSION),
    FUSE_OPT_KEY("--version", KEY_VERSION),
    FUSE_OPT_KEY("-f", KEY_FOREGROUND),
    FUSE_OPT_KEY("-d", KEY_DEBUG),
    FUSE_OPT_KEY("debug", KEY_DEBUG),
    FUSE_OPT_END,
};

/* What libfuse (3.14 and later) and mount.fuse3 take besides imgfs's own
 * options; anything else is refused with our own sentence. */
static const char *const fuse_option_names[] = {
    "allow_other", "allow_root", "auto_unmount", "blkdev", "blksize", "default_permissions", "fsname", "subtype",
    "max_read", "context", "fscontext", "defcontext", "rootcontext", "user", "rw", "ro", "suid", "nosuid", "dev",
    "nodev", "exec", "noexec", "async", "sync", "dirsync", "atime", "noatime", "diratime", "nodiratime", "relatime",
    "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
};

/* Options of fstab lines that are meant for mount(8) and systemd; libfuse
 * refuses them, mount.fuse3 drops only some, and so imgfs drops them all. */
static const char *const mount_only_names[] = {"nofail", "noauto", "auto", "defaults", "user", "users", "nouser",
                                               "_netdev"};

static bool name_in(const char *option, const char *const *names, size_t count)
{
    size_t len = strcspn(option, "=");
    for (size_t i = 0; i < count; i++)
        if (strlen(names[i]) == len && strncmp(option, names[i], len) == 0)
            return true;
    return false;
}

static bool is_mount_only_option(const char *option)
{
    return strncmp(option, "x-", 2) == 0 || strncmp(option, "comment=", 8) == 0 ||
           name_in(option, mount_only_names, ARRAY_LEN(mount_only_names));
}

static bool is_fuse_option(const char *option)
{
    return name_in(option, fuse_option_names, ARRAY_LEN(fuse_option_names));
}

static int on_option(void *data, const char *arg, int key, struct fuse_args *outargs)
{
    (void)outargs;
    struct raw_options *raw = data;
    switch (key) {
    case KEY_HELP: raw->show_help = 1; return 0;
    case KEY_VERSION: raw->show_version = 1; return 0;
    case KEY_FOREGROUND: raw->foreground = 1; return 0;
    case KEY_DEBUG: raw->debug = 1; return 0;
    case KEY_COMMAND_LINE: raw->on_command_line = 1; return 0;
    case KEY_MIRROR:
        if (raw->on_command_line && !raw->command_line_mirrors) {
            for (int i = 0; i < raw->mirror_count; i++)
                free(raw->mirrors[i]);
            raw->mirror_count = 0;
            raw->command_line_mirrors = 1;
        }
        if (raw->mirror_count == 8) {
            fprintf(stderr, "imgfs: at most 7 mirrors can be given\n");
            return -1;
        }
        raw->mirrors[raw->mirror_count++] = strdup(arg + strlen("mirror="));
        return 0;
    case FUSE_OPT_KEY_NONOPT:
        if (raw->positional == 0)
            raw->repo = strdup(arg);
        else if (raw->positional == 1)
            raw->mountpoint = strdup(arg);
        else {
            fprintf(stderr, "imgfs: unexpected argument '%s'; usage: imgfs REPO MOUNTPOINT [-o OPTIONS] [-f]\n", arg);
            return -1;
        }
        raw->positional++;
        return 0;
    case FUSE_OPT_KEY_OPT:
        return is_mount_only_option(arg) ? 0 : 1; /* keep the rest for libfuse */
    default:
        return 1; /* keep it for libfuse */
    }
}

static void print_help(void)
{
    printf("usage: imgfs REPO MOUNTPOINT [-o OPTION[,OPTION...]] [-f] [-d]\n"
           "\n"
           "Mounts the base images of REPO (a directory or an http(s):// URL) at MOUNTPOINT:\n"
           "  bases/NAME.raw      newest version of NAME (a symlink to NAME@V.raw)\n"
           "  bases/NAME@V.raw    version V of NAME, read-only\n"
           "  vms/VM.raw          a VM disk (read-write), made with imgfsctl vm create\n"
           "  vms/VM@SNAP.raw     a snapshot of a VM disk, read-only\n"
           "  .imgfs/stats        status and counters (plain text)\n"
           "\n"
           "imgfs options:\n"
           "  -o config=FILE      read default options from FILE and FILE.d/*.conf\n"
           "                      (default $" IMGFS_CONFIG_ENV " or " IMGFS_DEFAULT_CONFIG "; none: no file)\n"
           "  -o cache=DIR        chunk cache directory (default " IMGFS_DEFAULT_CACHE_DIR ",\n"
           "                      created if it is the default; another DIR must exist)\n"
           "  -o cache_size=SIZE  cap on the cache (e.g. 50G); least recently used chunks\n"
           "                      are evicted, down to 90%% of it (default: no cap)\n"
           "  -o state=DIR        directory for VM disks and their layers (default\n"
           "                      " IMGFS_DEFAULT_STATE_DIR ", created if it is the default)\n"
           "  -o timeout=SECONDS  how long a read may wait for an uncached chunk before it\n"
           "                      fails with EIO (default 30)\n"
           "  -o refresh=SECONDS  how often the repository index is re-read (default 2)\n"
           "  -o mirror=URL       another http(s) URL of the same repository; repeat for\n"
           "                      more. Tried in order, with failover and a return to\n"
           "                      the first after 60 s\n"
           "  -o proxy=URL        HTTP proxy for the repository (default: none)\n"
           "  -o connect_timeout=SECONDS  TCP/TLS connect timeout (default 5)\n"
           "  -o stall_timeout=SECONDS    drop a transfer slower than 1 KiB/s for this\n"
           "                      long (default 10)\n"
           "  -o prefetch=none|boot|LIST  the recorded list replayed when a VM disk opens\n"
           "                      (default boot: bases/NAME/V.lists/boot, if published)\n"
           "  -o prefetch_ahead=SIZE  how far replay may run ahead of the guest's reads\n"
           "                      in the list (default 64M; 0: no bound)\n"
           "  -o background=RATE  after a base is opened, fetch the rest of it at RATE\n"
           "                      bytes/s (e.g. 2M), one chunk at a time (default off)\n"
           "  -o offline          mount even if the repository is unreachable, serving\n"
           "                      what is cached (index and manifests are kept in the cache)\n"
           "  -o base_passthrough the kernel reads base files of versions wholly held in\n"
           "                      the cache (imgfsctl precopy) by itself, from a flat copy\n"
           "                      checked when built and at each start (FUSE passthrough,\n"
           "                      Linux 6.9+, root); bytes changed on disk after that check\n"
           "                      are not caught. Default off\n"
           "  -o vm_cache=direct|writeback  how VM disks use the host page cache.\n"
           "                      direct (default): every read and write reaches imgfs\n"
           "                      as it is, and the guest does its own caching.\n"
           "                      writeback: writes collect in the page cache and reach\n"
           "                      the layer in batches, at the latest on fsync; a write\n"
           "                      past the end of a disk then fails on fsync or close,\n"
           "                      not on write(2)\n"
           "  -o trust=FILE       accept only repository metadata signed by a key in FILE\n"
           "                      (lines from imgfsctl key generate's KEYFILE.pub); chunks\n"
           "                      are then checked against their signed digest (SHA-256).\n"
           "                      Required for http(s) repositories\n"
           "  -o insecure         mount an http(s) repository without signature checks\n"
           "                      (said so in the log and in .imgfs/stats)\n"
           "  -o max_index_age=SECONDS  warn (log, stats) when the signed index is older\n"
           "  -o credentials=FILE user name and password for the repository, netrc style\n"
           "                      (\"machine HOST login USER password PASS\"); never shown\n"
           "  -o threads=N        maximum FUSE worker threads (default 16)\n"
           "  -f                  stay in the foreground (logs to stderr, not syslog)\n"

           "  -d, -o debug        debug logging (implies -f)\n"
           "  -h, --help          this help;  -V, --version  the version\n"
           "\n"
           "imgfs runs as two processes: a supervisor that holds the mount, and a server\n"
           "that it starts again after a crash; 'imgfsctl restart MOUNTPOINT' hands the\n"
           "mount to a fresh server (an upgrade). SIGTERM unmounts only when no VM disk\n"
           "is open; SIGHUP is ignored.\n"
           "\n"
           "Common FUSE options: allow_other, nodev, nosuid (see mount.fuse3(8)).\n"
           "Every option can also be a key=value line in the config file; the command\n"
           "line overrides it. See imgfs(8) and imgfs.conf(5).\n"
           "fstab: REPO MOUNTPOINT fuse.imgfs allow_other,nodev,nosuid,nofail 0 0\n");
}

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "imgfs: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return -1;
}

static int parse_seconds(const char *text, double max, double *out)
{
    char *end;
    double v = strtod(text, &end);
    if (end == text || *end || !(v > 0) || v > max)
        return -1;
    *out = v;
    return 0;
}

/* True when an http(s) URL has "user[:password]@" before its host. */
static bool url_has_userinfo(const char *url)
{
    const char *p = strstr(url, "://");
    if (!p)
        return false;
    p += 3;
    size_t authority = strcspn(p, "/?#");
    const char *at = memchr(p, '@', authority);
    return at != NULL;
}

static int check_dir(const char *what, const char *path)
{
    struct stat st;
    if (stat(path, &st) < 0) {
        fprintf(stderr, "imgfs: %s %s does not exist\n", what, path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        fprintf(stderr, "imgfs: %s %s is not a directory\n", what, path);
        return -1;
    }
    return 0;
}

/* The absolute path of a mount point that cannot be stat'ed: its parent
 * resolved, and its own name appended. */
static char *resolve_dead_mountpoint(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return NULL;
    size_t n = strlen(copy);
    while (n > 1 && copy[n - 1] == '/')
        copy[--n] = 0;
    char *slash = strrchr(copy, '/');
    const char *name = slash ? slash + 1 : copy;
    char *parent = slash ? (slash == copy ? strdup("/") : (*slash = 0, realpath(copy, NULL))) : realpath(".", NULL);
    char *out = NULL;
    if (parent && asprintf(&out, "%s%s%s", parent, strcmp(parent, "/") ? "/" : "", name) < 0)
        out = NULL;
    free(parent);
    free(copy);
    return out;
}

/* Calls fn on every option of every -o argument ("-o a,b" and "-oa,b") until
 * it returns non-zero. Escaped commas are not split (libfuse's rule). */
static int each_dash_o(int argc, char **argv, int (*fn)(void *ctx, const char *option), void *ctx)
{
    for (int i = 1; i < argc; i++) {
        const char *list = NULL;
        if (strcmp(argv[i], "-o") == 0 && i + 1 < argc)
            list = argv[++i];
        else if (strncmp(argv[i], "-o", 2) == 0)
            list = argv[i] + 2;
        if (!list)
            continue;
        char option[PATH_MAX + 64];
        size_t n = 0;
        for (const char *p = list;; p++) {
            if (*p == '\\' && p[1]) {
                p++;
            } else if (*p == ',' || *p == '\0') {
                option[n] = '\0';
                int rc = n ? fn(ctx, option) : 0;
                if (rc)
                    return rc;
                n = 0;
                if (!*p)
                    break;
                continue;
            }
            if (n + 1 < sizeof(option))
                option[n++] = *p;
        }
    }
    return 0;
}

struct config_choice {
    char path[PATH_MAX + 64]; /* as long as an option: a longer path fails to open */
    bool given;
};

static int note_config(void *ctx, const char *option)
{
    struct config_choice *c = ctx;
    if (strncmp(option, "config=", 7) != 0)
        return 0;
    snprintf(c->path, sizeof(c->path), "%s", option + 7);
    c->given = true;
    return 0; /* the last one wins, like any option */
}

struct unknown_check {
    const struct config *cfg;
};

static int refuse_unknown(void *ctx, const char *option)
{
    struct unknown_check *u = ctx;
    if (is_fuse_option(option))
        return 0;
    char name[128];
    snprintf(name, sizeof(name), "%.*s", (int)strcspn(option, "="), option);
    const struct config_option *from = config_find(u->cfg, name);
    if (from)
        fprintf(stderr, "imgfs: unknown option '%s' in %s line %u (see imgfs --help)\n", name, from->file, from->line);
    else
        fprintf(stderr, "imgfs: unknown option '%s' (see imgfs --help)\n", name);
    return -1;
}

/* The config file's options, then a mark, then argv: later ones win. */
static int build_args(int argc, char **argv, const struct config *cfg, struct fuse_args *args)
{
    *args = (struct fuse_args)FUSE_ARGS_INIT(0, NULL);
    int rc = fuse_opt_add_arg(args, argv[0]);
    for (size_t i = 0; !rc && i < cfg->count; i++) {
        rc = fuse_opt_add_arg(args, "-o");
        if (!rc)
            rc = fuse_opt_add_arg(args, cfg->options[i].text);
    }
    if (!rc)
        rc = fuse_opt_add_arg(args, "-o" COMMAND_LINE_MARK);
    for (int i = 1; !rc && i < argc; i++)
        rc = fuse_opt_add_arg(args, argv[i]);
    return rc;
}

/* A cache or state directory: the default location is created (private to
 * root) whether it was spelled out or not; any other must already exist, so
 * a typo does not scatter data. */
static char *open_dir_option(const char *what, const char *given, const char *default_dir)
{
    const char *dir = given ? given : default_dir;
    if (strcmp(dir, default_dir) == 0) {
        char parent[PATH_MAX];
        snprintf(parent, sizeof(parent), "%s", dir);
        *strrchr(parent, '/') = '\0';
        int err = mkdir_p(parent);
        if (!err && mkdir(dir, 0700) < 0 && errno != EEXIST)
            err = -errno;
        if (err) {
            fprintf(stderr, "imgfs: cannot create the %s %s: %s\n", what, dir, strerror(-err));
            return NULL;
        }
    }
    if (check_dir(what, dir) < 0)
        return NULL;
    char *path = realpath(dir, NULL);
    if (!path)
        fprintf(stderr, "imgfs: cannot resolve the %s %s: %s\n", what, dir, strerror(errno));
    return path;
}

int mount_options_parse(int argc, char **argv, struct mount_options *opts)
{
    return mount_options_parse_served(argc, argv, NULL, opts);
}

int mount_options_parse_served(int argc, char **argv, const char *mountpoint, struct mount_options *opts)
{
    memset(opts, 0, sizeof(*opts));
    struct raw_options raw = {0};
    struct config cfg = {0};
    int rc = -1;
    struct config_choice choice = {.given = false};
    each_dash_o(argc, argv, note_config, &choice);
    if (!choice.given) {
        const char *path = config_default_path(&choice.given);
        snprintf(choice.path, sizeof(choice.path), "%s", path);
    }
    char err[PATH_MAX + 256];
    if (config_read(choice.path, choice.given, &cfg, err, sizeof(err)) != 0) {
        fail("%s", err);
        goto out;
    }
    if (build_args(argc, argv, &cfg, &opts->fuse_args) != 0) {
        fail("%s", "out of memory");
        goto out;
    }
    if (fuse_opt_parse(&opts->fuse_args, &raw, option_spec, on_option) < 0)
        goto out;
    struct unknown_check unknown = {&cfg};
    if (each_dash_o(opts->fuse_args.argc, opts->fuse_args.argv, refuse_unknown, &unknown) != 0)
        goto out;
    if (raw.show_help) {
        print_help();
        rc = 1;
        goto out;
    }
    if (raw.show_version) {
        printf("imgfs %s (libfuse %d)\n", IMGFS_VERSION, fuse_version());
        rc = 1;
        goto out;
    }
    if (raw.positional < 2) {
        fail("%s", "missing arguments; usage: imgfs REPO MOUNTPOINT [-o OPTIONS] [-f] (see imgfs --help)");
        goto out;
    }
    opts->foreground = raw.foreground || raw.debug;
    opts->debug = raw.debug;
    opts->timeout_seconds = 30;
    opts->refresh_seconds = IMGFS_DEFAULT_REFRESH_SECONDS;
    opts->max_threads = 16;
    if (raw.timeout && parse_seconds(raw.timeout, 86400, &opts->timeout_seconds) < 0) {
        fail("timeout=%s is not a number of seconds above 0 and up to 86400", raw.timeout);
        goto out;
    }
    if (raw.refresh && parse_seconds(raw.refresh, 86400, &opts->refresh_seconds) < 0) {
        fail("refresh=%s is not a number of seconds above 0 and up to 86400", raw.refresh);
        goto out;
    }
    opts->connect_timeout = 5;
    opts->stall_timeout = 10;
    if (raw.connect_timeout && parse_seconds(raw.connect_timeout, 3600, &opts->connect_timeout) < 0) {
        fail("connect_timeout=%s is not a number of seconds above 0 and up to 3600", raw.connect_timeout);
        goto out;
    }
    if (raw.stall_timeout && parse_seconds(raw.stall_timeout, 3600, &opts->stall_timeout) < 0) {
        fail("stall_timeout=%s is not a number of seconds above 0 and up to 3600", raw.stall_timeout);
        goto out;
    }
    opts->offline = raw.offline;
    opts->base_passthrough = raw.base_passthrough;
    if (!raw.vm_cache || strcmp(raw.vm_cache, "direct") == 0) {
        opts->vm_writeback = false;
    } else if (strcmp(raw.vm_cache, "writeback") == 0) {
        opts->vm_writeback = true;
    } else {
        fail("vm_cache=%s is not direct or writeback", raw.vm_cache);
        goto out;
    }
    if (raw.background && (parse_size(raw.background, &opts->background_rate) < 0 || !opts->background_rate)) {
        fail("background=%s is not a rate such as 2M", raw.background);
        goto out;
    }
    opts->prefetch = strdup(raw.prefetch ? raw.prefetch : "boot");
    if (!opts->prefetch || !name_is_valid(opts->prefetch)) {
        fail("prefetch=%s is not none, boot or a list name", raw.prefetch ? raw.prefetch : "");
        goto out;
    }
    opts->prefetch_ahead = IMGFS_DEFAULT_PREFETCH_AHEAD;
    if (raw.prefetch_ahead && parse_size(raw.prefetch_ahead, &opts->prefetch_ahead) < 0) {
        fail("prefetch_ahead=%s is not a size such as 64M (0: no bound)", raw.prefetch_ahead);
        goto out;
    }
    if (raw.cache_size && (parse_size(raw.cache_size, &opts->cache_size) < 0 || opts->cache_size < (1u << 20))) {
        fail("cache_size=%s is not a size of at least 1M", raw.cache_size);
        goto out;
    }
    bool remote = strstr(raw.repo, "://") != NULL;
    if (raw.trust && raw.insecure) {
        fail("%s", "trust= and insecure exclude each other");
        goto out;
    }
    if (remote && !raw.trust && !raw.insecure) {
        fail("repository %s is reached over the network and needs -o trust=FILE (the public keys it is signed "
             "with), or -o insecure to mount it without signature checks",
             raw.repo);
        goto out;
    }
    if (raw.trust && !(opts->trust_file = realpath(raw.trust, NULL))) {
        fail("trust file %s does not exist", raw.trust);
        goto out;
    }
    opts->insecure = raw.insecure;
    if (raw.max_index_age && (!raw.trust || parse_seconds(raw.max_index_age, 10 * 365 * 86400.0,
                                                          &opts->max_index_age) < 0)) {
        fail("max_index_age=%s needs trust= and a number of seconds above 0 (at most 10 years)", raw.max_index_age);
        goto out;
    }
    for (int i = -1; i < raw.mirror_count; i++) {
        if (url_has_userinfo(i < 0 ? raw.repo : raw.mirrors[i])) {
            /* No password is echoed here either. */
            fail("%s", "a repository or mirror URL must not hold a user name or password (they would show in "
                       "ps and /proc/mounts); put them in a file given with -o credentials=FILE");
            goto out;
        }
    }
    if (raw.credentials) {
        struct stat st;
        if (!remote) {
            fail("%s", "credentials= is for http(s) repositories");
            goto out;
        }
        if (!(opts->credentials_file = realpath(raw.credentials, NULL)) || stat(opts->credentials_file, &st) < 0) {
            fail("credentials file %s does not exist", raw.credentials);
            goto out;
        }
        if (!S_ISREG(st.st_mode) || (st.st_mode & 077)) {
            fail("credentials file %s must be a regular file that only its owner can read (chmod 600)",
                 raw.credentials);
            goto out;
        }
    }
    opts->proxy = raw.proxy;
    raw.proxy = NULL;
    for (int i = 0; i < raw.mirror_count; i++) {
        opts->mirrors[opts->mirror_count++] = raw.mirrors[i];
        raw.mirrors[i] = NULL;
    }
    if (raw.threads) {
        uint64_t n;
        if (parse_u64(raw.threads, &n) < 0 || n < 1 || n > 1024) {
            fail("threads=%s is not a number between 1 and 1024", raw.threads);
            goto out;
        }
        opts->max_threads = (unsigned)n;
    }
    struct stat mst;
    if (mountpoint) {
        /* A server: the mount point is its own mount, which nobody serves
         * yet, so it is never looked at (a stat would wait for ourselves). */
        opts->mountpoint = strdup(mountpoint);
    } else if (stat(raw.mountpoint, &mst) < 0 && errno == ENOTCONN) {
        /* A dead FUSE mount left by a crash: the daemon recognises it
         * (owner_check_mountpoint), so only the path is resolved here. */
        opts->mountpoint = resolve_dead_mountpoint(raw.mountpoint);
    } else {
        if (check_dir("mount point", raw.mountpoint) < 0)
            goto out;
        opts->mountpoint = realpath(raw.mountpoint, NULL);
    }
    if (!opts->mountpoint) {
        fail("cannot resolve mount point %s", raw.mountpoint);
        goto out;
    }
    opts->cache_dir = open_dir_option("cache directory", raw.cache, IMGFS_DEFAULT_CACHE_DIR);
    if (!opts->cache_dir)
        goto out;
    opts->state_dir = open_dir_option("state directory", raw.state, IMGFS_DEFAULT_STATE_DIR);
    if (!opts->state_dir)
        goto out;
    /* A local repository path is made absolute: the daemon changes to /. */
    if (strstr(raw.repo, "://")) {
        opts->repo = strdup(raw.repo);
    } else {
        if (check_dir("repository", raw.repo) < 0)
            goto out;
        opts->repo = realpath(raw.repo, NULL);
    }
    if (!opts->repo || !opts->cache_dir || !opts->state_dir) {
        fail("%s", "out of memory");
        goto out;
    }
    rc = 0;
out:
    config_free(&cfg);
    free(raw.config);
    free(raw.cache);
    free(raw.state);
    free(raw.timeout);
    free(raw.refresh);
    free(raw.threads);
    free(raw.connect_timeout);
    free(raw.stall_timeout);
    free(raw.cache_size);
    free(raw.prefetch);
    free(raw.prefetch_ahead);
    free(raw.vm_cache);
    free(raw.trust);
    free(raw.max_index_age);
    free(raw.credentials);
    free(raw.background);
    free(raw.proxy);
    for (int i = 0; i < raw.mirror_count; i++)
        free(raw.mirrors[i]);
    free(raw.repo);
    free(raw.mountpoint);
    if (rc != 0)
        mount_options_free(opts);
    return rc;
}

void mount_options_free(struct mount_options *opts)
{
    free(opts->repo);
    free(opts->mountpoint);
    free(opts->cache_dir);
    free(opts->state_dir);
    free(opts->proxy);
    free(opts->prefetch);
    opts->prefetch = NULL;
    free(opts->trust_file);
    free(opts->credentials_file);
    opts->trust_file = opts->credentials_file = NULL;
    for (int i = 0; i < opts->mirror_count; i++)
        free(opts->mirrors[i]);
    opts->mirror_count = 0;
    opts->proxy = NULL;
    fuse_opt_free_args(&opts->fuse_args);
    opts->repo = opts->mountpoint = opts->cache_dir = opts->state_dir = NULL;
}
