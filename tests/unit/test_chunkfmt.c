/* Unit tests for chunkfmt.c: encode/decode roundtrips, the choice between
 * raw and zstd, and that every kind of damage decodes to -EBADMSG without
 * writing outside the output buffer (buffers are exact-size mallocs so that
 * ASan sees any overrun). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "chunkfmt.h"
#include "hash.h"

#define N (256u * 1024)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void)
{
    /* xorshift64*: deterministic, so failures reproduce. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        abort();
    return p;
}

static void fill_random(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(rng() >> 56);
}

static void fill_text(unsigned char *p, size_t n)
{
    static const char words[] = "the quick brown fox jumps over the lazy dog; ";
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)words[(i + i / 4096) % (sizeof(words) - 1)];
}

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* Encodes data into an exact-size copy. Returns it, or NULL. */
static unsigned char *encode(const unsigned char *data, size_t len, int level, size_t *enc_len)
{
    size_t cap = chunkfmt_bound(len);
    unsigned char *buf = xmalloc(cap);
    long n = chunkfmt_encode(data, len, level, buf, cap);
    if (n < CHUNKFMT_HEADER_LEN || (size_t)n > cap) {
        free(buf);
        return NULL;
    }
    unsigned char *exact = xmalloc((size_t)n);
    memcpy(exact, buf, (size_t)n);
    free(buf);
    *enc_len = (size_t)n;
    return exact;
}

/* Decodes enc (copied to an exact-size buffer) into an exact-size output. */
static int decode(const unsigned char *enc, size_t enc_len, size_t expected_len, const struct chunk_hash *want,
                  unsigned char **out_data)
{
    unsigned char *in = xmalloc(enc_len);
    memcpy(in, enc, enc_len);
    unsigned char *out = xmalloc(expected_len);
    int rc = chunkfmt_decode(in, enc_len, out, expected_len, want);
    free(in);
    if (out_data)
        *out_data = out;
    else
        free(out);
    return rc;
}

/* Roundtrip of data at level; returns the format byte chosen, or -1. */
static int roundtrip(const unsigned char *data, size_t len, int level, size_t *enc_len_out)
{
    struct chunk_hash h;
    chunk_hash_compute(data, len, &h);
    size_t enc_len = 0;
    unsigned char *enc = encode(data, len, level, &enc_len);
    CHECK(enc != NULL);
    if (!enc)
        return -1;
    CHECK(memcmp(enc, "IMGC", 4) == 0);
    CHECK(enc[5] == 0 && enc[6] == 0 && enc[7] == 0);
    CHECK(get_u32(enc + 8) == len);
    CHECK(get_u32(enc + 12) == enc_len - CHUNKFMT_HEADER_LEN);
    CHECK(enc_len <= len + CHUNKFMT_MAX_OVERHEAD);
    unsigned char *out = NULL;
    CHECK(decode(enc, enc_len, len, &h, &out) == 0);
    CHECK(len == 0 || memcmp(out, data, len) == 0);
    free(out);
    int format = enc[4];
    free(enc);
    if (enc_len_out)
        *enc_len_out = enc_len;
    return format;
}

