/* Unit tests for manifest.c: format/parse roundtrip, and that truncated,
 * edited or malformed manifests are refused with -EBADMSG and a message. */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "hash.h"
#include "manifest.h"

#define CS 262144u

static int manifests_equal(const struct manifest *a, const struct manifest *b)
{
    if (strcmp(a->name, b->name) || a->version != b->version || a->size != b->size ||
        a->chunk_size != b->chunk_size || a->created != b->created || strcmp(a->source, b->source) ||
        a->chunk_count != b->chunk_count)
        return 0;
    for (uint64_t i = 0; i < a->chunk_count; i++)
        if (!chunk_hash_equal(&a->chunks[i], &b->chunks[i]))
            return 0;
    return 1;
}

/* Parses len bytes from an exact-size heap copy, so that ASan catches any
 * read past the end. Returns the parse result; *out is set on success. */
static int parse_copy(const char *text, size_t len, struct manifest **out, char *err, size_t errlen)
{
    char *copy = malloc(len ? len : 1);
    if (!copy)
        abort();
    memcpy(copy, text, len);
    int rc = manifest_parse(copy, len, out, err, errlen);
    free(copy);
    return rc;
}

/* Appends "end <checksum>\n" to body so that only the content is wrong. */
static char *with_end(const char *body, size_t *len)
{
    size_t blen = strlen(body);
    char *text = malloc(blen + 4 + CHUNK_HASH_HEX + 2);
    if (!text)
        abort();
    memcpy(text, body, blen);
    struct chunk_hash sum;
    chunk_hash_compute(body, blen, &sum);
    char hex[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(&sum, hex);
    *len = blen + (size_t)sprintf(text + blen, "end %s\n", hex);
    return text;
}

/* Expects body (with a correct end line appended) to be refused, with a
 * message that contains topic when topic is not NULL. */
static int body_rejected_because(const char *body, const char *topic)
{
    size_t len;
    char *text = with_end(body, &len);
    char err[256] = "";
    struct manifest *m = NULL;
    int rc = parse_copy(text, len, &m, err, sizeof(err));
    free(text);
    if (rc != -EBADMSG || err[0] == '\0' || (topic && !strstr(err, topic))) {
        fprintf(stderr, "expected rejection (rc=%d err=\"%s\") of:\n%s\n", rc, err, body);
        if (rc == 0)
            manifest_free(m);
        return 0;
    }
    return 1;
}

static int body_rejected(const char *body) { return body_rejected_because(body, NULL); }

static int body_accepted(const char *body)
{
    size_t len;
    char *text = with_end(body, &len);
    char err[256] = "";
    struct manifest *m = NULL;
    int rc = parse_copy(text, len, &m, err, sizeof(err));
    free(text);
    if (rc != 0) {
        fprintf(stderr, "expected acceptance (rc=%d err=\"%s\") of:\n%s\n", rc, err, body);
        return 0;
    }
    manifest_free(m);
    return 1;
}

static struct manifest *sample_manifest(void)
{
    /* 5 full chunks and a partial one: 6 chunks. */
    struct manifest *m = manifest_new(6);
    if (!m)
        abort();
    snprintf(m->name, sizeof(m->name), "debian12");
    m->version = 3;
    m->size = 5ull * CS + 12345;
    m->chunk_size = CS;
    m->created = 1790000000;
    snprintf(m->source, sizeof(m->source), "debian12.qcow2 qcow2");
    for (uint64_t i = 0; i < m->chunk_count; i++) {
        if (i == 1 || i == 4)
            continue; /* all-zero chunks */
        char seed[32];
        snprintf(seed, sizeof(seed), "chunk %" PRIu64, i);
        chunk_hash_compute(seed, strlen(seed), &m->chunks[i]);
    }
    return m;
}

static void test_roundtrip(struct manifest *m, char **text_out, size_t *len_out)
{
    char *text = NULL;
    size_t len = 0;
    CHECK(manifest_format(m, &text, &len) == 0);
    CHECK(text != NULL && len > 0);
    *text_out = text;
    *len_out = len;
    if (!text)
        return;
    CHECK(text[len - 1] == '\n');
    CHECK(strncmp(text, "imgfs-manifest 1\nname debian12\nversion 3\n", 41) == 0);

    /* Formatting is deterministic. */
    char *again = NULL;
    size_t again_len = 0;
    CHECK(manifest_format(m, &again, &again_len) == 0);
    CHECK(again && again_len == len && memcmp(again, text, len) == 0);
    free(again);

    struct manifest *p = NULL;
    char err[256] = "";
    CHECK(parse_copy(text, len, &p, err, sizeof(err)) == 0);
    if (!p) {
        fprintf(stderr, "parse failed: %s\n", err);
        return;
    }
    CHECK(manifests_equal(m, p));
    CHECK(chunk_hash_is_null(&p->chunks[1]) && chunk_hash_is_null(&p->chunks[4]));
    CHECK(!chunk_hash_is_null(&p->chunks[0]) && !chunk_hash_is_null(&p->chunks[5]));
    struct chunk_hash id;
    chunk_hash_compute(text, len, &id);
    CHECK(chunk_hash_equal(&p->id, &id)); /* id is the hash of the whole file */

    /* The id is stable across parses, and a re-format is byte-identical. */
    struct manifest *q = NULL;
    CHECK(manifest_parse(text, len, &q, NULL, 0) == 0);
    if (q) {
        CHECK(chunk_hash_equal(&p->id, &q->id));
        CHECK(manifests_equal(p, q));
        manifest_free(q);
    }
    char *text2 = NULL;
    size_t len2 = 0;
    CHECK(manifest_format(p, &text2, &len2) == 0);
    CHECK(text2 && len2 == len && memcmp(text2, text, len) == 0);
    free(text2);

    /* A different manifest has a different id. */
    m->version = 4;
    CHECK(manifest_format(m, &text2, &len2) == 0);
    q = NULL;
    CHECK(text2 && manifest_parse(text2, len2, &q, NULL, 0) == 0);
    CHECK(q && !chunk_hash_equal(&q->id, &p->id) && q->version == 4);
    manifest_free(q);
    free(text2);
    m->version = 3;
    manifest_free(p);
}

static void test_truncations(const char *text, size_t len)
{
    int bad = 0;
    for (size_t n = 0; n < len; n++) {
        struct manifest *m = NULL;
        char err[256] = "";
        int rc = parse_copy(text, n, &m, err, sizeof(err));
        if (rc != -EBADMSG || m != NULL || err[0] == '\0') {
            if (bad++ < 5)
                fprintf(stderr, "truncation to %zu bytes: rc=%d err=\"%s\"\n", n, rc, err);
            if (rc == 0)
                manifest_free(m);
        }
    }
    CHECK(bad == 0);
}

static void test_byte_flips(const char *text, size_t len, const struct manifest *orig)
{
    static const unsigned char masks[] = {0x01, 0x02, 0x20, 0x40, 0x80, 0xff};
    char *copy = malloc(len);
    if (!copy)
        abort();
    int bad = 0, accepted = 0;
    for (size_t pos = 0; pos < len; pos++) {
        for (size_t k = 0; k < sizeof(masks); k++) {
            memcpy(copy, text, len);
            copy[pos] = (char)(copy[pos] ^ masks[k]);
            struct manifest *m = NULL;
            char err[256] = "";
            int rc = manifest_parse(copy, len, &m, err, sizeof(err));
            if (rc == 0) {
                /* Still parses: it must then mean exactly the same. */
                accepted++;
                if (!m || !manifests_equal(m, orig)) {
                    if (bad++ < 5)
                        fprintf(stderr, "flip of byte %zu (^%02x) parsed to a different manifest\n", pos,
                                masks[k]);
                }
                manifest_free(m);
            } else if (rc != -EBADMSG || err[0] == '\0') {
                if (bad++ < 5)
                    fprintf(stderr, "flip of byte %zu: rc=%d err=\"%s\"\n", pos, rc, err);
            }
        }
        /* Also replace the byte with NUL. */
        memcpy(copy, text, len);
        copy[pos] = '\0';
        struct manifest *m = NULL;
        if (manifest_parse(copy, len, &m, NULL, 0) != -EBADMSG) {
            if (bad++ < 5)
                fprintf(stderr, "NUL at byte %zu was accepted\n", pos);
            manifest_free(m);
        }
    }
    free(copy);
    CHECK(bad == 0);
    if (accepted)
        printf("note: %d byte flips still parsed (to identical content)\n", accepted);
}

#define HDR(size, cs, chunks) \
    "imgfs-manifest 1\nname deb\nversion 1\nsize " size "\nchunk-size " cs "\ncreated 0\nsource x raw\nchunks " chunks "\n"
#define H1 "00112233445566778899aabbccddeeff\n"

static void test_malformed(const char *good_text, size_t good_len)
{
    /* Sanity: the hand-written form is accepted, so rejections below are
     * about the one thing that is wrong. */
    CHECK(body_accepted(HDR("262144", "262144", "1") H1));
    CHECK(body_accepted(HDR("262145", "262144", "2") H1 "0\n"));
    CHECK(body_accepted(HDR("4096", "4096", "1") "0\n"));
    CHECK(body_accepted(HDR("16777216", "16777216", "1") H1));

    /* Chunk count does not match size. */
    CHECK(body_rejected(HDR("262145", "262144", "1") H1));
    CHECK(body_rejected(HDR("262144", "262144", "2") H1 H1));
    CHECK(body_rejected(HDR("262144", "262144", "0")));
    /* Fewer or more chunk lines than announced. */
    CHECK(body_rejected(HDR("524288", "262144", "2") H1));
    CHECK(body_rejected(HDR("262144", "262144", "1") H1 H1));
    /* Chunk size not a power of two, or out of range. */
    CHECK(body_rejected(HDR("300000", "300000", "1") H1));
    CHECK(body_rejected(HDR("262144", "196608", "2") H1 H1));
    CHECK(body_rejected(HDR("2048", "2048", "1") H1));
    CHECK(body_rejected(HDR("33554432", "33554432", "1") H1));
    CHECK(body_rejected(HDR("262144", "0", "1") H1));
    /* Absurd sizes: above 1 PiB, zero, negative, overflowing. The message
     * must name the size (not some later symptom). */
    CHECK(body_rejected_because(HDR("1125899906842625", "16777216", "67108865") H1, "size"));
    CHECK(body_rejected_because(HDR("18446744073709551615", "16777216", "1099511627776") H1, "size"));
    CHECK(body_rejected_because(HDR("2251799813685248", "4096", "549755813888") H1, "size"));
    CHECK(body_rejected(HDR("99999999999999999999999", "262144", "1") H1));
    CHECK(body_rejected(HDR("0", "262144", "0")));
    CHECK(body_rejected(HDR("-1", "262144", "1") H1));
    /* A huge (but in-range) disk must be refused without trying to
     * allocate 64 Mi hashes: more chunks than a manifest may have. */
    CHECK(body_rejected_because(HDR("1125899906842624", "16777216", "67108864") H1, "more than"));
    /* 2^38 chunks would need 4 TiB of hashes: refused by the bound, never
     * attempted (an attempt fails as "out of memory", or aborts under ASan). */
    CHECK(body_rejected_because(HDR("1125899906842624", "4096", "274877906944") H1, "more than"));
    /* Within the bound but with the chunk lines missing: refused from the
     * text length before allocating. */
    CHECK(body_rejected_because(HDR("1099511627776", "131072", "8388608") H1, "truncated"));
    /* Bad fields. */
    CHECK(body_rejected("imgfs-manifest 2\nname deb\nversion 1\nsize 4096\nchunk-size 4096\ncreated 0\n"
                        "source x raw\nchunks 1\n0\n"));
    CHECK(body_rejected("imgfs-manifest 1\nname ../x\nversion 1\nsize 4096\nchunk-size 4096\ncreated 0\n"
                        "source x raw\nchunks 1\n0\n"));
    CHECK(body_rejected("imgfs-manifest 1\nname \nversion 1\nsize 4096\nchunk-size 4096\ncreated 0\n"
                        "source x raw\nchunks 1\n0\n"));
    CHECK(body_rejected("imgfs-manifest 1\nname deb\nversion 0\nsize 4096\nchunk-size 4096\ncreated 0\n"
                        "source x raw\nchunks 1\n0\n"));
    CHECK(body_rejected("imgfs-manifest 1\nname deb\nversion x\nsize 4096\nchunk-size 4096\ncreated 0\n"
                        "source x raw\nchunks 1\n0\n"));
    CHECK(body_rejected("imgfs-manifest 1\nname deb\nversion 1\nsize 4096\nchunk-size 4096\n"
                        "source x raw\nchunks 1\n0\n")); /* no created line */
    CHECK(body_rejected("imgfs-manifest 1\nname deb\nversion 1\nchunk-size 4096\nsize 4096\ncreated 0\n"
                        "source x raw\nchunks 1\n0\n")); /* lines out of order */
    CHECK(body_rejected("imgfs-manifest 1\r\nname deb\r\nversion 1\r\nsize 4096\r\nchunk-size 4096\r\n"
                        "created 0\r\nsource x raw\r\nchunks 1\r\n0\r\n")); /* CRLF */
    /* Chunk lines: upper case, short, long, explicit null hash, junk. */
    CHECK(body_rejected(HDR("262144", "262144", "1") "00112233445566778899AABBCCDDEEFF\n"));
    CHECK(body_rejected(HDR("262144", "262144", "1") "00112233445566778899aabbccddeef\n"));
    CHECK(body_rejected(HDR("262144", "262144", "1") "00112233445566778899aabbccddeeff0\n"));
    CHECK(body_rejected(HDR("262144", "262144", "1") "00000000000000000000000000000000\n"));
    CHECK(body_rejected(HDR("262144", "262144", "1") "00\n"));
    CHECK(body_rejected(HDR("262144", "262144", "1") "\n"));
    CHECK(body_rejected(HDR("262144", "262144", "1") "0 \n"));
    CHECK(body_rejected(HDR("262144", "262144", "1") "g0112233445566778899aabbccddeeff\n"));

    /* Missing end line. */
    {
        const char body[] = HDR("262144", "262144", "1") H1;
        struct manifest *m = NULL;
        char err[256] = "";
        CHECK(parse_copy(body, strlen(body), &m, err, sizeof(err)) == -EBADMSG && m == NULL && err[0]);
    }
    /* End line with a wrong checksum, upper-case checksum, or no newline. */
    {
        size_t len;
        char *text = with_end(HDR("262144", "262144", "1") H1, &len);
        char err[256] = "";
        struct manifest *m = NULL;
        text[len - 2] = text[len - 2] == '0' ? '1' : '0';
        CHECK(parse_copy(text, len, &m, err, sizeof(err)) == -EBADMSG && err[0]);
        free(text);

        text = with_end(HDR("262144", "262144", "1") H1, &len);
        int letters = 0;
        for (size_t i = len - 1 - CHUNK_HASH_HEX; i < len - 1; i++)
            if (text[i] >= 'a' && text[i] <= 'f') {
                text[i] = (char)(text[i] - 'a' + 'A');
                letters++;
            }
        if (letters) /* upper-case hex is not the canonical form */
            CHECK(parse_copy(text, len, &m, err, sizeof(err)) == -EBADMSG);
        free(text);

        text = with_end(HDR("262144", "262144", "1") H1, &len);
        CHECK(parse_copy(text, len - 1, &m, err, sizeof(err)) == -EBADMSG);
        free(text);
    }
    /* Trailing garbage after a good manifest. */
    {
        const char *tails[] = {"x", "\n", "end 00\n", " ", "\0"};
        for (size_t t = 0; t < sizeof(tails) / sizeof(tails[0]); t++) {
            size_t tlen = t == 4 ? 1 : strlen(tails[t]);
            char *text = malloc(good_len + tlen);
            if (!text)
                abort();
            memcpy(text, good_text, good_len);
            memcpy(text + good_len, tails[t], tlen);
            struct manifest *m = NULL;
            char err[256] = "";
            int rc = parse_copy(text, good_len + tlen, &m, err, sizeof(err));
            CHECK(rc == -EBADMSG && m == NULL && err[0]);
            if (rc == 0)
                manifest_free(m);
            free(text);
        }
    }
    /* Two manifests concatenated. */
    {
        char *text = malloc(2 * good_len);
        if (!text)
            abort();
        memcpy(text, good_text, good_len);
        memcpy(text + good_len, good_text, good_len);
        struct manifest *m = NULL;
        CHECK(parse_copy(text, 2 * good_len, &m, NULL, 0) == -EBADMSG);
        free(text);
    }
    /* A tiny error buffer is respected (and still NUL-terminated). */
    {
        char err[8];
        memset(err, 'x', sizeof(err));
        struct manifest *m = NULL;
        CHECK(parse_copy("garbage\n", 8, &m, err, 4) == -EBADMSG);
        CHECK(memchr(err, '\0', 4) != NULL && err[4] == 'x');
    }
    /* Empty and non-manifest inputs. */
    {
        struct manifest *m = NULL;
        char err[256] = "";
        CHECK(parse_copy("", 0, &m, err, sizeof(err)) == -EBADMSG && err[0]);
        CHECK(parse_copy("\n\n\n", 3, &m, NULL, 0) == -EBADMSG);
        CHECK(parse_copy("imgfs-manifest 1", 16, &m, NULL, 0) == -EBADMSG);
    }
}

static void test_helpers(void)
{
    CHECK(manifest_chunk_size_valid(4096));
    CHECK(manifest_chunk_size_valid(262144));
    CHECK(manifest_chunk_size_valid(16u << 20));
    CHECK(!manifest_chunk_size_valid(2048));
    CHECK(!manifest_chunk_size_valid(32u << 20));
    CHECK(!manifest_chunk_size_valid(0));
    CHECK(!manifest_chunk_size_valid(300000));
    CHECK(!manifest_chunk_size_valid(1ull << 32));
    CHECK(!manifest_chunk_size_valid((1ull << 32) + 4096));

    struct manifest *m = manifest_new(0);
    CHECK(m && m->chunk_count == 0);
    manifest_free(m);
    manifest_free(NULL);
    m = manifest_new(3);
    CHECK(m && m->chunk_count == 3 && chunk_hash_is_null(&m->chunks[2]));
    manifest_free(m);
}

int main(void)
{
    test_helpers();
    struct manifest *m = sample_manifest();
    char *text = NULL;
    size_t len = 0;
    test_roundtrip(m, &text, &len);
    if (text) {
        test_truncations(text, len);
        test_byte_flips(text, len, m);
        test_malformed(text, len);
        free(text);
    }
    manifest_free(m);
    return check_summary();
}
