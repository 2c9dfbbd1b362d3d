/* A stored chunk (chunkfmt.h): header and payload, raw or zstd; decoded with
 * its name check, and unpacked without it (as a signed chunk is). */
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
    chunkfmt_unpack(data, size, out, CHUNK); /* the path of a chunk with a signed digest */
    return 0;
}
