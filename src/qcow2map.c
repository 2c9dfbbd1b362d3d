#include "qcow2map.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

/* Field offsets and bits of the qcow2 header and tables (qemu's
 * docs/interop/qcow2.txt). */
#define HDR_VERSION 4
#define HDR_CLUSTER_BITS 20
#define HDR_SIZE 24
#define HDR_L1_SIZE 36
#define HDR_L1_OFFSET 40
#define HDR_INCOMPATIBLE 72
#define HDR_V2_LEN 72
#define HDR_V3_LEN 104
#define INCOMPAT_EXTERNAL_DATA (1ull << 2)
#define INCOMPAT_EXTENDED_L2 (1ull << 4)
#define OFFSET_MASK 0x00fffffffffffe00ull
#define L2_COMPRESSED (1ull << 62)
#define L2_ZERO 1ull
/* qemu's own limit on the L1 table (32 MiB). */
#define MAX_L1_ENTRIES (4u << 20)

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Appends [start, end) in state, merged with the last run when it matches. */
static int add_run(struct qcow2map *map, uint64_t start, uint64_t end, enum qcow2map_state state, unsigned file,
                   uint64_t host)
{
    if (start >= end)
        return 0;
    struct qcow2map_run *last = map->count ? &map->runs[map->count - 1] : NULL;
    bool host_follows = last && (host ? last->host && last->host + (start - last->start) == host : !last->host);
    if (last && last->state == state && last->file == file && last->end == start && host_follows) {
        map->runs[map->count - 1].end = end;
        return 0;
    }
    if (map->count == map->cap) {
        size_t cap = map->cap ? map->cap * 2 : 64;
        struct qcow2map_run *grown = realloc(map->runs, cap * sizeof(*grown));
        if (!grown)
            return -ENOMEM;
        map->runs = grown;
        map->cap = cap;
    }
    map->runs[map->count++] = (struct qcow2map_run){start, end, state, file, host};
    return 0;
}

static enum qcow2map_state l2_state(uint64_t entry, uint32_t version)
{
    if (entry & L2_COMPRESSED)
        return QCOW2MAP_DATA;
    if (version >= 3 && (entry & L2_ZERO))
        return QCOW2MAP_ZERO;
    return entry & OFFSET_MASK ? QCOW2MAP_DATA : QCOW2MAP_UNALLOCATED;
}

/* Whether [off, off + len) lies inside a file of file_size bytes. */
static bool inside(uint64_t off, uint64_t len, uint64_t file_size)
{
    return off <= file_size && len <= file_size - off;
}

static int read_tables(int fd, uint64_t file_size, const unsigned char *hdr, struct qcow2map *map)
{
    uint32_t version = be32(hdr + HDR_VERSION);
    uint32_t cluster_bits = be32(hdr + HDR_CLUSTER_BITS);
    if (cluster_bits < 9 || cluster_bits > 21)
        return -EBADMSG;
    uint64_t cluster = 1ull << cluster_bits;
    uint64_t per_l2 = cluster / 8;
    map->size = be64(hdr + HDR_SIZE);
    uint64_t clusters = map->size / cluster + (map->size % cluster != 0);
    uint64_t l1_needed = clusters / per_l2 + (clusters % per_l2 != 0);
    uint32_t l1_size = be32(hdr + HDR_L1_SIZE);
    uint64_t l1_offset = be64(hdr + HDR_L1_OFFSET);
    if (l1_size > MAX_L1_ENTRIES || !inside(l1_offset, (uint64_t)l1_size * 8, file_size))
        return -EBADMSG;
    uint64_t l1_used = l1_size < l1_needed ? l1_size : l1_needed;

    unsigned char *l1 = malloc(l1_used * 8 + 1);
    unsigned char *l2 = malloc(cluster);
    int rc = l1 && l2 ? 0 : -ENOMEM;
    if (!rc && l1_used)
        rc = read_full_at(fd, l1, l1_used * 8, (off_t)l1_offset);
    for (uint64_t i = 0; !rc && i < l1_used; i++) {
        uint64_t first = i * per_l2 * cluster;
        uint64_t last = first + per_l2 * cluster < map->size ? first + per_l2 * cluster : map->size;
        uint64_t l2_offset = be64(l1 + i * 8) & OFFSET_MASK;
        if (!l2_offset) {
            rc = add_run(map, first, last, QCOW2MAP_UNALLOCATED, 0, 0);
            continue;
        }
        if (!inside(l2_offset, cluster, file_size)) {
            rc = -EBADMSG;
            break;
        }
        rc = read_full_at(fd, l2, cluster, (off_t)l2_offset);
        for (uint64_t j = 0; !rc && j < per_l2 && first + j * cluster < last; j++) {
            uint64_t start = first + j * cluster;
            uint64_t end = start + cluster < last ? start + cluster : last;
            uint64_t entry = be64(l2 + j * 8);
            enum qcow2map_state state = l2_state(entry, version);
            uint64_t host = state == QCOW2MAP_DATA && !(entry & L2_COMPRESSED) ? entry & OFFSET_MASK : 0;
            rc = add_run(map, start, end, state, 0, host);
        }
    }
    /* Clusters beyond a short L1 table are not allocated. */
    if (!rc)
        rc = add_run(map, l1_used * per_l2 * cluster < map->size ? l1_used * per_l2 * cluster : map->size,
                     map->size, QCOW2MAP_UNALLOCATED, 0, 0);
    free(l1);
    free(l2);
    return rc == -ENODATA ? -EBADMSG : rc;
}

