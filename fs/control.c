#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "fs.h"
#include "util.h"

#define MAX_FIELDS 6

const struct vm_base *fs_lookup_base(void *ctx, const char *name, uint64_t version)
{
    struct imgfs *fs = ctx;
    struct base_version *v = tree_find_version(fs->tree, name, version);
    return v ? &v->view : NULL;
}

static char *reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *reply(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *out = NULL;
    if (vasprintf(&out, fmt, ap) < 0)
        out = NULL;
    va_end(ap);
    return out;
}

/* Splits a line at tabs into at most MAX_FIELDS fields (in place). */
static int split_fields(char *line, char **fields)
{
    int n = 0;
    char *save = NULL;
    for (char *f = strtok_r(line, "\t\n", &save); f && n < MAX_FIELDS; f = strtok_r(NULL, "\t\n", &save))
        fields[n++] = f;
    return n;
}

static struct vm *need_vm(struct imgfs *fs, const char *name, char *err, size_t errlen)
{
    struct vm *vm = vm_find(fs->vms, name);
    if (!vm)
        snprintf(err, errlen, "VM %s does not exist", name);
    return vm;
}

/* NAME VERSION LIST|- to a base version and a pin key "NAME@V[+LIST]". */
static struct base_version *need_version(struct imgfs *fs, char **f, char *key, size_t keylen, char *err,
                                         size_t errlen)
{
    uint64_t version;
    struct base_version *v = NULL;
    if (parse_u64(f[1], &version) == 0)
        v = tree_find_version(fs->tree, f[0], version);
    if (!v) {
        snprintf(err, errlen, "base %s@%s is not on this mount", f[0], f[1]);
        return NULL;
    }
    if (strcmp(f[2], "-") == 0)
        snprintf(key, keylen, "%s@%s", f[0], f[1]);
    else
        snprintf(key, keylen, "%s@%s+%s", f[0], f[1], f[2]);
    return v;
}

static int start_precopy(struct imgfs *fs, char **f, char *err, size_t errlen)
{
    char key[160];
    uint64_t rate;
    struct base_version *v = need_version(fs, f + 1, key, sizeof(key), err, errlen);
    if (!v)
        return -ENOENT;
    if (parse_u64(f[4], &rate) < 0) {
        snprintf(err, errlen, "bad rate '%s'", f[4]);
        return -EINVAL;
    }
    struct chunk_list *list = NULL;
    if (strcmp(f[3], "-") != 0) {
        int rc = repo_read_list(fs->repo, v->manifest, f[3], &list, err, errlen);
        if (rc)
            return rc;
    }
    int rc = prefetch_precopy(fs->prefetcher, key, v->manifest, list, rate, &v->marks, err, errlen);
    list_free(list);
    return rc;
}

/* trace-stop: the list goes back to imgfsctl after the answer line, which
 * writes it where the operator asked (the daemon writes no user file). */
static int stop_trace(struct imgfs *fs, struct vm *vm, struct control_answer *out, char *err, size_t errlen)
{
    struct chunk_trace *t = vm_trace_stop(vm);
    if (!t) {
        snprintf(err, errlen, "VM %s is not being traced%s", vm_name(vm),
                 fs->takeover_server ? " (the serving process was replaced since the mount, by a crash or "
                                       "imgfsctl restart, and a trace does not survive that: start it again)"
                                     : "");
        return -EINVAL;
    }
    struct chunk_list *list;
    char *text = NULL;
    size_t len;
    int rc = trace_finish(t, vm_get_base(vm, NULL)->manifest, &list);
    if (!rc) {
        rc = list_format(list, &text, &len);
        list_free(list);
    }
    char *answer = rc ? NULL : reply("ok %zu\n", len);
    size_t head = answer ? strlen(answer) : 0;
    char *whole = answer ? realloc(answer, head + len + 1) : NULL;
    if (!whole) {
        free(answer);
        free(text);
        snprintf(err, errlen, "cannot make the trace list of VM %s: %s", vm_name(vm), strerror(rc ? -rc : ENOMEM));
        return rc ? rc : -ENOMEM;
    }
    memcpy(whole + head, text, len);
    whole[head + len] = '\0';
    free(text);
    out->text = whole;
    out->len = head + len;
    return 0;
}

