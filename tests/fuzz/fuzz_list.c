/* A prefetch list (list.h), signed or not. */
#include <stdlib.h>

#include "fuzz.h"
#include "list.h"
#include "sign.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct chunk_list *list = NULL;
    char err[256];
    size_t body = sign_body_len((const char *)data, size, NULL);
    if (list_parse((const char *)data, body, &list, err, sizeof(err)) == 0) {
        if (list->count > MANIFEST_MAX_CHUNKS)
            abort();
        list_free(list);
    }
    return 0;
}