int qcow2map_read(const char *path, struct qcow2map *out)
{
    memset(out, 0, sizeof(*out));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    unsigned char hdr[HDR_V3_LEN];
    int rc = fstat(fd, &st) < 0 ? -errno : read_full_at(fd, hdr, HDR_V2_LEN, 0);
    if (!rc && memcmp(hdr, "QFI\xfb", 4) != 0)
        rc = -EBADMSG;
    if (!rc && be32(hdr + HDR_VERSION) < 2)
        rc = -ENOTSUP; /* qcow version 1 has another table layout */
    if (!rc && be32(hdr + HDR_VERSION) >= 3) {
        rc = read_full_at(fd, hdr + HDR_V2_LEN, HDR_V3_LEN - HDR_V2_LEN, HDR_V2_LEN);
        if (!rc && (be64(hdr + HDR_INCOMPATIBLE) & (INCOMPAT_EXTERNAL_DATA | INCOMPAT_EXTENDED_L2)))
            rc = -ENOTSUP;
    }
    if (!rc)
        rc = read_tables(fd, (uint64_t)st.st_size, hdr, out);
    close(fd);
    if (rc == -ENODATA)
        rc = -EBADMSG;
    if (rc)
        qcow2map_free(out);
    return rc;
}

int qcow2map_overlay(const struct qcow2map *top, const struct qcow2map *lower, struct qcow2map *out)
{
    memset(out, 0, sizeof(*out));
    out->size = top->size;
    size_t j = 0;
    int rc = 0;
    for (size_t i = 0; !rc && i < top->count; i++) {
        const struct qcow2map_run *t = &top->runs[i];
        if (t->state != QCOW2MAP_UNALLOCATED) {
            rc = add_run(out, t->start, t->end, t->state, t->file, t->host);
            continue;
        }
        /* Both lists are sorted, so lower is walked once over all of top. */
        while (j < lower->count && lower->runs[j].end <= t->start)
            j++;
        uint64_t at = t->start;
        for (size_t k = j; !rc && k < lower->count && lower->runs[k].start < t->end; k++) {
            const struct qcow2map_run *l = &lower->runs[k];
            uint64_t end = l->end < t->end ? l->end : t->end;
            bool data = l->state == QCOW2MAP_DATA;
            uint64_t from = at > l->start ? at : l->start;
            rc = add_run(out, from, end, data ? QCOW2MAP_DATA : QCOW2MAP_ZERO, data ? l->file + 1 : 0,
                         data && l->host ? l->host + (from - l->start) : 0);
            at = end;
        }
        if (!rc)
            rc = add_run(out, at, t->end, QCOW2MAP_ZERO, 0, 0); /* past lower's end */
    }
    if (rc)
        qcow2map_free(out);
    return rc;
}

void qcow2map_free(struct qcow2map *map)
{
    free(map->runs);
    map->runs = NULL;
    map->count = map->cap = 0;
}
