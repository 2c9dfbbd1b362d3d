/* imgfsctl: administration of imgfs repositories and mounts. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "extmap.h"
#include "imgfsctl.h"
#include "userfile.h"
#include "list.h"
#include "progress.h"
#include "publish.h"
#include "repo.h"
#include "repo_publish.h"
#include "sign.h"
#include "util.h"

struct subcommand {
    const char *name;
    const char *summary;
    int (*run)(int argc, char **argv);
    void (*help)(FILE *out);
};

int usage_error(const char *cmd, const char *msg)
{
    fprintf(stderr, "imgfsctl %s: %s (see imgfsctl %s --help)\n", cmd, msg, cmd);
    return 2;
}

/* After getopt_long returned '?' (with opterr = 0): names the option that
 * was unknown or lacked its value. */
static int option_error(const char *cmd, char **argv, const struct option *longopts)
{
    char msg[160];
    const char *arg = argv[optind - 1];
    if (optopt && !(arg[0] == '-' && arg[1] == '-')) {
        bool known = false;
        for (const struct option *o = longopts; o->name; o++)
            known = known || o->val == optopt;
        snprintf(msg, sizeof(msg), known ? "option -%c needs a value" : "unknown option -%c", optopt);
        return usage_error(cmd, msg);
    }
    size_t len = strcspn(arg + 2, "=");
    for (const struct option *o = longopts; o->name; o++)
        if (strlen(o->name) == len && strncmp(arg + 2, o->name, len) == 0) {
            snprintf(msg, sizeof(msg), "option --%s needs a value", o->name);
            return usage_error(cmd, msg);
        }
    snprintf(msg, sizeof(msg), "unknown option '%.*s'", (int)(len + 2), arg);
    return usage_error(cmd, msg);
}

bool wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return true;
    }
    return false;
}

int parse_arg_and_flag(const char *cmd, int argc, char **argv, const char *arg_name, const char **arg,
                       const char *flag, bool *flag_set)
{
    char msg[300];
    *arg = NULL;
    *flag_set = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], flag) == 0) {
            *flag_set = true;
        } else if (argv[i][0] == '-') {
            snprintf(msg, sizeof(msg), "unknown option '%.200s'", argv[i]);
            return usage_error(cmd, msg);
        } else if (*arg) {
            snprintf(msg, sizeof(msg), "needs exactly one %s", arg_name);
            return usage_error(cmd, msg);
        } else {
            *arg = argv[i];
        }
    }
    if (*arg)
        return 0;
    snprintf(msg, sizeof(msg), "needs %s", arg_name);
    return usage_error(cmd, msg);
}

/* ---- publish ------------------------------------------------------------------ */

static void publish_help(FILE *out)
{
    fprintf(out,
            "usage: imgfsctl publish IMAGE REPO --name NAME [--chunk-size SIZE] [--level N] [--threads N]\n"
            "                        [--key KEYFILE]...\n"
            "\n"
            "Publishes IMAGE (raw or qcow2, detected from its content) as a new version of\n"
            "NAME in the local repository directory REPO (created if missing or empty).\n"
            "Chunks that the repository already holds are not stored again, and all-zero\n"
            "chunks are not stored at all. What the image does not hold (holes of a raw\n"
            "file, unallocated qcow2 clusters) is never read. Prints the new version\n"
            "number and a summary.\n"
            "\n"
            "  --name NAME        base name: letters, digits, '.', '_', '-' (max 64)\n"
            "  --chunk-size SIZE  power of two from 4K to 16M (default 128K)\n"
            "  --level N          zstd level 1-19, 0 stores chunks uncompressed (default 1)\n"
            "  --threads N        reading, hashing and compressing threads (default: CPUs + 1)\n"
            "  --key KEYFILE      sign the new index with this secret key (imgfsctl key\n"
            "                     generate); repeat to sign with several keys. A signed\n"
            "                     repository refuses an unsigned publish\n");
}

/* Secret keys given with --key (repeatable). */
#define MAX_SIGNING_KEYS 4
struct signing_keys {
    struct sign_secret_key keys[MAX_SIGNING_KEYS];
    size_t count;
};

