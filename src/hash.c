#include "hash.h"

#include <errno.h>
#include <string.h>
#include <xxhash.h>

void chunk_hash_compute(const void *data, size_t len, struct chunk_hash *out)
{
    XXH128_hash_t h = XXH3_128bits(data, len);
    XXH128_canonical_t canonical;
    XXH128_canonicalFromHash(&canonical, h);
    memcpy(out->bytes, canonical.digest, CHUNK_HASH_BYTES);
}

bool chunk_hash_equal(const struct chunk_hash *a, const struct chunk_hash *b)
{
    return memcmp(a->bytes, b->bytes, CHUNK_HASH_BYTES) == 0;
}

void chunk_hash_to_hex(const struct chunk_hash *hash, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < CHUNK_HASH_BYTES; i++) {
        out[2 * i] = digits[hash->bytes[i] >> 4];
        out[2 * i + 1] = digits[hash->bytes[i] & 15];
    }
    out[CHUNK_HASH_HEX] = '\0';
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

int chunk_hash_from_hex(const char *hex, struct chunk_hash *out)
{
    for (int i = 0; i < CHUNK_HASH_BYTES; i++) {
        int hi = hex_value(hex[2 * i]);
        int lo = hi < 0 ? -1 : hex_value(hex[2 * i + 1]);
        if (lo < 0)
            return -EINVAL;
        out->bytes[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}

uint64_t chunk_hash_bucket(const struct chunk_hash *hash)
{
    uint64_t v;
    memcpy(&v, hash->bytes, sizeof(v)); /* the hash is already uniformly mixed */
    return v;
}

bool buffer_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    /* Check a 16-byte head, then compare the buffer with itself shifted by
     * 16: memcmp is vectorised, so this runs at memory speed. */
    size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i])
            return false;
    return len <= 16 || memcmp(p, p + 16, len - 16) == 0;
}
