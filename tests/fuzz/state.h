/* A scratch state directory for the harnesses that need a VM registry:
 * made fresh (and removed again) around each input. */
#ifndef IMGFS_FUZZ_STATE_H
#define IMGFS_FUZZ_STATE_H

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "vm.h"

static char fuzz_dir[64];

static void fuzz_remove_scratch(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", fuzz_dir);
    if (chdir("/") != 0 || system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", fuzz_dir);
}

/* Creates the scratch directory once and works inside it, so that relative
 * paths in inputs stay in it. */
static const char *fuzz_scratch(void)
{
    if (!fuzz_dir[0]) {
        snprintf(fuzz_dir, sizeof(fuzz_dir), "/tmp/imgfs-fuzz.XXXXXX");
        if (!mkdtemp(fuzz_dir) || chdir(fuzz_dir) != 0 || atexit(fuzz_remove_scratch) != 0)
            abort();
    }
    return fuzz_dir;
}

/* The base lookup of the scratch registry: there are no bases. */
static const struct vm_base *no_base(void *ctx, const char *name, uint64_t version)
{
    (void)ctx, (void)name, (void)version;
    return NULL;
}

static void fuzz_reset_state(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s/state", fuzz_scratch());
    if (system(cmd) != 0)
        abort();
}

#endif