static int add_signing_key(const char *cmd, struct signing_keys *k, const char *path)
{
    char err[512];
    if (k->count == MAX_SIGNING_KEYS) {
        fprintf(stderr, "imgfsctl %s: at most %d keys can be given\n", cmd, MAX_SIGNING_KEYS);
        return 1;
    }
    if (sign_key_load(path, &k->keys[k->count], err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl %s: %s\n", cmd, err);
        return 1;
    }
    k->count++;
    return 0;
}

static int publish_main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"name", required_argument, NULL, 'n'},
        {"chunk-size", required_argument, NULL, 'c'},
        {"level", required_argument, NULL, 'l'},
        {"threads", required_argument, NULL, 't'},
        {"key", required_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    struct publish_options opts = {.chunk_size = PUBLISH_DEFAULT_CHUNK_SIZE,
                                   .zstd_level = PUBLISH_DEFAULT_ZSTD_LEVEL};
    static struct signing_keys keys;
    int c;
    uint64_t v;
    opterr = 0; /* one message of our own instead of getopt's */
    while ((c = getopt_long(argc, argv, "n:c:l:t:k:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'n': opts.name = optarg; break;
        case 'k':
            if (add_signing_key("publish", &keys, optarg) != 0)
                return 1;
            break;
        case 'c':
            if (parse_size(optarg, &v) < 0 || v > UINT32_MAX)
                return usage_error("publish", "--chunk-size needs a size such as 256K");
            opts.chunk_size = (uint32_t)v;
            break;
        case 'l':
            if (parse_u64(optarg, &v) < 0 || v > 19)
                return usage_error("publish", "--level needs a number from 0 to 19");
            opts.zstd_level = (int)v;
            break;
        case 't':
            if (parse_u64(optarg, &v) < 0 || v < 1 || v > PUBLISH_MAX_THREADS)
                return usage_error("publish", "--threads needs a number from 1 to 256");
            opts.threads = (unsigned)v;
            break;
        case 'h': publish_help(stdout); return 0;
        default: return option_error("publish", argv, longopts);
        }
    }
    if (argc - optind != 2)
        return usage_error("publish", "needs exactly IMAGE and REPO");
    if (!opts.name)
        return usage_error("publish", "--name is required");
    opts.image_path = argv[optind];
    opts.repo_path = argv[optind + 1];
    opts.keys = keys.keys;
    opts.key_count = keys.count;

    struct publish_result res;
    char err[512];
    double started = now_seconds();
    if (publish_image(&opts, &res, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl publish: %s\n", err);
        return 1;
    }
    double elapsed = now_seconds() - started;
    char read_s[32], stored_s[32], skipped_s[32];
    printf("published %s@%" PRIu64 "\n", opts.name, res.version);
    printf("source      %s (%s), %" PRIu64 " bytes\n", opts.image_path, res.format, res.size);
    printf("read        %s in %.1f s on %u threads, %s unallocated not read\n",
           format_size(res.bytes_read, read_s, sizeof(read_s)), elapsed, res.threads,
           format_size(res.bytes_unallocated, skipped_s, sizeof(skipped_s)));
    printf("chunks      %" PRIu64 " new, %" PRIu64 " reused, %" PRIu64 " zero (chunk size %" PRIu32 ")\n",
           res.chunks_new, res.chunks_reused, res.chunks_zero, opts.chunk_size);
    printf("stored      %s (%" PRIu64 " bytes)\n", format_size(res.bytes_stored, stored_s, sizeof(stored_s)),
           res.bytes_stored);
    /* syncfs flushes what other programs wrote to that file system too. */
    printf("synced      in %.1f s (syncfs of the repository's file system)\n", res.sync_seconds);
    /* Thread seconds: where a slow publish waited (bench/RESULTS.md, "Publishing"). */
    printf("workers     read %.1f s, hash %.1f s, compress %.1f s, store %.1f s; %.1f s of it on a CPU\n",
           res.read_seconds, res.hash_seconds, res.compress_seconds, res.store_seconds, res.worker_cpu_seconds);
    return 0;
}

/* ---- vm ------------------------------------------------------------------------ */

static void vm_help(FILE *out)
{
    fprintf(out,
            "usage: imgfsctl vm create MOUNTPOINT VM --base NAME[@VERSION]\n"
            "       imgfsctl vm create MOUNTPOINT VM --size SIZE\n"
            "       imgfsctl vm snapshot MOUNTPOINT VM SNAP\n"
            "       imgfsctl vm clone MOUNTPOINT SRC[@SNAP] DST\n"
            "       imgfsctl vm rm MOUNTPOINT VM[@SNAP]\n"
            "       imgfsctl vm export MOUNTPOINT VM FILE [--timeout SECONDS]\n"
            "       imgfsctl vm import MOUNTPOINT FILE [--name VM]\n"
            "\n"
            "VM disks appear as MOUNTPOINT/vms/VM.raw (read-write, the size of the base)\n"
            "and their snapshots as MOUNTPOINT/vms/VM@SNAP.raw (read-only).\n"
            "  create    a new disk on a base version (default: the newest), or a blank one\n"
            "  snapshot  freeze the disk as SNAP; the VM goes on in a new layer\n"
            "  clone     a new VM sharing SRC's frozen layers (SRC is snapshotted if no SNAP)\n"
            "  rm        remove a VM that is not open; layers still used elsewhere stay;\n"
            "            VM@SNAP removes a snapshot that is not open and no clone came from\n"
            "            (the snapshot vm clone makes of a live VM goes with its last clone)\n"
            "  export    write the VM's own data and its base identity to FILE (mode 0600,\n"
            "            replaced atomically; a FIFO or device is written into); imgfsctl\n"
            "            writes FILE itself, and gives up when a FIFO or device takes\n"
            "            nothing for --timeout seconds (default 60; 0: no limit)\n"
            "  import    recreate an exported VM on a mount that has the same base (named VM\n"
            "            with --name); imgfsctl reads FILE itself, with your permissions (a\n"
            "            regular file only: a FIFO or device is refused), and sends it to the\n"
            "            daemon, which stages it in its state directory (room for twice the\n"
            "            file is needed there); a truncated or altered file is refused\n");
}

/* Says why the control channel failed (err: a negative errno); returns 1. */
static int control_failed(const char *cmd_name, const char *mountpoint, int err)
{
    if (err == -EBADF) /* the handle was given by a server that is gone (takeover.h) */
        fprintf(stderr,
                "imgfsctl %s: the serving process of %s was replaced (crash or imgfsctl restart) while it ran "
                "this command; check its effect and run it again\n",
                cmd_name, mountpoint);
    else if (err == -EINTR && userfile_signal())
        fprintf(stderr, "imgfsctl %s: interrupted by SIG%s\n", cmd_name, sigabbrev_np(userfile_signal()));
    else
        fprintf(stderr, "imgfsctl %s: the daemon did not answer: %s\n", cmd_name, strerror(-err));
    return 1;
}

/* Opens the mount's control file: the fd, or -1 after printing why. */
static int control_open(const char *cmd_name, const char *mountpoint)
{
    char path[PATH_MAX];
    if (path_join(path, sizeof(path), "%s/.imgfs/control", mountpoint) < 0) {
        usage_error(cmd_name, "mount point path is too long");
        return -1;
    }
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        fprintf(stderr, "imgfsctl %s: %s is not an imgfs mount or not writable by you (%s)\n", cmd_name, mountpoint,
                strerror(errno));
    return fd;
}

/* Opens the mount's control file and writes one tab-separated command to
 * it. Returns the fd, or -1 after printing why. */
static int control_send(const char *cmd_name, const char *mountpoint, const char *command)
{
    int fd = control_open(cmd_name, mountpoint);
    if (fd < 0)
        return -1;
    int rc = write_full(fd, command, strlen(command));
    if (rc) {
        control_failed(cmd_name, mountpoint, rc);
        close(fd);
        return -1;
    }
    return fd;
}

/* Sends one tab-separated command to the daemon; its answer (without the
 * newline) goes to answer. Returns 0, or 1 after printing why. */
static int control_request(const char *cmd_name, const char *mountpoint, const char *command, char *answer,
                           size_t len)
{
    int fd = control_send(cmd_name, mountpoint, command);
    if (fd < 0)
        return 1;
    ssize_t n = pread(fd, answer, len - 1, 0);
    int saved = errno;
    close(fd);
    if (n < 0)
        return control_failed(cmd_name, mountpoint, -saved);
    answer[n] = '\0';
    answer[strcspn(answer, "\n")] = '\0';
    return 0;
}

#define FETCH_PIECE (1u << 20)

/* Sends a command whose answer is "ok SIZE\n" and SIZE bytes (fs.h: vm-export,
 * trace-stop) and copies those bytes into out, which the caller opened and
 * commits. Reading the answer is what makes the daemon stage an export, and
 * an interrupted read stops it. Returns 0, or 1 after printing why. */
static int control_fetch(const char *cmd_name, const char *mountpoint, const char *command, struct userfile *out)
{
    int fd = control_send(cmd_name, mountpoint, command);
    if (fd < 0)
        return 1;
    char *buf = malloc(FETCH_PIECE + 1); /* + a NUL after what came, for the answer line */
    if (!buf) {
        close(fd);
        fprintf(stderr, "imgfsctl %s: out of memory\n", cmd_name);
        return 1;
    }
    char err[PATH_MAX + 256];
    uint64_t size = 0, copied = 0;
    off_t off = 0;
    int status = 0;
    for (bool head = true; !status && (head || copied < size);) {
        ssize_t n = pread(fd, buf, FETCH_PIECE, off);
        if (n < 0 || (n == 0 && head) || userfile_signal()) {
            status = control_failed(cmd_name, mountpoint, n < 0 ? -errno : userfile_signal() ? -EINTR : -EIO);
            break;
        }
        if (n == 0) {
            fprintf(stderr, "imgfsctl %s: the daemon's answer ended after %" PRIu64 " of %" PRIu64 " bytes\n",
                    cmd_name, copied, size);
            status = 1;
            break;
        }
        buf[n] = '\0';
        off += n;
        const char *data = buf;
        size_t len = (size_t)n;
        if (head) {
            char *eol = memchr(buf, '\n', len);
            if (!eol || strncmp(buf, "ok ", 3) != 0 || sscanf(buf + 3, "%" SCNu64, &size) != 1) {
                /* "error SENTENCE\n": the sentence; anything else as it is. */
                const char *why = strncmp(buf, "error ", 6) == 0 ? buf + 6 : buf;
                size_t shown = eol ? (size_t)(eol - why) : len - (size_t)(why - buf);
                fprintf(stderr, "imgfsctl %s: %.*s\n", cmd_name, (int)(shown < 512 ? shown : 512), why);
                status = 1;
                break;
            }
            head = false;
            data = eol + 1;
            len -= (size_t)(data - buf);
        }
        if (len > size - copied)
            len = (size_t)(size - copied);
        if (userfile_write(out, data, len, err, sizeof(err)) != 0) {
            fprintf(stderr, "imgfsctl %s: %s\n", cmd_name, err);
            status = 1;
        }
        copied += len;
    }
    free(buf);
    close(fd);
    return status;
}

/* Opens FILE (userfile.h), runs command and copies its payload into FILE. */
static int fetch_to_file(const char *cmd_name, const char *mountpoint, const char *command, const char *file,
                         mode_t mode, double timeout)
{
    char err[PATH_MAX + 256];
    struct userfile out;
    userfile_catch_signals();
    if (userfile_open(&out, file, mode, timeout, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl %s: %s\n", cmd_name, err);
        userfile_abort(&out);
        return 1;
    }
    int status = control_fetch(cmd_name, mountpoint, command, &out);
    if (!status && userfile_commit(&out, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl %s: %s\n", cmd_name, err);
        status = 1;
    }
    userfile_abort(&out);
    return status;
}

/* Reads the answer on an import stream's handle (after write_rc, the
 * failure of a write to it, or 0): want ("ok stream" before the bytes,
 * "ok" after them) is 0; "error SENTENCE" is printed as
 * "imgfsctl vm import: cannot import FILE: SENTENCE"; anything else is
 * the channel's failure. Returns 0 or 1. */
static int import_answer(const char *mountpoint, const char *file, int fd, int write_rc, const char *want)
{
    char answer[1024];
    ssize_t n = pread(fd, answer, sizeof(answer) - 1, 0);
    int saved = errno;
    if (n > 0) {
        answer[n] = '\0';
        answer[strcspn(answer, "\n")] = '\0';
    }
    static const char older[] = "error unknown or malformed command 'vm-import-stream'";
    if (n > 0 && strncmp(answer, older, sizeof(older) - 1) == 0) {
        fprintf(stderr,
                "imgfsctl vm import: the daemon of %s is older than this imgfsctl and cannot take an import "
                "from it: run imgfsctl restart %s first\n",
                mountpoint, mountpoint);
        return 1;
    }
    if (n > 0 && strncmp(answer, "error ", 6) == 0) {
        fprintf(stderr, "imgfsctl vm import: cannot import %s: %s\n", file, answer + 6);
        return 1;
    }
    if (n > 0 && !write_rc && strcmp(answer, want) == 0)
        return 0;
    return control_failed("vm import", mountpoint, n < 0 ? -saved : write_rc ? write_rc : -EIO);
}

/* vm import: imgfsctl reads FILE itself, with the caller's permissions,
 * and streams it to the daemon on one control handle (fs.h
 * vm-import-stream): the command, then the file's bytes at offsets
 * 0..size, then the answer, whose read makes the daemon check and import
 * them. No byte is sent before the daemon answered "ok stream". A file
 * that blocks holds up this imgfsctl only; killed while it sends, it
 * leaves nothing. Returns 0, or 1 after printing why. */
static int import_file(const char *mountpoint, const char *file, const char *name)
{
    char err[PATH_MAX + 256], cmd[160];
    uint64_t size;
    int src = userfile_open_source(file, &size, err, sizeof(err));
    if (src < 0) {
        fprintf(stderr, "imgfsctl vm import: %s\n", err);
        return 1;
    }
    int fd = control_open("vm import", mountpoint);
    char *buf = fd < 0 ? NULL : malloc(FETCH_PIECE);
    if (fd >= 0 && !buf)
        fprintf(stderr, "imgfsctl vm import: out of memory\n");
    if (!buf) {
        if (fd >= 0)
            close(fd);
        close(src);
        return 1;
    }
    snprintf(cmd, sizeof(cmd), "vm-import-stream\t%s\t%" PRIu64 "\n", name, size);
    int rc = write_full(fd, cmd, strlen(cmd));
    int status = import_answer(mountpoint, file, fd, rc, "ok stream");
    struct progress bar;
    progress_start(&bar, "importing", size);
    bar.enabled = bar.enabled && !status;
    for (uint64_t sent = 0; !status && sent < size;) {
        size_t want = size - sent < FETCH_PIECE ? (size_t)(size - sent) : FETCH_PIECE;
        ssize_t n = read(src, buf, want);
        if (n < 0 && errno == EINTR)
            continue; /* stopped and continued */
        if (n <= 0) {
            fprintf(stderr, "imgfsctl vm import: cannot read %s: %s\n", file,
                    n < 0 ? strerror(errno) : "it became shorter while it was read");
            status = 1;
        } else if ((rc = write_full_at(fd, buf, (size_t)n, (off_t)sent)) != 0) {
            status = import_answer(mountpoint, file, fd, rc, "ok");
        } else {
            sent += (uint64_t)n;
            progress_update(&bar, sent);
        }
    }
    progress_finish(&bar); /* the line ends before any error */
    if (!status)
        status = import_answer(mountpoint, file, fd, 0, "ok");
    free(buf);
    close(fd); /* before all was sent: the daemon drops what came */
    close(src);
    return status;
}

/* --timeout SECONDS (default 60): how long a FIFO or device may take nothing. */
#define OUTPUT_TIMEOUT_DEFAULT 60.0
static int parse_output_timeout(const char *cmd, const char *text, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end || !(v >= 0) || v > 86400)
        return usage_error(cmd, "--timeout needs a number of seconds from 0 (no deadline) to 86400");
    *out = v;
    return 0;
}

/* Sends a command and turns an "error ..." answer into a message. */
static int control_command(const char *cmd_name, const char *mountpoint, const char *command)
{
    char answer[1024];
    if (control_request(cmd_name, mountpoint, command, answer, sizeof(answer)) != 0)
        return 1;
    if (strncmp(answer, "ok", 2) == 0)
        return 0;
    fprintf(stderr, "imgfsctl %s: %s\n", cmd_name, strncmp(answer, "error ", 6) == 0 ? answer + 6 : answer);
    return 1;
}

static int vm_command(const char *sub, const char *mountpoint, const char *command)
{
    char name[32];
    snprintf(name, sizeof(name), "vm %s", sub);
    return control_command(name, mountpoint, command);
}

/* NAME@VERSION, or NAME alone for the newest version that the mount shows. */
static int resolve_base(const char *mountpoint, const char *spec, char *name, size_t name_len, uint64_t *version)
{
    const char *at = strchr(spec, '@');
    if (at) {
        snprintf(name, name_len, "%.*s", (int)(at - spec), spec);
        return parse_u64(at + 1, version) == 0 && *version > 0 && name_is_valid(name) ? 0 : -EINVAL;
    }
    snprintf(name, name_len, "%s", spec);
    if (!name_is_valid(name))
        return -EINVAL;
    char link[PATH_MAX], target[256];
    if (path_join(link, sizeof(link), "%s/bases/%s.raw", mountpoint, spec) < 0)
        return -ENAMETOOLONG;
    ssize_t n = readlink(link, target, sizeof(target) - 1);
    if (n < 0)
        return -errno;
    target[n] = '\0';
    char *v = strrchr(target, '@');
    return v && sscanf(v + 1, "%" SCNu64 ".raw", version) == 1 ? 0 : -EBADMSG;
}

static int list_from_files(const char *cmd, struct repo *repo, const struct manifest *m, const char *list_name,
                           const char *paths);

static int vm_main(int argc, char **argv)
{
    if (argc < 2 || wants_help(argc, argv)) {
        vm_help(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *sub = argv[1];
    char cmd[PATH_MAX * 2 + 256];
    if (strcmp(sub, "create") == 0) {
        const char *base = NULL, *size_text = NULL;
        if (argc == 6 && strcmp(argv[4], "--base") == 0)
            base = argv[5];
        else if (argc == 6 && strcmp(argv[4], "--size") == 0)
            size_text = argv[5];
        else
            return usage_error("vm create", "needs MOUNTPOINT VM and --base NAME[@VERSION] or --size SIZE");
        if (base) {
            char name[65];
            uint64_t version;
            int rc = resolve_base(argv[2], base, name, sizeof(name), &version);
            if (rc) {
                fprintf(stderr, "imgfsctl vm create: base %s is not on the mount at %s\n", base, argv[2]);
                return 1;
            }
            snprintf(cmd, sizeof(cmd), "vm-create\t%s\t%s\t%" PRIu64 "\n", argv[3], name, version);
        } else {
            uint64_t size;
            if (parse_size(size_text, &size) < 0)
                return usage_error("vm create", "--size needs a size such as 20G");
            snprintf(cmd, sizeof(cmd), "vm-create\t%s\t-\t%" PRIu64 "\n", argv[3], size);
        }
        return vm_command(sub, argv[2], cmd);
    }
    if (strcmp(sub, "snapshot") == 0) {
        if (argc != 5)
            return usage_error("vm snapshot", "needs MOUNTPOINT VM SNAP");
        snprintf(cmd, sizeof(cmd), "vm-snapshot\t%s\t%s\n", argv[3], argv[4]);
        return vm_command(sub, argv[2], cmd);
    }
    if (strcmp(sub, "clone") == 0) {
        if (argc != 5)
            return usage_error("vm clone", "needs MOUNTPOINT SRC[@SNAP] DST");
        char src[80];
        snprintf(src, sizeof(src), "%s", argv[3]);
        char *at = strchr(src, '@');
        if (at)
            *at++ = '\0';
        snprintf(cmd, sizeof(cmd), "vm-clone\t%s\t%s\t%s\n", src, at ? at : "-", argv[4]);
        return vm_command(sub, argv[2], cmd);
    }
    if (strcmp(sub, "rm") == 0) {
        if (argc != 4)
            return usage_error("vm rm", "needs MOUNTPOINT VM[@SNAP]");
        snprintf(cmd, sizeof(cmd), "vm-rm\t%s\n", argv[3]);
        return vm_command(sub, argv[2], cmd);
    }
    if (strcmp(sub, "export") == 0) {
        double timeout = OUTPUT_TIMEOUT_DEFAULT;
        if (argc == 7 && strcmp(argv[5], "--timeout") == 0) {
            if (parse_output_timeout("vm export", argv[6], &timeout) != 0)
                return 2;
        } else if (argc != 5) {
            return usage_error("vm export", "needs MOUNTPOINT VM FILE [--timeout SECONDS]");
        }
        if (!name_is_valid(argv[3]))
            return usage_error("vm export", "VM is not a valid name");
        snprintf(cmd, sizeof(cmd), "vm-export\t%s\n", argv[3]);
        /* The export holds the guest's data: private to its owner (root). */
        return fetch_to_file("vm export", argv[2], cmd, argv[4], 0600, timeout);
    }
    if (strcmp(sub, "import") == 0) {
        const char *name = "-";
        if (argc == 6 && strcmp(argv[4], "--name") == 0)
            name = argv[5];
        else if (argc != 4)
            return usage_error("vm import", "needs MOUNTPOINT FILE [--name VM]");
        if (strcmp(name, "-") != 0 && !name_is_valid(name))
            return usage_error("vm import", "--name needs a valid VM name");
        return import_file(argv[2], argv[3], name);
    }
    fprintf(stderr, "imgfsctl vm: unknown subcommand '%s' (see imgfsctl vm --help)\n", sub);
    return 2;
}

/* ---- precopy, unpin, trace ----------------------------------------------------- */

static void precopy_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl precopy MOUNTPOINT NAME[@VERSION] [--list LIST] [--rate RATE]\n"
                 "                        [--window HH:MM-HH:MM]\n"
                 "\n"
                 "Fills the cache of the mount with a whole base version (or only the chunks of\n"
                 "one of its published prefetch lists) and pins them, so that they are never\n"
                 "evicted. The daemon does the work in the background at RATE bytes per second\n"
                 "(e.g. 50M; default unlimited); this command follows it with a progress bar on\n"
                 "a terminal. Running it again resumes: cached chunks are skipped.\n"
                 "With --window (local time; it may span midnight) nothing starts outside the\n"
                 "window, and at its end the daemon stops the copy, keeping the pin, and this\n"
                 "command exits 0; the next run resumes.\n"
                 "Release the pin with imgfsctl unpin.\n");
}

static void unpin_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl unpin MOUNTPOINT NAME[@VERSION] [--list LIST]\n"
                 "\n"
                 "Releases what imgfsctl precopy pinned; the chunks stay cached until evicted.\n");
}

/* "HH:MM" or "HH:MM:SS" as seconds after midnight, -1 if it is not one. */
static long parse_clock(const char *text, size_t len)
{
    char buf[16];
    unsigned h, m, sec = 0;
    char extra;
    if (len >= sizeof(buf))
        return -1;
    snprintf(buf, sizeof(buf), "%.*s", (int)len, text);
    int n = sscanf(buf, "%2u:%2u:%2u%c", &h, &m, &sec, &extra);
    if ((n != 2 && n != 3) || h > 23 || m > 59 || sec > 59)
        return -1;
    return h * 3600L + m * 60L + sec;
}

/* Seconds left in the daily window "HH:MM-HH:MM" (local time, seconds
 * optional, may span midnight; equal ends mean all day), 0 if now is
 * outside it, -1 if the text is not a window. */
static long window_seconds_left(const char *text)
{
    const char *dash = strchr(text, '-');
    long start = dash ? parse_clock(text, (size_t)(dash - text)) : -1;
    long end = dash ? parse_clock(dash + 1, strlen(dash + 1)) : -1;
    if (start < 0 || end < 0)
        return -1;
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    long day = 24 * 3600, at = tm.tm_hour * 3600L + tm.tm_min * 60L + tm.tm_sec;
    if (start == end)
        return day - ((at - start + day) % day);
    bool inside = start < end ? at >= start && at < end : at >= start || at < end;
    return inside ? (end - at + day) % day : 0;
}

/* Parses MOUNTPOINT NAME[@VERSION] [--list LIST] [--rate RATE] [--window W];
 * rate and window are NULL for commands that do not take them. */
static int parse_pin_args(const char *cmd, int argc, char **argv, char *name, uint64_t *version, const char **list,
                          uint64_t *rate, const char **window)
{
    if (argc < 3)
        return usage_error(cmd, "needs MOUNTPOINT and NAME[@VERSION]");
    *list = "-";
    for (int i = 3; i < argc; i += 2) {
        char msg[160];
        bool is_list = strcmp(argv[i], "--list") == 0, is_rate = rate && strcmp(argv[i], "--rate") == 0;
        bool is_window = window && strcmp(argv[i], "--window") == 0;
        if (is_window && i + 1 < argc) {
            if (window_seconds_left(argv[i + 1]) < 0)
                return usage_error(cmd, "--window needs local times such as 01:00-05:00");
            *window = argv[i + 1];
            continue;
        }
        if (!is_list && !is_rate && !is_window) {
            snprintf(msg, sizeof(msg), "unknown option or argument '%s'", argv[i]);
            return usage_error(cmd, msg);
        }
        if (i + 1 >= argc) {
            snprintf(msg, sizeof(msg), "option %s needs a value", argv[i]);
            return usage_error(cmd, msg);
        }
        if (is_list && !name_is_valid(argv[i + 1]))
            return usage_error(cmd, "--list needs a list name such as boot");
        if (is_list)
            *list = argv[i + 1];
        else if (parse_size(argv[i + 1], rate) != 0)
            return usage_error(cmd, "--rate needs a rate such as 50M");
    }
    if (resolve_base(argv[1], argv[2], name, 65, version) != 0) {
        fprintf(stderr, "imgfsctl %s: base %s is not on the mount at %s\n", cmd, argv[2], argv[1]);
        return 1;
    }
    return 0;
}

static int precopy_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        precopy_help(stdout);
        return 0;
    }
    char name[65], cmd[512], answer[1024];
    uint64_t version, rate = 0;
    const char *list;
    const char *window = NULL;
    int rc = parse_pin_args("precopy", argc, argv, name, &version, &list, &rate, &window);
    if (rc)
        return rc;
    long window_left = window ? window_seconds_left(window) : 0;
    if (window && window_left == 0) {
        printf("pre-copy of %s@%" PRIu64 ": now is outside the window %s, nothing done\n", name, version, window);
        return 0;
    }
    double deadline = window ? now_seconds() + (double)window_left : 0;
    bool window_closed = false;
    snprintf(cmd, sizeof(cmd), "precopy\t%s\t%" PRIu64 "\t%s\t%" PRIu64 "\n", name, version, list, rate);
    if (control_command("precopy", argv[1], cmd) != 0)
        return 1;
    snprintf(cmd, sizeof(cmd), "precopy-status\t%s\t%" PRIu64 "\t%s\n", name, version, list);
    struct progress bar;
    char label[96];
    snprintf(label, sizeof(label), "pre-copy %s@%" PRIu64, name, version);
    bool started = false;
    for (;;) {
        if (control_request("precopy", argv[1], cmd, answer, sizeof(answer)) != 0)
            return 1;
        char state[16] = "", error[512] = "";
        uint64_t done = 0, total = 0, fetched = 0;
        uint32_t chunk_size = 0;
        if (strncmp(answer, "ok ", 3) != 0 ||
            sscanf(answer + 3, "%15s %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu32 " %511[^\n]", state, &done, &total,
                   &fetched, &chunk_size, error) < 5) {
            fprintf(stderr, "imgfsctl precopy: %s\n", strncmp(answer, "error ", 6) == 0 ? answer + 6 : answer);
            return 1;
        }
        if (!started) {
            progress_start(&bar, label, total * chunk_size);
            started = true;
        }
        progress_update(&bar, done * chunk_size);
        if (strcmp(state, "running") != 0) {
            progress_finish(&bar);
            char size[32];
            printf("pre-copy of %s@%" PRIu64 ": %s, %" PRIu64 "/%" PRIu64 " chunks, %s fetched, pinned%s\n", name,
                   version, state, done, total, format_size(fetched, size, sizeof(size)),
                   window_closed ? " (the window ended; run again to resume)" : "");
            if (window_closed && strcmp(state, "stopped") == 0)
                return 0;
            if (strcmp(state, "done") != 0) {
                fprintf(stderr, "imgfsctl precopy: %s\n", error[0] ? error : "the pre-copy did not finish");
                return 1;
            }
            return 0;
        }
        if (deadline && !window_closed && now_seconds() >= deadline) {
            char stop[512];
            snprintf(stop, sizeof(stop), "precopy-stop\t%s\t%" PRIu64 "\t%s\n", name, version, list);
            if (control_command("precopy", argv[1], stop) != 0)
                return 1;
            window_closed = true;
        }
        usleep(200 * 1000);
    }
}

