/* A stored chunk (chunkfmt.h): header and payload, raw or zstd. */
#include <stdlib.h>

#include "chunkfmt.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    enum { CHUNK = 16384 };
    static char out[CHUNK];
    struct chunk_hash want = {{0}};
    if (size >= 16)
        chunk_hash_compute(data + 16, size - 16, &want); /* sometimes right for raw chunks */
    chunkfmt_decode(data, size, out, CHUNK, &want);
    chunkfmt_decode(data, size, out, 4096, &want);
    return 0;
}
