/* Command lines written to .imgfs/control (fs.h control_execute), against a
 * mount with an empty repository tree and a scratch state directory.
 * The first line is a command. When it opened an import stream
 * (vm-import-stream), the rest of the input is the stream's bytes, given in
 * two writes, and then the import runs as the handle's first read would run
 * it; else the rest is a second command, which sees what the first made.
 * Command lines with '/' are skipped (no absolute path may leave the scratch
 * directory), and so are numbers of more than 9 digits (a 16T VM disk is
 * legal but would only measure the disk). */
#include <stdlib.h>
#include <string.h>

#include "fs.h"
#include "fuzz.h"
#include "state.h"
#include "tree.h"
#include "vm.h"

static bool acceptable(const uint8_t *data, size_t size)
{
    size_t digits = 0;
    for (size_t i = 0; i < size; i++) {
        if (data[i] == '/')
            return false;
        digits = data[i] >= '0' && data[i] <= '9' ? digits + 1 : 0;
        if (digits > 9)
            return false;
    }
    return true;
}

static void stream(struct imgfs *fs, struct control_deferred *d, const uint8_t *data, size_t size)
{
    size_t half = size / 2;
    if (control_receive(fs, d, data, half, 0) == 0)
        control_receive(fs, d, data + half, size - half, half);
    int fd;
    uint64_t staged;
    char *answer;
    control_run_deferred(fs, d, NULL, NULL, &fd, &staged, &answer);
    free(answer);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    size_t first = nl ? (size_t)(nl - data) + 1 : size;
    if (!acceptable(data, first))
        return 0;
    fuzz_reset_state();
    char path[PATH_MAX], err[512];
    snprintf(path, sizeof(path), "%s/state", fuzz_scratch());
    struct mount_options opts = {.state_dir = path};
    struct imgfs fs = {.opts = &opts};
    if (tree_create(NULL, 2, &fs.tree) != 0 || vm_registry_open(path, no_base, NULL, &fs.vms, err, sizeof(err)))
        abort();
    struct control_answer answer;
    if (control_execute(&fs, (const char *)data, first, &answer) == 0) {
        bool streaming = control_receiving(answer.deferred);
        if (streaming)
            stream(&fs, answer.deferred, data + first, size - first);
        control_answer_free(&answer);
        if (!streaming && first < size && acceptable(data + first, size - first) &&
            control_execute(&fs, (const char *)data + first, size - first, &answer) == 0)
            control_answer_free(&answer);
    }
    vm_registry_close(fs.vms);
    tree_destroy(fs.tree);
    return 0;
}