static int unpin_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        unpin_help(stdout);
        return 0;
    }
    char name[65], cmd[512];
    uint64_t version;
    const char *list;
    int rc = parse_pin_args("unpin", argc, argv, name, &version, &list, NULL, NULL);
    if (rc)
        return rc;
    snprintf(cmd, sizeof(cmd), "unpin\t%s\t%" PRIu64 "\t%s\n", name, version, list);
    return control_command("unpin", argv[1], cmd);
}

static void trace_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl trace start MOUNTPOINT VM\n"
                 "       imgfsctl trace stop MOUNTPOINT VM --output FILE [--timeout SECONDS]\n"
                 "\n"
                 "Records, in order of first access, the base chunks that VM reads, and writes\n"
                 "them as a prefetch list for the VM's base version. Publish it with\n"
                 "imgfsctl list publish; a list named boot is replayed when a VM disk opens.\n"
                 "imgfsctl writes FILE itself (replaced atomically; a FIFO is written into)\n"
                 "and gives up when a FIFO takes nothing for --timeout seconds (default 60;\n"
                 "0: no limit); the trace goes on when FILE cannot be opened.\n");
}

static int trace_main(int argc, char **argv)
{
    if (argc < 2 || wants_help(argc, argv)) {
        trace_help(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    char cmd[PATH_MAX + 128];
    if (strcmp(argv[1], "start") == 0 && argc == 4) {
        snprintf(cmd, sizeof(cmd), "trace-start\t%s\n", argv[3]);
        return control_command("trace start", argv[2], cmd);
    }
    if (strcmp(argv[1], "stop") == 0 && argc >= 6 && argc <= 8) {
        const char *output = NULL;
        double timeout = OUTPUT_TIMEOUT_DEFAULT;
        for (int i = 4; i + 1 < argc; i += 2) {
            if (strcmp(argv[i], "--output") == 0)
                output = argv[i + 1];
            else if (strcmp(argv[i], "--timeout") != 0)
                return usage_error("trace stop", "takes --output FILE and --timeout SECONDS");
            else if (parse_output_timeout("trace stop", argv[i + 1], &timeout) != 0)
                return 2;
        }
        if (!output || argc % 2)
            return usage_error("trace stop", "needs MOUNTPOINT VM --output FILE [--timeout SECONDS]");
        if (!name_is_valid(argv[3]))
            return usage_error("trace stop", "VM is not a valid name");
        snprintf(cmd, sizeof(cmd), "trace-stop\t%s\n", argv[3]);
        /* The output is opened first: a FIFO without a reader or a directory
         * that cannot be written fails before the trace is stopped. */
        return fetch_to_file("trace stop", argv[2], cmd, output, 0644, timeout);
    }
    return usage_error("trace", "needs start MOUNTPOINT VM, or stop MOUNTPOINT VM --output FILE [--timeout SECONDS]");
}

/* ---- list ------------------------------------------------------------------------ */

static void list_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl list publish REPO NAME[@VERSION] LISTNAME FILE [--key KEYFILE]...\n"
                 "       imgfsctl list from-files REPO NAME[@VERSION] LISTNAME PATHS [--key KEYFILE]...\n"
                 "\n"
                 "publish     stores a prefetch list (from imgfsctl trace stop) in the local\n"
                 "            repository REPO next to the version it belongs to; a list made\n"
                 "            for another version is refused\n"
                 "from-files  makes the list from the paths, inside the base's ext2/3/4\n"
                 "            file system, in PATHS (one path a line, as readahead and preload\n"
                 "            write them) and stores it the same way\n"
                 "A list named boot is replayed whenever a VM disk on that version opens.\n"
                 "--key signs the list (needed by hosts that mount with -o trust=FILE).\n");
}

