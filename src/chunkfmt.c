#include "chunkfmt.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

size_t chunkfmt_bound(size_t data_len)
{
    size_t z = ZSTD_compressBound(data_len);
    return CHUNKFMT_HEADER_LEN + (z > data_len ? z : data_len);
}

struct chunkfmt_encoder {
    ZSTD_CCtx *zstd;
    int level;
};

struct chunkfmt_encoder *chunkfmt_encoder_new(int level)
{
    struct chunkfmt_encoder *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->level = level;
    if (level > 0 && !(e->zstd = ZSTD_createCCtx())) {
        free(e);
        return NULL;
    }
    return e;
}

void chunkfmt_encoder_free(struct chunkfmt_encoder *e)
{
    if (e)
        ZSTD_freeCCtx(e->zstd);
    free(e);
}

/* zstd through ctx when given (the same bytes as ZSTD_compress). */
static long encode(ZSTD_CCtx *ctx, const void *data, size_t data_len, int level, void *out, size_t out_cap)
{
    if (data_len > UINT32_MAX || out_cap < chunkfmt_bound(data_len))
        return -EINVAL;
    uint8_t *hdr = out;
    uint8_t *payload = hdr + CHUNKFMT_HEADER_LEN;
    size_t payload_len = data_len;
    uint8_t format = CHUNKFMT_RAW;
    if (level > 0) {
        size_t z = ctx ? ZSTD_compressCCtx(ctx, payload, out_cap - CHUNKFMT_HEADER_LEN, data, data_len, level)
                       : ZSTD_compress(payload, out_cap - CHUNKFMT_HEADER_LEN, data, data_len, level);
        if (!ZSTD_isError(z) && z <= data_len - data_len / 16) {
            format = CHUNKFMT_ZSTD;
            payload_len = z;
        }
    }
    if (format == CHUNKFMT_RAW)
        memcpy(payload, data, data_len);
    memcpy(hdr, "IMGC", 4);
    hdr[4] = format;
    hdr[5] = hdr[6] = hdr[7] = 0;
    put_u32(hdr + 8, (uint32_t)data_len);
    put_u32(hdr + 12, (uint32_t)payload_len);
    return (long)(CHUNKFMT_HEADER_LEN + payload_len);
}

long chunkfmt_encode(const void *data, size_t data_len, int level, void *out, size_t out_cap)
{
    return encode(NULL, data, data_len, level, out, out_cap);
}

long chunkfmt_encode_with(struct chunkfmt_encoder *e, const void *data, size_t data_len, void *out,
                          size_t out_cap)
{
    return encode(e->zstd, data, data_len, e->level, out, out_cap);
}

const void *chunkfmt_raw_payload(const void *enc, size_t enc_len, size_t expected_len)
{
    const uint8_t *hdr = enc;
    if (enc_len != CHUNKFMT_HEADER_LEN + expected_len || memcmp(hdr, "IMGC", 4) != 0 || hdr[4] != CHUNKFMT_RAW ||
        hdr[5] || hdr[6] || hdr[7] || get_u32(hdr + 8) != expected_len || get_u32(hdr + 12) != expected_len)
        return NULL;
    return hdr + CHUNKFMT_HEADER_LEN;
}

int chunkfmt_unpack(const void *enc, size_t enc_len, void *out, size_t expected_len)
{
    const uint8_t *hdr = enc;
    if (enc_len < CHUNKFMT_HEADER_LEN || memcmp(hdr, "IMGC", 4) != 0 || hdr[5] || hdr[6] || hdr[7])
        return -EBADMSG;
    uint32_t data_len = get_u32(hdr + 8);
    uint32_t payload_len = get_u32(hdr + 12);
    if (data_len != expected_len || payload_len != enc_len - CHUNKFMT_HEADER_LEN)
        return -EBADMSG;
    const uint8_t *payload = hdr + CHUNKFMT_HEADER_LEN;
    if (hdr[4] == CHUNKFMT_RAW) {
        if (payload_len != data_len)
            return -EBADMSG;
        memcpy(out, payload, data_len);
    } else if (hdr[4] == CHUNKFMT_ZSTD) {
        size_t n = ZSTD_decompress(out, expected_len, payload, payload_len);
        if (ZSTD_isError(n) || n != expected_len)
            return -EBADMSG;
    } else {
        return -EBADMSG;
    }
    return 0;
}

int chunkfmt_decode(const void *enc, size_t enc_len, void *out, size_t expected_len,
                    const struct chunk_hash *want)
{
    int rc = chunkfmt_unpack(enc, enc_len, out, expected_len);
    if (rc)
        return rc;
    struct chunk_hash got;
    chunk_hash_compute(out, expected_len, &got);
    return chunk_hash_equal(&got, want) ? 0 : -EBADMSG;
}
