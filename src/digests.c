#include "digests.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

static const struct sign_digest zero_digest;

struct version_digests *digests_new(uint64_t chunk_count)
{
    struct version_digests *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    if (chunk_count && !(d->chunks = calloc(chunk_count, sizeof(*d->chunks)))) {
        free(d);
        return NULL;
    }
    d->chunk_count = chunk_count;
    d->chunk_alg = SIGN_DIGEST_SHA256;
    return d;
}

void digests_free(struct version_digests *d)
{
    if (!d)
        return;
    free(d->chunks);
    free(d);
}

int digests_relpath(const char *name, uint64_t version, char *out, size_t len)
{
    if (!name_is_valid(name))
        return -EINVAL;
    return path_join(out, len, "bases/%s/%" PRIu64 ".digests", name, version);
}

int digests_format(const struct version_digests *d, char **text, size_t *len)
{
    size_t cap = 512 + (size_t)d->chunk_count * (SIGN_DIGEST_HEX + 1);
    char *buf = malloc(cap);
    if (!buf)
        return -ENOMEM;
    char manifest[SIGN_DIGEST_HEX + 1], previous[SIGN_DIGEST_HEX + 1] = "none";
    sign_digest_to_hex(&d->manifest, manifest);
    if (d->has_previous)
        sign_digest_to_hex(&d->previous, previous);
    /* Version 1 is the BLAKE2b record, without an algorithm line. */
    bool v2 = d->chunk_alg == SIGN_DIGEST_SHA256;
    size_t pos = (size_t)snprintf(buf, cap,
                                  "imgfs-digests %d\nbase %s %" PRIu64 "\nmanifest %s\nprevious %s\n%schunks %" PRIu64 "\n",
                                  v2 ? 2 : 1, d->name, d->version, manifest, previous,
                                  v2 ? "chunk-digest sha256\n" : "", d->chunk_count);
    for (uint64_t i = 0; i < d->chunk_count; i++) {
        if (sign_digest_equal(&d->chunks[i], &zero_digest)) {
            buf[pos++] = '0';
        } else {
            sign_digest_to_hex(&d->chunks[i], buf + pos);
            pos += SIGN_DIGEST_HEX;
        }
        buf[pos++] = '\n';
    }
    *text = buf;
    *len = pos;
    return 0;
}

/* The next line of [*p, end) without its '\n', NUL-terminated in line;
 * -1 when there is none or it does not fit. */
static int next_line(const char **p, const char *end, char *line, size_t cap)
{
    const char *nl = memchr(*p, '\n', (size_t)(end - *p));
    if (!nl || (size_t)(nl - *p) >= cap)
        return -1;
    size_t n = (size_t)(nl - *p);
    memcpy(line, *p, n);
    line[n] = '\0';
    *p = nl + 1;
    return memchr(line, '\0', n) ? -1 : 0;
}

/* A decimal number in its one spelling (no sign, no leading zeros): a record
 * has exactly one text, which is what its digest covers. */
static int canonical_u64(const char *text, uint64_t *out)
{
    return parse_u64(text, out) == 0 && (text[0] != '0' || text[1] == '\0') ? 0 : -1;
}

#define BAD(...)                                                                               \
    do {                                                                                       \
        snprintf(err, errlen, __VA_ARGS__);                                                    \
        digests_free(d);                                                                       \
        return -EBADMSG;                                                                       \
    } while (0)