/* Opens a local repository and the manifest of NAME[@VERSION] (newest by default). */
static int open_version(const char *cmd, const char *repo_path, const char *spec, struct repo **repo,
                        struct manifest **m)
{
    char err[512], name[65];
    uint64_t version = 0;
    const char *at = strchr(spec, '@');
    snprintf(name, sizeof(name), "%.*s", at ? (int)(at - spec) : (int)strlen(spec), spec);
    if (!name_is_valid(name) || (at && (parse_u64(at + 1, &version) < 0 || version == 0))) {
        fprintf(stderr, "imgfsctl %s: '%s' is not NAME or NAME@VERSION\n", cmd, spec);
        return 1;
    }
    if (strstr(repo_path, "://")) {
        fprintf(stderr, "imgfsctl %s: REPO must be a local repository directory\n", cmd);
        return 1;
    }
    if (repo_open(repo_path, repo, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl %s: %s\n", cmd, err);
        return 1;
    }
    if (!version) {
        struct repo_index index;
        const struct repo_index_entry *e = NULL;
        if (repo_read_index(*repo, &index, err, sizeof(err)) == 0) {
            e = repo_index_find(&index, name);
            version = e ? e->latest : 0;
            repo_index_free(&index);
        }
        if (!version) {
            fprintf(stderr, "imgfsctl %s: base %s is not in %s\n", cmd, name, repo_path);
            repo_close(*repo);
            return 1;
        }
    }
    if (repo_read_manifest(*repo, name, version, m, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl %s: %s\n", cmd, err);
        repo_close(*repo);
        return 1;
    }
    return 0;
}

/* Appends the signature lines of repo's signers to a malloc'd text. */
static int sign_malloced_text(struct repo *repo, char **text, size_t *len)
{
    size_t cap = *len + repo_signer_count(repo) * SIGN_LINE_LEN + 1;
    char *grown = realloc(*text, cap);
    if (!grown)
        return -ENOMEM;
    *text = grown;
    return repo_sign_text(repo, grown, len, cap);
}

/* Checks list against m and stores it as LISTNAME of that version, signed
 * by repo's signers. */
static int store_list(const char *cmd, struct repo *repo, const struct manifest *m, const char *list_name,
                      const struct chunk_list *list)
{
    char err[512], rel[256], path[PATH_MAX], dir[PATH_MAX];
    char *text = NULL;
    size_t len;
    if (list_check(list, m, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl %s: %s\n", cmd, err);
        return 1;
    }
    int rc = list_relpath(m->name, m->version, list_name, rel, sizeof(rel));
    if (!rc)
        rc = path_join(path, sizeof(path), "%s/%s", repo_location(repo), rel);
    if (!rc) {
        snprintf(dir, sizeof(dir), "%s", path);
        *strrchr(dir, '/') = '\0';
        rc = mkdir_p(dir);
    }
    if (!rc)
        rc = list_format(list, &text, &len);
    if (!rc && repo_signer_count(repo))
        rc = sign_malloced_text(repo, &text, &len);
    if (!rc)
        rc = write_file_atomic(path, text, len);
    free(text);
    if (rc) {
        fprintf(stderr, "imgfsctl %s: cannot store the list: %s\n", cmd, strerror(-rc));
        return 1;
    }
    printf("stored list %s of %s@%" PRIu64 " (%" PRIu64 " chunks) in %s\n", list_name, m->name, m->version,
           list->count, path);
    return 0;
}

static int list_main(int argc, char **argv)
{
    if (argc < 2 || wants_help(argc, argv)) {
        list_help(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (argc < 6 || (argc - 6) % 2 != 0 || (strcmp(argv[1], "publish") != 0 && strcmp(argv[1], "from-files") != 0))
        return usage_error("list", "needs publish|from-files REPO NAME[@VERSION] LISTNAME FILE [--key KEYFILE]");
    const char *cmd = strcmp(argv[1], "publish") == 0 ? "list publish" : "list from-files";
    static struct signing_keys keys;
    for (int i = 6; i < argc; i += 2) {
        if (strcmp(argv[i], "--key") != 0)
            return usage_error("list", "unknown option (only --key KEYFILE may follow FILE)");
        if (add_signing_key(cmd, &keys, argv[i + 1]) != 0)
            return 1;
    }
    if (!name_is_valid(argv[4])) {
        fprintf(stderr, "imgfsctl %s: invalid list name '%s'\n", cmd, argv[4]);
        return 1;
    }
    struct repo *repo;
    struct manifest *m;
    if (open_version(cmd, argv[2], argv[3], &repo, &m) != 0)
        return 1;
    repo_set_signers(repo, keys.keys, keys.count);
    if (!keys.count && repo_is_signed(repo)) {
        fprintf(stderr, "imgfsctl %s: the repository is signed: give --key KEYFILE (hosts refuse an unsigned list)\n",
                cmd);
        manifest_free(m);
        repo_close(repo);
        return 1;
    }
    char *text = NULL, err[512];
    size_t len;
    struct chunk_list *list = NULL;
    int status = 1;
    int rc = read_file(argv[5], 256u << 20, &text, &len);
    if (rc) {
        fprintf(stderr, "imgfsctl %s: cannot read %s: %s\n", cmd, argv[5], strerror(-rc));
    } else if (strcmp(argv[1], "publish") == 0) {
        if (list_parse(text, sign_body_len(text, len, NULL), &list, err, sizeof(err)) != 0)
            fprintf(stderr, "imgfsctl %s: %s: %s\n", cmd, argv[5], err);
        else
            status = store_list(cmd, repo, m, argv[4], list);
    } else {
        status = list_from_files(cmd, repo, m, argv[4], text);
    }
    list_free(list);
    free(text);
    manifest_free(m);
    repo_close(repo);
    return status;
}

/* ---- restart ---------------------------------------------------------------------- */

static void restart_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl restart MOUNTPOINT\n"
                 "\n"
                 "Hands the mount over to a fresh serving process started from the imgfs binary\n"
                 "on disk (so an upgraded package takes effect) with the options read again. The\n"
                 "old process finishes the requests it holds; open files, VM disks included, keep\n"
                 "working and see a pause, not an error. A pre-copy or trace in progress does not\n"
                 "survive: its imgfsctl reports that. Waits until the new process serves (at most\n"
                 "120 s) and prints its pid.\n");
}

/* The [daemon] pid of MOUNTPOINT's stats: > 0, 0 when there is none, or
 * -errno when the file cannot be read. */
static long serving_pid(const char *mountpoint)
{
    char path[PATH_MAX];
    if (path_join(path, sizeof(path), "%s/.imgfs/stats", mountpoint) < 0)
        return -ENAMETOOLONG;
    FILE *f = fopen(path, "re");
    if (!f)
        return -errno;
    char line[512];
    bool in_daemon = false;
    long pid = 0;
    while (fgets(line, sizeof(line), f)) {
        if (line[0] == '[')
            in_daemon = strncmp(line, "[daemon]", 8) == 0;
        else if (in_daemon && sscanf(line, "pid %ld", &pid) == 1)
            break;
    }
    fclose(f);
    return pid;
}

static int restart_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        restart_help(stdout);
        return 0;
    }
    if (argc != 2)
        return usage_error("restart", "needs MOUNTPOINT");
    long old = serving_pid(argv[1]);
    if (old <= 0) {
        fprintf(stderr, "imgfsctl restart: %s is not an imgfs mount with a serving process (%s)\n", argv[1],
                old < 0 ? strerror((int)-old) : "no pid in its stats");
        return 1;
    }
    if (control_command("restart", argv[1], "restart\n") != 0)
        return 1;
    for (int i = 0; i < 1200; i++) {
        long now = serving_pid(argv[1]);
        if (now < 0) {
            fprintf(stderr, "imgfsctl restart: the mount at %s has ended: the new serving process did not "
                            "start; see the system log\n",
                    argv[1]);
            return 1;
        }
        if (now > 0 && now != old) {
            printf("%s: served by pid %ld (was %ld)\n", argv[1], now, old);
            return 0;
        }
        usleep(100 * 1000);
    }
    fprintf(stderr, "imgfsctl restart: pid %ld still serves %s after 120 s\n", old, argv[1]);
    return 1;
}

/* ---- key, sign ----------------------------------------------------------------- */

static void key_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl key generate KEYFILE [--comment TEXT]\n"
                 "\n"
                 "Makes a new Ed25519 signing key: KEYFILE holds the secret key (mode 0600; an\n"
                 "existing file is never overwritten) and KEYFILE.pub the public key, one line\n"
                 "that goes into the trust files of the hosts (-o trust=FILE). A trust file\n"
                 "may hold several such lines, which is how keys are rotated.\n");
}

