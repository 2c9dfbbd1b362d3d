/* An export file (vm export, vm.h) given to vm import. */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz.h"
#include "state.h"
#include "util.h"
#include "vm.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_reset_state();
    char path[PATH_MAX], in[PATH_MAX], err[512];
    snprintf(in, sizeof(in), "%s/in.export", fuzz_scratch());
    int fd = open(in, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write_full(fd, data, size) != 0)
        abort();
    close(fd);
    snprintf(path, sizeof(path), "%s/state", fuzz_scratch());
    struct vm_registry *reg;
    if (vm_registry_open(path, no_base, NULL, &reg, err, sizeof(err)) != 0)
        abort();
    struct vm *vm;
    if ((fd = open(in, O_RDONLY | O_CLOEXEC)) < 0)
        abort();
    if (vm_import(reg, fd, "imported", NULL, NULL, &vm, err, sizeof(err)) == 0)
        vm_remove(reg, vm, err, sizeof(err));
    close(fd);
    vm_registry_close(reg);
    return 0;
}