int digests_parse(const char *text, size_t len, struct version_digests **out, char *err, size_t errlen)
{
    struct version_digests *d = NULL;
    const char *p = text, *end = text + len;
    char line[160], name[65], version[24], count_text[24];
    uint64_t v, count;
    struct sign_digest manifest, previous;
    bool has_previous;
    enum sign_digest_alg alg = SIGN_DIGEST_BLAKE2B;
    if (next_line(&p, end, line, sizeof(line)) < 0 ||
        (strcmp(line, "imgfs-digests 1") != 0 && strcmp(line, "imgfs-digests 2") != 0))
        BAD("not a digests record (bad first line)");
    bool v2 = line[14] == '2';
    char again[160];
    if (next_line(&p, end, line, sizeof(line)) < 0 || sscanf(line, "base %64s %23s", name, version) != 2 ||
        !name_is_valid(name) || canonical_u64(version, &v) < 0 || v == 0 ||
        (snprintf(again, sizeof(again), "base %s %s", name, version), strcmp(again, line) != 0))
        BAD("digests record has a bad base line");
    if (next_line(&p, end, line, sizeof(line)) < 0 || strncmp(line, "manifest ", 9) != 0 ||
        strlen(line) != 9 + SIGN_DIGEST_HEX || sign_digest_from_hex(line + 9, &manifest) < 0)
        BAD("digests record has a bad manifest line");
    if (next_line(&p, end, line, sizeof(line)) < 0 || strncmp(line, "previous ", 9) != 0)
        BAD("digests record has a bad previous line");
    has_previous = strcmp(line + 9, "none") != 0;
    if (has_previous && (strlen(line) != 9 + SIGN_DIGEST_HEX || sign_digest_from_hex(line + 9, &previous) < 0))
        BAD("digests record has a bad previous line");
    if (has_previous != (v > 1))
        BAD("digests record's previous line does not fit its version");
    if (v2) {
        /* Version 2 exists for SHA-256; BLAKE2b records are version 1. */
        if (next_line(&p, end, line, sizeof(line)) < 0 || strcmp(line, "chunk-digest sha256") != 0)
            BAD("digests record has a bad chunk-digest line (version 2 names sha256)");
        alg = SIGN_DIGEST_SHA256;
    }
    if (next_line(&p, end, line, sizeof(line)) < 0 || sscanf(line, "chunks %23s", count_text) != 1 ||
        (snprintf(again, sizeof(again), "chunks %s", count_text), strcmp(again, line) != 0) ||
        canonical_u64(count_text, &count) < 0 || count > (size_t)(end - p) / 2 || count > MANIFEST_MAX_CHUNKS)
        BAD("digests record has a bad chunk count");
    if (!(d = digests_new(count)))
        BAD("out of memory");
    snprintf(d->name, sizeof(d->name), "%s", name);
    d->version = v;
    d->manifest = manifest;
    d->chunk_alg = alg;
    d->has_previous = has_previous;
    if (has_previous)
        d->previous = previous;
    for (uint64_t i = 0; i < count; i++) {
        if (next_line(&p, end, line, sizeof(line)) < 0)
            BAD("digests record is truncated at chunk %" PRIu64, i);
        if (strcmp(line, "0") == 0)
            continue;
        if (strlen(line) != SIGN_DIGEST_HEX || sign_digest_from_hex(line, &d->chunks[i]) < 0 ||
            sign_digest_equal(&d->chunks[i], &zero_digest))
            BAD("digests record has a bad digest for chunk %" PRIu64, i);
    }
    if (p != end)
        BAD("digests record has trailing data");
    *out = d;
    return 0;
}

int digests_check(const struct version_digests *d, const struct manifest *m, const char *text, size_t len,
                  char *err, size_t errlen)
{
    struct sign_digest got;
    sign_digest_compute(text, len, &got);
    if (strcmp(d->name, m->name) != 0 || d->version != m->version || d->chunk_count != m->chunk_count) {
        snprintf(err, errlen, "its digests record describes another version");
        return -EBADMSG;
    }
    if (!sign_digest_equal(&got, &d->manifest)) {
        snprintf(err, errlen, "it does not match its signed digest (altered or replaced)");
        return -EBADMSG;
    }
    for (uint64_t i = 0; i < m->chunk_count; i++) {
        if (chunk_hash_is_null(&m->chunks[i]) != sign_digest_equal(&d->chunks[i], &zero_digest)) {
            snprintf(err, errlen, "its digests record disagrees about zero chunk %" PRIu64, i);
            return -EBADMSG;
        }
    }
    return 0;
}