static int key_main(int argc, char **argv)
{
    if (argc < 2 || wants_help(argc, argv)) {
        key_help(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *comment = NULL;
    if (strcmp(argv[1], "generate") != 0 || !(argc == 3 || (argc == 5 && strcmp(argv[3], "--comment") == 0)))
        return usage_error("key", "needs generate KEYFILE [--comment TEXT]");
    if (argc == 5)
        comment = argv[4];
    char err[PATH_MAX + 128];
    if (sign_key_generate(argv[2], comment, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl key generate: %s\n", err);
        return 1;
    }
    printf("secret key  %s (keep it off the hosts)\npublic key  %s.pub (add it to the hosts' trust file)\n",
           argv[2], argv[2]);
    return 0;
}

static void sign_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl sign REPO --key KEYFILE [--key KEYFILE]...\n"
                 "\n"
                 "Signs the local repository REPO: writes the digests record of every version\n"
                 "that lacks one (reading each chunk back and checking it; no chunk or manifest\n"
                 "changes, so VMs on existing versions keep working), a new signed index with\n"
                 "the next sequence number, and signs every prefetch list again. Run it to sign\n"
                 "an unsigned repository, to re-sign with a new key (rotation: give the old and\n"
                 "the new key while some hosts trust only the old one), or to re-sign the index\n"
                 "before hosts' max_index_age runs out.\n");
}

/* Signs every list of every version of the bases in index again. */
static int sign_lists(struct repo *repo, const struct repo_index *index, unsigned *count)
{
    for (size_t i = 0; i < index->count; i++) {
        for (uint64_t v = 1; v <= index->entries[i].latest; v++) {
            char dir[PATH_MAX];
            if (path_join(dir, sizeof(dir), "%s/bases/%s/%" PRIu64 ".lists", repo_location(repo),
                          index->entries[i].name, v) != 0)
                return -ENAMETOOLONG;
            DIR *d = opendir(dir);
            if (!d)
                continue;
            struct dirent *e;
            int rc = 0;
            while (!rc && (e = readdir(d))) {
                char path[PATH_MAX];
                char *text;
                size_t len;
                if (!name_is_valid(e->d_name) || strstr(e->d_name, ".tmp."))
                    continue;
                rc = path_join(path, sizeof(path), "%s/%s", dir, e->d_name);
                if (!rc && (rc = read_file(path, REPO_MAX_LIST_LEN, &text, &len)) == 0) {
                    len = sign_body_len(text, len, NULL);
                    rc = sign_malloced_text(repo, &text, &len);
                    if (!rc)
                        rc = write_file_atomic(path, text, len);
                    free(text);
                    (*count)++;
                }
            }
            closedir(d);
            if (rc)
                return rc;
        }
    }
    return 0;
}

static int sign_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        sign_help(stdout);
        return 0;
    }
    if (argc < 4 || argc % 2 != 0)
        return usage_error("sign", "needs REPO --key KEYFILE");
    static struct signing_keys keys;
    for (int i = 2; i < argc; i += 2) {
        if (strcmp(argv[i], "--key") != 0)
            return usage_error("sign", "unknown option");
        if (add_signing_key("sign", &keys, argv[i + 1]) != 0)
            return 1;
    }
    char err[PATH_MAX + 256];
    struct repo *repo;
    if (strstr(argv[1], "://")) {
        fprintf(stderr, "imgfsctl sign: REPO must be a local repository directory\n");
        return 1;
    }
    if (repo_open(argv[1], &repo, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl sign: %s\n", err);
        return 1;
    }
    repo_set_signers(repo, keys.keys, keys.count);
    struct repo_index index = {0};
    unsigned lists = 0;
    int rc = repo_lock_publish(repo);
    if (rc)
        snprintf(err, sizeof(err), "cannot lock the repository: %s", strerror(-rc));
    if (!rc)
        rc = repo_read_index(repo, &index, err, sizeof(err));
    if (!rc && (rc = repo_write_index(repo, &index)) != 0)
        snprintf(err, sizeof(err), "cannot sign the repository: %s (see the messages above)", strerror(-rc));
    if (!rc && (rc = sign_lists(repo, &index, &lists)) != 0)
        snprintf(err, sizeof(err), "cannot sign the prefetch lists: %s", strerror(-rc));
    if (!rc) {
        uint64_t versions = 0;
        for (size_t i = 0; i < index.count; i++)
            versions += index.entries[i].latest;
        printf("signed %s: %zu bases, %" PRIu64 " versions, %u lists, index sequence %" PRIu64 ", %zu key%s\n",
               argv[1], index.count, versions, lists, index.seq + 1, keys.count, keys.count == 1 ? "" : "s");
    } else {
        fprintf(stderr, "imgfsctl sign: %s\n", err);
    }
    repo_index_free(&index);
    repo_unlock_publish(repo);
    repo_close(repo);
    return rc ? 1 : 0;
}