/* Leaves the rest of a command on its handle (fs.h control_deferred). */
static int defer(struct control_answer *out, int kind, const char *vm, int fd, uint64_t size)
{
    struct control_deferred *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->kind = kind;
    snprintf(d->vm, sizeof(d->vm), "%s", vm);
    d->fd = fd;
    d->size = size;
    out->deferred = d;
    return 0;
}

/* An unnamed file of the state directory, for an export or an import on
 * its way through: the daemon's own disk, so that no user's path can hold
 * it up, and a crash or a closed handle leaves nothing. fd or -errno. */
static int open_staging_file(struct imgfs *fs)
{
    int fd = open(fs->opts->state_dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR)) {
        char tmp[PATH_MAX];
        if (path_join(tmp, sizeof(tmp), "%s/.stage-XXXXXX", fs->opts->state_dir) == 0 &&
            (fd = mkostemp(tmp, O_CLOEXEC)) >= 0)
            unlink(tmp);
    }
    return fd < 0 ? -errno : fd;
}

static int stage_export(struct imgfs *fs, const char *name, bool (*stop)(void *ctx), void *stop_ctx, int *fd_out,
                        uint64_t *size_out, char **answer)
{
    char err[512] = "";
    /* Open, so that vm rm refuses it (EBUSY) while it is read. */
    struct vm *vm = vm_find(fs->vms, name);
    if (!vm || vm_open(vm, NULL) != 0) {
        *answer = reply("error VM %s does not exist\n", name);
        return -ENOENT;
    }
    int fd = open_staging_file(fs);
    int rc = fd < 0 ? fd : 0;
    if (rc)
        snprintf(err, sizeof(err), "cannot stage the export of VM %s in %s: %s", name, fs->opts->state_dir,
                 strerror(-rc));
    if (!rc && (rc = vm_export(vm, fd, stop, stop_ctx, err, sizeof(err))) == -ENOSPC)
        snprintf(err, sizeof(err), "cannot export VM %s: the state directory %s has no room to stage it", name,
                 fs->opts->state_dir);
    vm_close(vm, NULL);
    off_t size = rc ? -1 : lseek(fd, 0, SEEK_CUR);
    if (!rc && size < 0) {
        rc = -errno;
        snprintf(err, sizeof(err), "cannot export VM %s: %s", name, strerror(errno));
    }
    if (!rc && !(*answer = reply("ok %" PRIu64 "\n", (uint64_t)size)))
        rc = -ENOMEM;
    if (rc) {
        if (fd >= 0)
            close(fd);
        if (!*answer)
            *answer = reply("error %s\n", err[0] ? err : strerror(-rc));
        return rc;
    }
    log_info("control: vm-export %s staged, %" PRIu64 " bytes", name, (uint64_t)size);
    *fd_out = fd;
    *size_out = (uint64_t)size;
    return 0;
}

/* vm-import-stream NAME|- SIZE: refused here, before imgfsctl sends a
 * byte, when it cannot work; else the handle takes the stream. */
static int start_import(struct imgfs *fs, const char *name, const char *size_text, struct control_answer *out,
                        char *err, size_t errlen)
{
    bool named = strcmp(name, "-") != 0;
    uint64_t size;
    char size_s[32], free_s[32];
    if (parse_u64(size_text, &size) < 0) {
        snprintf(err, errlen, "bad size '%s'", size_text);
        return -EINVAL;
    }
    if (size < VM_EXPORT_MIN_SIZE || size > VM_EXPORT_MAX_SIZE) {
        snprintf(err, errlen, "a file of %" PRIu64 " bytes cannot be an imgfs export (%s)", size,
                 size < VM_EXPORT_MIN_SIZE ? "too short" : "longer than that of the largest disk, 16T");
        return -EINVAL;
    }
    if (named && !name_is_valid(name)) {
        snprintf(err, errlen, "invalid VM name '%s': use 1-64 letters, digits, '.', '_' or '-'", name);
        return -EINVAL;
    }
    if (named && vm_find(fs->vms, name)) {
        snprintf(err, errlen, "VM %s already exists", name);
        return -EEXIST;
    }
    /* The staged copy and the VM's data (at most as much) share the disk. */
    struct statvfs sv;
    if (statvfs(fs->opts->state_dir, &sv) == 0 && (uint64_t)sv.f_bavail * sv.f_frsize / 2 < size) {
        snprintf(err, errlen, "the state directory %s has %s free: importing this %s export needs twice that",
                 fs->opts->state_dir, format_size((uint64_t)sv.f_bavail * sv.f_frsize, free_s, sizeof(free_s)),
                 format_size(size, size_s, sizeof(size_s)));
        return -ENOSPC;
    }
    int fd = open_staging_file(fs);
    if (fd < 0) {
        snprintf(err, errlen, "cannot stage an import in %s: %s", fs->opts->state_dir, strerror(-fd));
        return fd;
    }
    /* What imgfsctl reads before it sends a byte: a daemon without
     * vm-import-stream answers an error instead, so no byte of the file is
     * ever taken for a command. Made before the stream is set up: a handle
     * that answers an error must not take its next writes as bytes. */
    char *text = reply("ok stream\n");
    int rc = text ? defer(out, CONTROL_IMPORT, named ? name : "", fd, size) : -ENOMEM;
    if (rc) {
        free(text);
        close(fd);
        return rc;
    }
    out->text = text;
    log_info("control: vm-import-stream %s: staging %" PRIu64 " bytes", named ? name : "-", size);
    return 0;
}

