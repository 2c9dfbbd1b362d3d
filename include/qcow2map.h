/* qcow2map: which clusters of a qcow2 file hold data, read from the file's
 * own active L1/L2 tables (never from the data clusters), so that publish
 * can skip what is not there without reading it.
 *
 * A map is a sorted list of runs that covers [0, size) of the virtual disk,
 * each run in one state:
 *   - UNALLOCATED: the cluster is not in this file; a read returns what the
 *     backing file holds there (zeros past its end, or without one);
 *   - ZERO: the cluster reads as zeros (qcow2 v3 zero flag);
 *   - DATA: the cluster is stored (plain or compressed) and may hold anything.
 *
 * What is refused with -ENOTSUP (the caller then treats every byte as data
 * and reads it): qcow version 1, extended L2 entries (subclusters) and an
 * external data file. Tables that lie outside the file give -EBADMSG.
 *
 * Contract: pure functions over files opened read-only; a map is owned by
 * its caller and freed with qcow2map_free.
 */
#ifndef IMGFS_QCOW2MAP_H
#define IMGFS_QCOW2MAP_H

#include <stddef.h>
#include <stdint.h>

enum qcow2map_state { QCOW2MAP_UNALLOCATED, QCOW2MAP_ZERO, QCOW2MAP_DATA };

struct qcow2map_run {
    uint64_t start, end;
    enum qcow2map_state state;
    unsigned file; /* DATA: which file of the chain holds it (0: this one) */
    uint64_t host; /* DATA in plain clusters: where start lies in that file,
                      the rest following contiguously; 0: compressed */
};

struct qcow2map {
    uint64_t size; /* virtual size of the file */
    struct qcow2map_run *runs;
    size_t count; /* adjacent runs that could be one are one */
    size_t cap;
};

/* Reads the map of the qcow2 file at path. Returns 0 or a negative errno. */
int qcow2map_read(const char *path, struct qcow2map *out);

/* What a reader of top sees when lower is its backing file: top's
 * UNALLOCATED runs take lower's state, and zeros past lower's size. The
 * result (top->size long) has only ZERO and DATA runs; a DATA run that comes
 * from lower has its file one deeper. An empty lower (size 0) stands for
 * "no backing file". */
int qcow2map_overlay(const struct qcow2map *top, const struct qcow2map *lower, struct qcow2map *out);

void qcow2map_free(struct qcow2map *map);

#endif
