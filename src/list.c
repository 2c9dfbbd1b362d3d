#include "list.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

void list_free(struct chunk_list *list)
{
    if (!list)
        return;
    free(list->chunks);
    free(list);
}

int list_relpath(const char *name, uint64_t version, const char *list_name, char *out, size_t len)
{
    if (!name_is_valid(name) || !name_is_valid(list_name))
        return -EINVAL;
    return path_join(out, len, "bases/%s/%" PRIu64 ".lists/%s", name, version, list_name);
}

int list_format(const struct chunk_list *list, char **text, size_t *len)
{
    size_t cap = 512 + (size_t)list->count * 21;
    char *buf = malloc(cap);
    if (!buf)
        return -ENOMEM;
    char hex[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(&list->base_id, hex);
    size_t pos = (size_t)snprintf(buf, cap,
                                  "imgfs-list 1\nbase %s %" PRIu64 " %s\nchunk-size %" PRIu32 "\nchunks %" PRIu64 "\n",
                                  list->base_name, list->base_version, hex, list->chunk_size, list->count);
    for (uint64_t i = 0; i < list->count; i++)
        pos += (size_t)snprintf(buf + pos, cap - pos, "%" PRIu64 "\n", list->chunks[i]);
    struct chunk_hash sum;
    chunk_hash_compute(buf, pos, &sum);
    chunk_hash_to_hex(&sum, hex);
    pos += (size_t)snprintf(buf + pos, cap - pos, "end %s\n", hex);
    *text = buf;
    *len = pos;
    return 0;
}

#define BAD(...)                                                                               \
    do {                                                                                       \
        snprintf(err, errlen, __VA_ARGS__);                                                    \
        list_free(list);                                                                       \
        free(copy);                                                                            \
        return -EBADMSG;                                                                       \
    } while (0)

int list_parse(const char *text, size_t len, struct chunk_list **out, char *err, size_t errlen)
{
    struct chunk_list *list = NULL;
    char *copy = NULL;
    /* The checksum covers everything before the last line. */
    if (len < 40 || text[len - 1] != '\n')
        BAD("not a prefetch list (truncated)");
    size_t last = len - 1;
    while (last > 0 && text[last - 1] != '\n')
        last--;
    struct chunk_hash want, got;
    if (len - last != 4 + CHUNK_HASH_HEX + 1 || memcmp(text + last, "end ", 4) != 0 ||
        chunk_hash_from_hex(text + last + 4, &want) < 0)
        BAD("not a prefetch list (no end line: truncated?)");
    chunk_hash_compute(text, last, &got);
    if (!chunk_hash_equal(&got, &want))
        BAD("prefetch list is damaged (checksum mismatch)");
    copy = strndup(text, last);
    list = calloc(1, sizeof(*list));
    if (!copy || !list)
        BAD("out of memory");
    char *save = NULL;
    char *line = strtok_r(copy, "\n", &save);
    char hex[CHUNK_HASH_HEX + 1];
    uint64_t count = 0;
    if (!line || strcmp(line, "imgfs-list 1") != 0)
        BAD("not a prefetch list (bad first line)");
    if (!(line = strtok_r(NULL, "\n", &save)) ||
        sscanf(line, "base %64s %" SCNu64 " %32s", list->base_name, &list->base_version, hex) != 3 ||
        !name_is_valid(list->base_name) || chunk_hash_from_hex(hex, &list->base_id) < 0)
        BAD("prefetch list has a bad base line");
    if (!(line = strtok_r(NULL, "\n", &save)) || sscanf(line, "chunk-size %" SCNu32, &list->chunk_size) != 1 ||
        !manifest_chunk_size_valid(list->chunk_size))
        BAD("prefetch list has a bad chunk size");
    if (!(line = strtok_r(NULL, "\n", &save)) || sscanf(line, "chunks %" SCNu64, &count) != 1 || count > len / 2 ||
        count > MANIFEST_MAX_CHUNKS)
        BAD("prefetch list has a bad chunk count");
    list->chunks = calloc(count ? count : 1, sizeof(*list->chunks));
    if (!list->chunks)
        BAD("out of memory");
    for (; list->count < count; list->count++) {
        if (!(line = strtok_r(NULL, "\n", &save)) || parse_u64(line, &list->chunks[list->count]) < 0)
            BAD("prefetch list is truncated or has a bad entry");
    }
    if (strtok_r(NULL, "\n", &save))
        BAD("prefetch list has more entries than it says");
    free(copy);
    *out = list;
    return 0;
}

int list_check(const struct chunk_list *list, const struct manifest *m, char *err, size_t errlen)
{
    char want[CHUNK_HASH_HEX + 1];
    chunk_hash_to_hex(&m->id, want);
    if (strcmp(list->base_name, m->name) != 0 || list->base_version != m->version ||
        !chunk_hash_equal(&list->base_id, &m->id)) {
        snprintf(err, errlen, "the list belongs to %s@%" PRIu64 ", not to %s@%" PRIu64 " (manifest %s)",
                 list->base_name, list->base_version, m->name, m->version, want);
        return -EINVAL;
    }
    if (list->chunk_size != m->chunk_size) {
        snprintf(err, errlen, "the list's chunk size does not match %s@%" PRIu64, m->name, m->version);
        return -EINVAL;
    }
    for (uint64_t i = 0; i < list->count; i++) {
        if (list->chunks[i] >= m->chunk_count) {
            snprintf(err, errlen, "the list names chunk %" PRIu64 ", past the end of %s@%" PRIu64, list->chunks[i],
                     m->name, m->version);
            return -EINVAL;
        }
    }
    return 0;
}