bool control_receiving(const struct control_deferred *d) { return d && d->kind == CONTROL_IMPORT; }

bool control_ready(const struct control_deferred *d)
{
    return d && (d->kind != CONTROL_IMPORT || d->received == d->size || d->error[0]);
}

/* Ends a stream that failed: its staged copy goes at once, and the error
 * is what the handle answers from now on. */
static int stream_failed(struct control_deferred *d, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int stream_failed(struct control_deferred *d, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->error, sizeof(d->error), fmt, ap);
    va_end(ap);
    close(d->fd);
    d->fd = -1;
    return rc;
}

int control_receive(struct imgfs *fs, struct control_deferred *d, const void *buf, size_t len, uint64_t off)
{
    if (d->error[0])
        return -EIO;
    if (off != d->received)
        return stream_failed(d, -EINVAL,
                             "the import stream's bytes came out of order (at %" PRIu64 ", not %" PRIu64 ")", off,
                             d->received);
    if (len > d->size - d->received)
        return stream_failed(d, -EINVAL, "the import stream runs past the %" PRIu64 " bytes announced", d->size);
    int rc = write_full_at(d->fd, buf, len, (off_t)off);
    if (rc == -ENOSPC)
        return stream_failed(d, rc, "the state directory %s has no room left to stage the import", fs->opts->state_dir);
    if (rc)
        return stream_failed(d, rc, "cannot stage the import in %s: %s", fs->opts->state_dir, strerror(-rc));
    d->received += len;
    return 0;
}

static int import_staged(struct imgfs *fs, const struct control_deferred *d, bool (*stop)(void *ctx), void *stop_ctx,
                         char **answer)
{
    char err[512] = "";
    struct vm *vm = NULL;
    int rc = 0;
    if (d->error[0]) { /* else every byte is in: control_ready() let this read run d */
        snprintf(err, sizeof(err), "%s", d->error);
        rc = -EIO;
    }
    if (!rc)
        rc = vm_import(fs->vms, d->fd, d->vm[0] ? d->vm : NULL, stop, stop_ctx, &vm, err, sizeof(err));
    if (!rc && (rc = tree_add_vm(fs->tree, vm)) != 0)
        snprintf(err, sizeof(err), "out of memory");
    if (!rc)
        log_info("control: vm-import-stream of %" PRIu64 " bytes done: VM %s", d->size, vm_name(vm));
    *answer = rc ? reply("error %s\n", err[0] ? err : strerror(-rc)) : reply("ok\n");
    return rc ? rc : *answer ? 0 : -ENOMEM;
}

int control_run_deferred(struct imgfs *fs, const struct control_deferred *d, bool (*stop)(void *ctx), void *stop_ctx,
                         int *fd_out, uint64_t *size_out, char **answer)
{
    *fd_out = -1;
    *answer = NULL;
    if (d->kind == CONTROL_EXPORT)
        return stage_export(fs, d->vm, stop, stop_ctx, fd_out, size_out, answer);
    return import_staged(fs, d, stop, stop_ctx, answer);
}

