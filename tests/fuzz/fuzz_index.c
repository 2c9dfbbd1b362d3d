/* A repository index (repo.h), signed or not, and its signature lines
 * checked against a fixed keyring. */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "repo.h"
#include "sign.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct sign_keyring ring;
    if (!ring.count) {
        sign_init();
        ring.count = 1;
        memset(ring.keys[0].bytes, 0x42, sizeof(ring.keys[0].bytes));
    }
    struct repo_index index;
    if (repo_index_parse((const char *)data, size, &index) == 0) {
        for (size_t i = 0; i < index.count; i++)
            if (index.entries[i].latest == 0 || index.entries[i].latest > REPO_MAX_VERSION)
                abort(); /* the bounds hold for whatever parses */
        repo_index_free(&index);
    }
    size_t body;
    char err[256];
    sign_verify(&ring, (const char *)data, size, &body, err, sizeof(err));
    return 0;
}