static void test_roundtrips(void)
{
    unsigned char *text = xmalloc(N);
    unsigned char *rnd = xmalloc(N);
    fill_text(text, N);
    fill_random(rnd, N);
    size_t enc_len = 0;

    CHECK(roundtrip(text, N, 3, &enc_len) == CHUNKFMT_ZSTD);
    CHECK(enc_len < N / 4);
    CHECK(roundtrip(text, N, 1, NULL) == CHUNKFMT_ZSTD);
    CHECK(roundtrip(text, N, 19, NULL) == CHUNKFMT_ZSTD);
    CHECK(roundtrip(rnd, N, 3, &enc_len) == CHUNKFMT_RAW);
    CHECK(enc_len == N + CHUNKFMT_HEADER_LEN);
    CHECK(roundtrip(text, N, 0, &enc_len) == CHUNKFMT_RAW); /* level 0: never compress */
    CHECK(enc_len == N + CHUNKFMT_HEADER_LEN);

    /* Compression that saves less than 1/16 is not worth it: 1/32 of the
     * chunk compressible, the rest random, must be stored raw. */
    unsigned char *mixed = xmalloc(N);
    fill_random(mixed, N);
    memset(mixed, 0, N / 32);
    CHECK(roundtrip(mixed, N, 3, NULL) == CHUNKFMT_RAW);
    /* Half zeros saves plenty. */
    memset(mixed, 0, N / 2);
    CHECK(roundtrip(mixed, N, 3, NULL) == CHUNKFMT_ZSTD);
    free(mixed);

    /* All zeros, and other sizes. */
    unsigned char *zeros = calloc(1, N);
    CHECK(roundtrip(zeros, N, 3, NULL) == CHUNKFMT_ZSTD);
    free(zeros);
    CHECK(roundtrip(text, 4096, 3, NULL) == CHUNKFMT_ZSTD);
    CHECK(roundtrip(rnd, 4096, 3, NULL) == CHUNKFMT_RAW);
    CHECK(roundtrip(rnd, 1, 3, NULL) == CHUNKFMT_RAW);
    CHECK(roundtrip(text, 17, 3, NULL) == CHUNKFMT_RAW); /* too small to gain */
    CHECK(roundtrip(rnd, 0, 3, NULL) == CHUNKFMT_RAW);

    /* A too-small output capacity is refused, not overrun. */
    size_t cap = chunkfmt_bound(N) - 1;
    unsigned char *small = xmalloc(cap);
    CHECK(chunkfmt_encode(text, N, 3, small, cap) < 0);
    CHECK(chunkfmt_encode(rnd, N, 0, small, cap) < 0);
    free(small);
    CHECK(chunkfmt_bound(N) >= N + CHUNKFMT_HEADER_LEN);

    free(text);
    free(rnd);
}

/* Every kind of damage to one encoded chunk. strict: any payload flip must
 * fail (raw). For zstd a flip may in theory still decode to the same bytes;
 * then the output must be exactly the original. */