/* ---- dispatch --------------------------------------------------------------------- */

static const struct subcommand subcommands[] = {
    {"publish", "publish a raw or qcow2 image as a new base version", publish_main, publish_help},
    {"status", "show the status of a mount", status_main, status_help},
    {"versions", "list every version of the bases of a repository", versions_main, versions_help},
    {"retire", "retire an old version of a base", retire_main, retire_help},
    {"gc", "remove the chunks that no version references", gc_main, gc_help},
    {"vm", "create, snapshot, clone, remove, export and import VM disks", vm_main, vm_help},
    {"precopy", "fill the cache with a base version or list, and pin it", precopy_main, precopy_help},
    {"unpin", "release what precopy pinned", unpin_main, unpin_help},
    {"trace", "record the base chunks a VM reads, as a prefetch list", trace_main, trace_help},
    {"list", "publish prefetch lists, or make them from file paths", list_main, list_help},
    {"restart", "hand a mount over to a fresh imgfs process, under running VMs", restart_main, restart_help},
    {"key", "generate a signing key pair", key_main, key_help},
    {"sign", "sign a repository (every version, the index and the lists)", sign_main, sign_help},
    {"check", "say what is wrong with a mount or a repository on this host", check_main, check_help},
};

static void main_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl SUBCOMMAND [ARGS...]\n\nSubcommands:\n");
    for (size_t i = 0; i < ARRAY_LEN(subcommands); i++)
        fprintf(out, "  %-10s %s\n", subcommands[i].name, subcommands[i].summary);
    fprintf(out, "\nEvery subcommand answers --help. Sizes accept suffixes (64K, 20G).\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        main_help(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        main_help(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("imgfsctl %s\n", IMGFS_VERSION);
        return 0;
    }
    if (sign_init() != 0) {
        fprintf(stderr, "imgfsctl: libsodium cannot be initialised\n");
        return 1;
    }
    for (size_t i = 0; i < ARRAY_LEN(subcommands); i++)
        if (strcmp(argv[1], subcommands[i].name) == 0)
            return subcommands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "imgfsctl: unknown subcommand '%s' (see imgfsctl --help)\n", argv[1]);
    return 2;
}

struct repo_disk {
    struct repo *repo;
    const struct manifest *m;
};

static int read_repo_disk(void *ctx, void *buf, size_t len, uint64_t off)
{
    struct repo_disk *d = ctx;
    return repo_read_range(d->repo, d->m, buf, len, off);
}

static int list_from_files(const char *cmd, struct repo *repo, const struct manifest *m, const char *list_name,
                           const char *paths)
{
    struct repo_disk disk = {repo, m};
    struct chunk_list *list = NULL;
    char *warnings = NULL, err[512];
    int rc = extmap_paths_to_list(m, read_repo_disk, &disk, paths, &list, &warnings, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "imgfsctl %s: %s\n", cmd, err);
        if (warnings)
            fputs(warnings, stderr);
        free(warnings);
        return 1;
    }
    if (warnings)
        fputs(warnings, stderr);
    free(warnings);
    int status = store_list(cmd, repo, m, list_name, list);
    list_free(list);
    return status;
}
