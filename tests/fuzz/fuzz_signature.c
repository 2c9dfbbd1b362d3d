/* The signature side: trust files (keyrings), signature lines and the
 * digests record of a version (digests.h). The first byte picks which. */
#include <stdlib.h>
#include <string.h>

#include "digests.h"
#include "fuzz.h"
#include "sign.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    sign_init();
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    char err[256];
    static struct sign_keyring ring;
    size_t body;
    struct version_digests *d = NULL;
    switch (data[0] % 3) {
    case 0:
        if (sign_keyring_parse(text, len, &ring, err, sizeof(err)) == 0 &&
            (ring.count == 0 || ring.count > SIGN_MAX_KEYS))
            abort();
        break;
    case 1:
        ring.count = 1;
        memset(ring.keys[0].bytes, 7, sizeof(ring.keys[0].bytes));
        if (sign_body_len(text, len, NULL) > len)
            abort();
        sign_verify(&ring, text, len, &body, err, sizeof(err));
        break;
    default:
        if (digests_parse(text, len, &d, err, sizeof(err)) == 0) {
            char *out;
            size_t out_len;
            if (digests_format(d, &out, &out_len) == 0) {
                if (out_len != len || memcmp(out, text, len) != 0)
                    abort();
                free(out);
            }
            digests_free(d);
        }
    }
    return 0;
}
