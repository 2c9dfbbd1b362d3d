#include "manifest.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

struct manifest *manifest_new(uint64_t chunk_count)
{
    struct manifest *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    if (chunk_count) {
        m->chunks = calloc(chunk_count, sizeof(*m->chunks));
        if (!m->chunks) {
            free(m);
            return NULL;
        }
    }
    m->chunk_count = chunk_count;
    return m;
}

void manifest_free(struct manifest *m)
{
    if (!m)
        return;
    free(m->chunks);
    free(m);
}

int manifest_chunk_size_valid(uint64_t chunk_size)
{
    return chunk_size >= MANIFEST_MIN_CHUNK_SIZE && chunk_size <= MANIFEST_MAX_CHUNK_SIZE &&
           (chunk_size & (chunk_size - 1)) == 0;
}

/* A cursor over the manifest text that hands out one line at a time. */
struct line_reader {
    const char *pos;
    const char *end;
    unsigned line_no;
};

static int next_line(struct line_reader *r, const char **line, size_t *len)
{
    if (r->pos >= r->end)
        return -1;
    const char *nl = memchr(r->pos, '\n', (size_t)(r->end - r->pos));
    if (!nl)
        return -1; /* every line, including the last, ends in '\n' */
    *line = r->pos;
    *len = (size_t)(nl - r->pos);
    r->pos = nl + 1;
    r->line_no++;
    return 0;
}

/* Reads "KEY VALUE\n" into value (NUL-terminated). */
static int keyed_line(struct line_reader *r, const char *key, char *value, size_t value_len)
{
    const char *line;
    size_t len;
    size_t klen = strlen(key);
    if (next_line(r, &line, &len) < 0 || len <= klen + 1 || memcmp(line, key, klen) != 0 ||
        line[klen] != ' ' || len - klen - 1 >= value_len)
        return -1;
    memcpy(value, line + klen + 1, len - klen - 1);
    value[len - klen - 1] = '\0';
    if (memchr(value, '\0', len - klen - 1))
        return -1;
    return 0;
}

/* Numbers have one spelling (no leading zeros), so a manifest has one text. */
static int keyed_u64(struct line_reader *r, const char *key, uint64_t *out)
{
    char value[32];
    return keyed_line(r, key, value, sizeof(value)) < 0 || parse_u64(value, out) < 0 ||
                   (value[0] == '0' && value[1] != '\0')
               ? -1
               : 0;
}

#define FAIL(...)                                                                              \
    do {                                                                                       \
        if (err)                                                                               \
            snprintf(err, errlen, __VA_ARGS__);                                                \
        manifest_free(m);                                                                      \
        return -EBADMSG;                                                                       \
    } while (0)

int manifest_parse(const char *text, size_t len, struct manifest **out, char *err, size_t errlen)
{
    struct manifest *m = NULL;
    struct line_reader r = {text, text + len, 0};
    const char *line;
    size_t line_len;
    char name[65];
    uint64_t version, size, chunk_size, created, count;
    char source[256];

    if (next_line(&r, &line, &line_len) < 0 || line_len != 16 || memcmp(line, "imgfs-manifest 1", 16))
        FAIL("not an imgfs manifest (bad first line)");
    if (keyed_line(&r, "name", name, sizeof(name)) < 0 || !name_is_valid(name))
        FAIL("manifest has a missing or invalid name");
    if (keyed_u64(&r, "version", &version) < 0 || version == 0)
        FAIL("manifest has a missing or invalid version");
    if (keyed_u64(&r, "size", &size) < 0 || size == 0 || size > MANIFEST_MAX_DISK_SIZE)
        FAIL("manifest has a missing or absurd size");
    if (keyed_u64(&r, "chunk-size", &chunk_size) < 0 || !manifest_chunk_size_valid(chunk_size))
        FAIL("manifest has a missing or invalid chunk size");
    if (keyed_u64(&r, "created", &created) < 0)
        FAIL("manifest has a missing creation time");
    if (keyed_line(&r, "source", source, sizeof(source)) < 0)
        FAIL("manifest has a missing source line");
    if (keyed_u64(&r, "chunks", &count) < 0 || count != (size + chunk_size - 1) / chunk_size)
        FAIL("manifest chunk count does not match its size");
    if (count > MANIFEST_MAX_CHUNKS)
        FAIL("manifest has %" PRIu64 " chunks, more than the %llu a manifest may have", count, MANIFEST_MAX_CHUNKS);
    /* Each chunk line takes at least 2 bytes: refuse before allocating. */
    if (count > len / 2)
        FAIL("manifest is truncated");

    m = manifest_new(count);
    if (!m)
        FAIL("out of memory");
    snprintf(m->name, sizeof(m->name), "%s", name);
    snprintf(m->source, sizeof(m->source), "%s", source);
    m->version = version;
    m->size = size;
    m->chunk_size = (uint32_t)chunk_size;
    m->created = created;

    for (uint64_t i = 0; i < count; i++) {
        if (next_line(&r, &line, &line_len) < 0)
            FAIL("manifest is truncated at chunk %" PRIu64, i);
        if (line_len == 1 && line[0] == '0')
            continue;
        if (line_len != CHUNK_HASH_HEX || chunk_hash_from_hex(line, &m->chunks[i]) < 0 ||
            chunk_hash_is_null(&m->chunks[i]))
            FAIL("manifest line %u is not a chunk hash", r.line_no);
    }
    size_t body_len = (size_t)(r.pos - text);
    char end_hex[CHUNK_HASH_HEX + 1];
    struct chunk_hash want, got;
    if (keyed_line(&r, "end", end_hex, sizeof(end_hex)) < 0 || strlen(end_hex) != CHUNK_HASH_HEX ||
        chunk_hash_from_hex(end_hex, &want) < 0)
        FAIL("manifest is truncated (no end line)");
    if (r.pos != r.end)
        FAIL("manifest has trailing data after its end line");
    chunk_hash_compute(text, body_len, &got);
    if (!chunk_hash_equal(&got, &want))
        FAIL("manifest checksum does not match its contents");
    chunk_hash_compute(text, len, &m->id);
    *out = m;
    return 0;
}

int manifest_format(const struct manifest *m, char **text, size_t *len)
{
    size_t cap = 1024 + strlen(m->source) + (size_t)m->chunk_count * (CHUNK_HASH_HEX + 1) + 64;
    char *buf = malloc(cap);
    if (!buf)
        return -ENOMEM;
    int n = snprintf(buf, cap,
                     "imgfs-manifest 1\nname %s\nversion %" PRIu64 "\nsize %" PRIu64
                     "\nchunk-size %" PRIu32 "\ncreated %" PRIu64 "\nsource %s\nchunks %" PRIu64 "\n",
                     m->name, m->version, m->size, m->chunk_size, m->created, m->source,
                     m->chunk_count);
    size_t pos = (size_t)n;
    for (uint64_t i = 0; i < m->chunk_count; i++) {
        if (chunk_hash_is_null(&m->chunks[i])) {
            buf[pos++] = '0';
        } else {
            chunk_hash_to_hex(&m->chunks[i], buf + pos);
            pos += CHUNK_HASH_HEX;
        }
        buf[pos++] = '\n';
    }
    struct chunk_hash sum;
    chunk_hash_compute(buf, pos, &sum);
    char hex[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(&sum, hex);
    pos += (size_t)snprintf(buf + pos, cap - pos, "end %s\n", hex);
    *text = buf;
    *len = pos;
    return 0;
}
