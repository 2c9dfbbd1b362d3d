#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static int stop_trace(struct imgfs *fs, struct vm *vm, const char *path, char *err, size_t errlen)
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
    if (!rc && path[0] != '/')
        rc = -EINVAL;
    if (!rc)
        rc = write_file_atomic(path, text, len);
    free(text);
    if (rc)
        snprintf(err, errlen, "cannot write the trace to %s: %s", path, strerror(-rc));
    return rc;
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

static int run(struct imgfs *fs, char **f, int n, char *err, size_t errlen)
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
    } else if (n == 3 && strcmp(f[0], "vm-export") == 0) {
        if (!(vm = need_vm(fs, f[1], err, errlen)))
            return -ENOENT;
        return vm_export(fs->vms, vm, NULL, f[2], err, errlen);
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
    } else if (n == 3 && strcmp(f[0], "trace-stop") == 0) {
        if (!(vm = need_vm(fs, f[1], err, errlen)))
            return -ENOENT;
        return stop_trace(fs, vm, f[2], err, errlen);
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
    } else if (n == 3 && strcmp(f[0], "vm-import") == 0) {
        rc = vm_import(fs->vms, f[1], strcmp(f[2], "-") ? f[2] : NULL, &vm, err, errlen);
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

char *control_execute(struct imgfs *fs, const char *command, size_t len)
{
    char *line = strndup(command, len);
    if (!line)
        return NULL;
    char *fields[MAX_FIELDS];
    int n = split_fields(line, fields);
    if (n == 4 && strcmp(fields[0], "precopy-status") == 0) {
        char *answer = precopy_status(fs, fields);
        free(line);
        return answer;
    }
    char err[512] = "";
    /* command is len bytes, not a string: split_fields cut line apart, so
     * the log takes the first line of command by length. */
    bool is_precopy = n > 0 && strncmp(fields[0], "precopy", 7) == 0;
    int rc = run(fs, fields, n, err, sizeof(err));
    if (rc == 0 && !is_precopy) {
        const char *eol = memchr(command, '\n', len);
        log_info("control: %.*s done", (int)(eol ? (size_t)(eol - command) : len), command);
    }
    free(line);
    return rc ? reply("error %s\n", err[0] ? err : strerror(-rc)) : reply("ok\n");
}