void control_deferred_free(struct control_deferred *d)
{
    if (d && d->fd >= 0)
        close(d->fd);
    free(d);
}

void control_answer_free(struct control_answer *out)
{
    free(out->text);
    control_deferred_free(out->deferred);
    out->text = NULL;
    out->deferred = NULL;
}

int fs_remove_disk(struct imgfs *fs, const char *name, char *err, size_t errlen)
{
    char vm_name[65];
    const char *at = strchr(name, '@');
    size_t len = at ? (size_t)(at - name) : strlen(name);
    if (len >= sizeof(vm_name)) {
        snprintf(err, errlen, "VM %s does not exist", name);
        return -ENOENT;
    }
    snprintf(vm_name, sizeof(vm_name), "%.*s", (int)len, name);
    struct vm *vm = vm_find(fs->vms, vm_name);
    int rc;
    if (at) {
        if (!vm) {
            snprintf(err, errlen, "VM %s does not exist", vm_name);
            return -ENOENT;
        }
        rc = vm_remove_snapshot(fs->vms, vm, at + 1, err, errlen);
    } else if (!vm) {
        return vm_remove_unloaded(fs->vms, name, err, errlen); /* or it does not exist */
    } else if ((rc = vm_remove(fs->vms, vm, err, errlen)) == 0) {
        tree_remove_vm(fs->tree, vm);
    }
    if (!rc)
        tree_prune_snapshots(fs->tree);
    return rc;
}

static int run(struct imgfs *fs, char **f, int n, struct control_answer *out, char *err, size_t errlen)
{
    struct vm *vm = NULL, *src;
    int rc;
    if (n == 4 && strcmp(f[0], "vm-create") == 0) {
        uint64_t number;
        if (parse_u64(f[3], &number) < 0) {
            snprintf(err, errlen, "bad number '%s'", f[3]);
            return -EINVAL;
        }
        bool blank = strcmp(f[2], "-") == 0;
        rc = vm_create(fs->vms, f[1], blank ? NULL : f[2], blank ? 0 : number, blank ? number : 0, &vm, err, errlen);
    } else if (n == 3 && strcmp(f[0], "vm-snapshot") == 0) {
        if (!(vm = need_vm(fs, f[1], err, errlen)))
            return -ENOENT;
        rc = vm_snapshot(fs->vms, vm, f[2], err, errlen);
    } else if (n == 4 && strcmp(f[0], "vm-clone") == 0) {
        if (!(src = need_vm(fs, f[1], err, errlen)))
            return -ENOENT;
        rc = vm_clone(fs->vms, src, strcmp(f[2], "-") ? f[2] : NULL, f[3], &vm, err, errlen);
        if (!rc)
            rc = tree_add_vm(fs->tree, src); /* an implicit snapshot of src */
    } else if (n == 2 && strcmp(f[0], "vm-rm") == 0) {
        return fs_remove_disk(fs, f[1], err, errlen);
    } else if (n == 2 && strcmp(f[0], "vm-export") == 0) {
        /* Staged when the answer is first read (stage_export),
         * so that this write, which the kernel serializes with every
         * other command's, returns at once. */
        if (!need_vm(fs, f[1], err, errlen))
            return -ENOENT;
        return defer(out, CONTROL_EXPORT, f[1], -1, 0);
    } else if (n == 5 && strcmp(f[0], "precopy") == 0) {
        return start_precopy(fs, f, err, errlen);
    } else if (n == 4 && strcmp(f[0], "precopy-stop") == 0) {
        char key[160];
        if (!need_version(fs, f + 1, key, sizeof(key), err, errlen))
            return -ENOENT;
        rc = prefetch_stop(fs->prefetcher, key);
        if (rc == -ENOENT)
            snprintf(err, errlen, "no pre-copy of %s in this mount", key);
        return rc;
    } else if (n == 4 && strcmp(f[0], "unpin") == 0) {
        char key[160];
        if (!need_version(fs, f + 1, key, sizeof(key), err, errlen))
            return -ENOENT;
        rc = prefetch_unpin(fs->prefetcher, key);
        if (rc == -ENOENT)
            snprintf(err, errlen, "%s is not pinned", key);
        return rc;
    } else if (n == 2 && strcmp(f[0], "trace-start") == 0) {
        if (!(vm = need_vm(fs, f[1], err, errlen)))
            return -ENOENT;
        return vm_trace_start(vm, err, errlen);
    } else if (n == 2 && strcmp(f[0], "trace-stop") == 0) {
        if (!(vm = need_vm(fs, f[1], err, errlen)))
            return -ENOENT;
        return stop_trace(fs, vm, out, err, errlen);
    } else if (n == 1 && strcmp(f[0], "restart") == 0) {
        /* The supervisor asks this server to hand over, then starts the
         * binary from disk (supervisor.h); the answer goes out first. */
        if (!fs->takeover || fs->takeover->supervisor_pid <= 0) {
            snprintf(err, errlen, "this daemon runs without a supervisor and cannot hand over");
            return -ENOTSUP;
        }
        if (kill(fs->takeover->supervisor_pid, 0) != 0) {
            snprintf(err, errlen, "cannot reach the supervisor (pid %d): %s", (int)fs->takeover->supervisor_pid,
                     strerror(errno));
            return -errno;
        }
        /* Asked when imgfsctl closes the control file (fs_control_released),
         * so that it reads this answer from this server. */
        atomic_store(&fs->restart_pending, true);
        return 0;
    } else if (n == 3 && strcmp(f[0], "vm-import-stream") == 0) {
        return start_import(fs, f[1], f[2], out, err, errlen);
    } else {
        snprintf(err, errlen, "unknown or malformed command '%s'", n ? f[0] : "");
        return -EINVAL;
    }
    if (!rc && vm && (rc = tree_add_vm(fs->tree, vm)) != 0)
        snprintf(err, errlen, "out of memory");
    return rc;
}

