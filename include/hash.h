/* hash: chunk names. A chunk is named by the xxh3-128 hash of its
 * uncompressed bytes, written as 32 lower-case hex digits.
 *
 * Contract: pure functions, thread-safe, no allocation.
 */
#ifndef IMGFS_HASH_H
#define IMGFS_HASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define CHUNK_HASH_BYTES 16
#define CHUNK_HASH_HEX 32

struct chunk_hash {
    uint8_t bytes[CHUNK_HASH_BYTES];
};

void chunk_hash_compute(const void *data, size_t len, struct chunk_hash *out);
bool chunk_hash_equal(const struct chunk_hash *a, const struct chunk_hash *b);
/* Writes 32 hex digits and a NUL into out[CHUNK_HASH_HEX + 1]. */
void chunk_hash_to_hex(const struct chunk_hash *hash, char *out);
/* Parses exactly 32 hex digits; -EINVAL otherwise. */
int chunk_hash_from_hex(const char *hex, struct chunk_hash *out);
/* The all-zero hash value is reserved to mean "this chunk is all zeros".
 * Inline: a status read tests every chunk of every version. */
static inline bool chunk_hash_is_null(const struct chunk_hash *hash)
{
    uint64_t lo, hi;
    memcpy(&lo, hash->bytes, sizeof(lo));
    memcpy(&hi, hash->bytes + sizeof(lo), sizeof(hi));
    return (lo | hi) == 0;
}
/* A well-mixed 64-bit value for hash tables. */
uint64_t chunk_hash_bucket(const struct chunk_hash *hash);

/* True when every byte of buf is zero; fast for large buffers. */
bool buffer_is_zero(const void *buf, size_t len);

#endif