static void test_damage(const unsigned char *data, size_t len, int level, int want_format)
{
    struct chunk_hash h;
    chunk_hash_compute(data, len, &h);
    size_t enc_len = 0;
    unsigned char *enc = encode(data, len, level, &enc_len);
    CHECK(enc != NULL);
    if (!enc)
        return;
    CHECK(enc[4] == want_format);
    unsigned char *work = xmalloc(enc_len);
    int bad;

    /* Wrong expected hash: every bit of it matters. */
    bad = 0;
    for (int byte = 0; byte < CHUNK_HASH_BYTES; byte++) {
        struct chunk_hash wrong = h;
        wrong.bytes[byte] ^= 0x10;
        bad += decode(enc, enc_len, len, &wrong, NULL) != -EBADMSG;
    }
    struct chunk_hash null_hash;
    memset(&null_hash, 0, sizeof(null_hash));
    bad += decode(enc, enc_len, len, &null_hash, NULL) != -EBADMSG;
    CHECK(bad == 0);
    /* unpack checks no hash (its caller checks a signed digest), but all the rest. */
    unsigned char *unpacked = xmalloc(len);
    CHECK(chunkfmt_unpack(enc, enc_len, unpacked, len) == 0 && memcmp(unpacked, data, len) == 0);
    CHECK(chunkfmt_unpack(enc, enc_len, unpacked, len + 1) == -EBADMSG);
    free(unpacked);

    /* Every truncation. Near both ends (and everywhere for small chunks)
     * the input is an exact-size copy; in the middle of a big chunk it is
     * the original buffer, to keep the test fast. */
    bad = 0;
    unsigned char *out_once = xmalloc(len);
    for (size_t n = 0; n < enc_len; n++) {
        int rc;
        if (enc_len <= 16384 || n < 256 || n + 256 > enc_len)
            rc = decode(enc, n, len, &h, NULL);
        else
            rc = chunkfmt_decode(enc, n, out_once, len, &h);
        if (rc == -EBADMSG && (enc_len <= 16384 || n < 256 || n + 256 > enc_len))
            rc = chunkfmt_unpack(enc, n, out_once, len);
        if (rc != -EBADMSG && bad++ < 3)
            fprintf(stderr, "truncation to %zu of %zu: rc=%d\n", n, enc_len, rc);
    }
    free(out_once);
    CHECK(bad == 0);

    /* Extra bytes after the payload. */
    {
        unsigned char *longer = xmalloc(enc_len + 1);
        memcpy(longer, enc, enc_len);
        longer[enc_len] = 0;
        CHECK(decode(longer, enc_len + 1, len, &h, NULL) == -EBADMSG);
        free(longer);
    }

    /* Every header byte, several ways. */
    bad = 0;
    for (size_t pos = 0; pos < CHUNKFMT_HEADER_LEN; pos++) {
        static const unsigned char masks[] = {0x01, 0x02, 0x04, 0x10, 0x80, 0xff};
        for (size_t k = 0; k < sizeof(masks); k++) {
            memcpy(work, enc, enc_len);
            work[pos] ^= masks[k];
            int rc = decode(work, enc_len, len, &h, NULL);
            if (rc != -EBADMSG && bad++ < 3)
                fprintf(stderr, "header byte %zu ^%02x: rc=%d\n", pos, masks[k], rc);
        }
    }
    CHECK(bad == 0);

    /* Bad magic, unknown format, reserved bytes. */
    memcpy(work, enc, enc_len);
    memcpy(work, "IMGD", 4);
    CHECK(decode(work, enc_len, len, &h, NULL) == -EBADMSG);
    memcpy(work, enc, enc_len);
    work[4] = 2;
    CHECK(decode(work, enc_len, len, &h, NULL) == -EBADMSG);
    memcpy(work, enc, enc_len);
    work[4] = want_format == CHUNKFMT_RAW ? CHUNKFMT_ZSTD : CHUNKFMT_RAW;
    CHECK(decode(work, enc_len, len, &h, NULL) == -EBADMSG);
    memcpy(work, enc, enc_len);
    work[7] = 1;
    CHECK(decode(work, enc_len, len, &h, NULL) == -EBADMSG);

    /* Wrong length fields. */
    static const int64_t deltas[] = {-1, 1, 4096, -4096};
    for (size_t d = 0; d < sizeof(deltas) / sizeof(deltas[0]); d++) {
        memcpy(work, enc, enc_len);
        put_u32(work + 8, (uint32_t)((int64_t)len + deltas[d]));
        CHECK(decode(work, enc_len, len, &h, NULL) == -EBADMSG);
        memcpy(work, enc, enc_len);
        put_u32(work + 12, (uint32_t)((int64_t)(enc_len - CHUNKFMT_HEADER_LEN) + deltas[d]));
        CHECK(decode(work, enc_len, len, &h, NULL) == -EBADMSG);
    }
    memcpy(work, enc, enc_len);
    put_u32(work + 8, UINT32_MAX);
    CHECK(decode(work, enc_len, len, &h, NULL) == -EBADMSG);
    memcpy(work, enc, enc_len);
    put_u32(work + 12, UINT32_MAX);
    CHECK(decode(work, enc_len, len, &h, NULL) == -EBADMSG);

    /* The caller expects a different length than the chunk has. */
    if (len > 0)
        CHECK(decode(enc, enc_len, len - 1, &h, NULL) == -EBADMSG);
    CHECK(decode(enc, enc_len, len + 1, &h, NULL) == -EBADMSG);

    /* Flipped payload bytes: all of a small payload, a sample of a big one. */
    size_t payload = enc_len - CHUNKFMT_HEADER_LEN;
    size_t step = payload > 8192 ? 1021 : 1;
    bad = 0;
    int same = 0;
    for (size_t pos = 0; pos < payload; pos += step) {
        memcpy(work, enc, enc_len);
        work[CHUNKFMT_HEADER_LEN + pos] ^= 0x01;
        unsigned char *out = NULL;
        int rc = decode(work, enc_len, len, &h, &out);
        if (rc == 0 && want_format == CHUNKFMT_ZSTD && memcmp(out, data, len) == 0) {
            same++; /* the damage did not change the content: harmless */
        } else if (rc != -EBADMSG) {
            if (bad++ < 3)
                fprintf(stderr, "payload byte %zu flipped: rc=%d\n", pos, rc);
        }
        free(out);
    }
    CHECK(bad == 0);
    if (same)
        printf("note: %d zstd payload flips decoded to identical bytes\n", same);

    /* Last payload byte too (the sample may skip it). */
    if (payload > 0) {
        memcpy(work, enc, enc_len);
        work[enc_len - 1] ^= 0x80;
        unsigned char *out = NULL;
        int rc = decode(work, enc_len, len, &h, &out);
        CHECK(rc == -EBADMSG || (want_format == CHUNKFMT_ZSTD && rc == 0 && memcmp(out, data, len) == 0));
        free(out);
    }

    free(work);
    free(enc);
}

