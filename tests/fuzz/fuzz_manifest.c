/* Manifest text (manifest.h) as a hostile repository would serve it. */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "manifest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct manifest *m = NULL;
    char err[256];
    if (manifest_parse((const char *)data, size, &m, err, sizeof(err)) == 0) {
        char *text;
        size_t len;
        /* What parses formats back to the same bytes. */
        if (manifest_format(m, &text, &len) == 0) {
            if (len != size || memcmp(text, data, size) != 0)
                abort();
            free(text);
        }
        manifest_free(m);
    }
    return 0;
}
