#include <errno.h>
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
        if (!(vm = need_vm(fs, f[1], err, errlen)))
            return -ENOENT;
        rc = vm_remove(fs->vms, vm, err, errlen);
        if (!rc)
            tree_remove_vm(fs->tree, vm);
        return rc;
    } else if (n == 3 && strcmp(f[0], "vm-export") == 0) {
        if (!(vm = need_vm(fs, f[1], err, errlen)))
            return -ENOENT;
        return vm_export(fs->vms, vm, NULL, f[2], err, errlen);
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

char *control_execute(struct imgfs *fs, const char *command, size_t len)
{
    if (!fs->vms)
        return reply("error this mount has no state directory for VMs (mount with -o state=DIR)\n");
    char *line = strndup(command, len);
    if (!line)
        return NULL;
    char *fields[MAX_FIELDS];
    int n = split_fields(line, fields);
    char err[512] = "";
    int rc = run(fs, fields, n, err, sizeof(err));
    if (rc == 0)
        log_info("control: %.*s done", (int)strcspn(command, "\n"), command);
    free(line);
    return rc ? reply("error %s\n", err[0] ? err : strerror(-rc)) : reply("ok\n");
}
