/* manifest: the description of one published version of a base image.
 *
 * On disk a manifest is a small text file, so an operator can read it:
 *
 *   imgfs-manifest 1
 *   name debian12
 *   version 3
 *   size 2147483648
 *   chunk-size 262144
 *   created 1790000000
 *   source debian12.qcow2 qcow2
 *   chunks 8192
 *   <32 hex digits>        one line per chunk, in disk order;
 *   0                      "0" marks an all-zero chunk that is not stored
 *   ...
 *   end <32 hex digits>    xxh3-128 of every byte before this line
 *
 * The trailing checksum makes a truncated or edited manifest fail to parse.
 * The manifest's identity (manifest_id) is the xxh3-128 of the whole file; a
 * layer records it to know exactly which base bytes it sits on.
 *
 * Every chunk is chunk_size bytes long; the last one is zero-padded, and the
 * disk is cut back to `size` bytes when served.
 *
 * Contract: a parsed manifest is immutable and may be shared between threads
 * without locking. manifest_free() is the only way to release it.
 */
#ifndef IMGFS_MANIFEST_H
#define IMGFS_MANIFEST_H

#include <stddef.h>
#include <stdint.h>

#include "hash.h"

#define MANIFEST_MIN_CHUNK_SIZE (4u * 1024)
#define MANIFEST_MAX_CHUNK_SIZE (16u * 1024 * 1024)
/* 1 PiB: anything bigger is an absurd size, not a disk. */
#define MANIFEST_MAX_DISK_SIZE (1ull << 50)
/* At most 8 Mi chunks (128 MiB of hashes, about 270 MiB of manifest text):
 * 1 TiB at 128K chunks, 128 TiB at 16M. Checked before anything is
 * allocated, so a hostile or absurd size costs nothing. */
#define MANIFEST_MAX_CHUNKS (1ull << 23)

struct manifest {
    char name[65];
    uint64_t version;
    uint64_t size;
    uint32_t chunk_size;
    uint64_t created;
    char source[256];       /* informational: source file name and format */
    uint64_t chunk_count;
    struct chunk_hash *chunks; /* chunk_count entries; null hash = zero chunk */
    struct chunk_hash id;      /* xxh3-128 of the whole manifest file */
};

/* Parses text of len bytes. On error returns -EBADMSG and, if err is not NULL,
 * one sentence describing what is wrong. */
int manifest_parse(const char *text, size_t len, struct manifest **out, char *err, size_t errlen);

/* Serialises m (its id field is ignored) into a malloc'd buffer. */
int manifest_format(const struct manifest *m, char **text, size_t *len);

/* Allocates a manifest with room for chunk_count chunks (all zero). */
struct manifest *manifest_new(uint64_t chunk_count);
void manifest_free(struct manifest *m);

/* True when chunk_size is a power of two within the allowed range. */
int manifest_chunk_size_valid(uint64_t chunk_size);

#endif
