/* A VM file (STATE/vms/VM.vm, vm.h) as damage or a hostile hand might leave
 * it, loaded by vm_registry_open. */
#include <fcntl.h>
#include <string.h>

#include "fuzz.h"
#include "state.h"
#include "util.h"
#include "vm.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_reset_state();
    char path[PATH_MAX], err[512];
    snprintf(path, sizeof(path), "%s/state/vms", fuzz_scratch());
    if (mkdir_p(path) != 0)
        abort();
    snprintf(path, sizeof(path), "%s/state/vms/f.vm", fuzz_scratch());
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write_full(fd, data, size) != 0)
        abort();
    close(fd);
    snprintf(path, sizeof(path), "%s/state", fuzz_scratch());
    struct vm_registry *reg;
    if (vm_registry_open(path, no_base, NULL, &reg, err, sizeof(err)) == 0)
        vm_registry_close(reg);
    return 0;
}