/* A zstd frame that decodes to more (or fewer) bytes than the header and
 * the caller say must fail without writing past the output buffer. */
static void test_hostile_zstd(void)
{
    unsigned char *text = xmalloc(2 * N);
    fill_text(text, 2 * N);
    struct chunk_hash h;
    chunk_hash_compute(text, N, &h);

    size_t enc_len = 0;
    unsigned char *big = encode(text, 2 * N, 3, &enc_len);
    CHECK(big && big[4] == CHUNKFMT_ZSTD);
    if (big) {
        put_u32(big + 8, N); /* claims N bytes, decodes to 2N */
        CHECK(decode(big, enc_len, N, &h, NULL) == -EBADMSG);
        free(big);
    }
    unsigned char *small = encode(text, N / 2, 3, &enc_len);
    CHECK(small && small[4] == CHUNKFMT_ZSTD);
    if (small) {
        put_u32(small + 8, N); /* claims N bytes, decodes to N/2 */
        CHECK(decode(small, enc_len, N, &h, NULL) == -EBADMSG);
        free(small);
    }
    /* A raw chunk whose header claims a larger size than its payload. */
    unsigned char *raw = encode(text, N / 2, 0, &enc_len);
    CHECK(raw && raw[4] == CHUNKFMT_RAW);
    if (raw) {
        put_u32(raw + 8, N);
        CHECK(decode(raw, enc_len, N, &h, NULL) == -EBADMSG);
        free(raw);
    }
    /* Right hash, right lengths, but the bytes of another chunk. */
    unsigned char *other = xmalloc(N);
    memcpy(other, text, N);
    other[N / 2] ^= 1;
    unsigned char *enc = encode(other, N, 3, &enc_len);
    CHECK(enc != NULL);
    if (enc) {
        CHECK(decode(enc, enc_len, N, &h, NULL) == -EBADMSG);
        free(enc);
    }
    free(other);
    free(text);
}

/* chunkfmt_raw_payload: the stored bytes of a well-formed raw chunk, in
 * place; NULL for a zstd chunk, another length or any damaged header. */
static void test_raw_payload(const unsigned char *rnd, const unsigned char *text)
{
    size_t cap = chunkfmt_bound(N);
    unsigned char *enc = xmalloc(cap);
    long len = chunkfmt_encode(rnd, N, 3, enc, cap);
    CHECK(len == (long)(N + CHUNKFMT_HEADER_LEN));
    const unsigned char *payload = chunkfmt_raw_payload(enc, (size_t)len, N);
    CHECK(payload == enc + CHUNKFMT_HEADER_LEN);
    CHECK(payload && memcmp(payload, rnd, N) == 0);
    CHECK(chunkfmt_raw_payload(enc, (size_t)len, N - 1) == NULL);     /* another expected length */
    CHECK(chunkfmt_raw_payload(enc, (size_t)len - 1, N) == NULL);     /* cut short */
    CHECK(chunkfmt_raw_payload(enc, CHUNKFMT_HEADER_LEN - 1, 0) == NULL);
    for (size_t i = 0; i < CHUNKFMT_HEADER_LEN; i++) { /* every header byte matters */
        enc[i] ^= 0x40;
        CHECK(chunkfmt_raw_payload(enc, (size_t)len, N) == NULL);
        enc[i] ^= 0x40;
    }
    len = chunkfmt_encode(text, N, 3, enc, cap);
    CHECK(len > 0 && enc[4] == CHUNKFMT_ZSTD);
    CHECK(chunkfmt_raw_payload(enc, (size_t)len, N) == NULL);
    free(enc);
}

int main(void)
{
    test_roundtrips();

    unsigned char *text = xmalloc(N);
    unsigned char *rnd = xmalloc(N);
    fill_text(text, N);
    fill_random(rnd, N);
    test_damage(text, N, 3, CHUNKFMT_ZSTD);
    test_damage(rnd, N, 3, CHUNKFMT_RAW);
    test_damage(text, N, 0, CHUNKFMT_RAW);
    test_damage(rnd, 4096, 3, CHUNKFMT_RAW);
    test_damage(text, 4096, 3, CHUNKFMT_ZSTD);
    test_raw_payload(rnd, text);
    free(text);
    free(rnd);

    test_hostile_zstd();
    return check_summary();
}