/* precopy-status answers with numbers rather than a plain "ok". */
static char *precopy_status(struct imgfs *fs, char **f)
{
    char key[160], err[256];
    if (!need_version(fs, f + 1, key, sizeof(key), err, sizeof(err)))
        return reply("error %s\n", err);
    struct job_status st;
    if (prefetch_status(fs->prefetcher, key, &st) != 0)
        return fs->takeover_server
                   ? reply("error no pre-copy of %s runs in this mount: the serving process was replaced "
                           "(crash or imgfsctl restart) and a pre-copy does not survive that; what it fetched "
                           "stays cached and pinned: run imgfsctl precopy again to finish\n",
                           key)
                   : reply("error no pre-copy of %s in this mount\n", key);
    struct base_version *v = tree_find_version(fs->tree, f[1], strtoull(f[2], NULL, 10));
    return reply("ok %s %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu32 " %s\n", st.state, st.done, st.total,
                 st.bytes_fetched, v ? v->manifest->chunk_size : 0, st.error);
}

void fs_control_released(struct imgfs *fs)
{
    if (fs->takeover && atomic_exchange(&fs->restart_pending, false))
        kill(fs->takeover->supervisor_pid, SIGUSR1);
}

int control_execute(struct imgfs *fs, const char *command, size_t len, struct control_answer *out)
{
    memset(out, 0, sizeof(*out));
    char *line = strndup(command, len);
    if (!line)
        return -ENOMEM;
    char *fields[MAX_FIELDS];
    int n = split_fields(line, fields);
    char err[512] = "";
    int rc = 0;
    if (n == 4 && strcmp(fields[0], "precopy-status") == 0) {
        out->text = precopy_status(fs, fields);
    } else {
        /* command is len bytes, not a string: split_fields cut line apart,
         * so the log takes the first line of command by length. */
        bool quiet = n > 0 && strncmp(fields[0], "precopy", 7) == 0;
        rc = run(fs, fields, n, out, err, sizeof(err));
        if (rc == 0 && !quiet && !out->deferred) {
            const char *eol = memchr(command, '\n', len);
            log_info("control: %.*s done", (int)(eol ? (size_t)(eol - command) : len), command);
        }
        if (!out->text && rc)
            out->text = reply("error %s\n", err[0] ? err : strerror(-rc));
        else if (!out->text)
            out->text = reply("%s", out->deferred ? "" : "ok\n");
    }
    free(line);
    if (!out->text) {
        control_answer_free(out);
        return -ENOMEM;
    }
    if (!out->len)
        out->len = strlen(out->text);
    return 0;
}
