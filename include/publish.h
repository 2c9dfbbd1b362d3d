/* publish: turns a source image into a new version of a base in a local
 * repository.
 *
 * Order of writes, which is what keeps a killed publish harmless:
 *   1. every new chunk is written to an unnamed file and linked into place
 *      (repo_put_chunk);
 *   2. syncfs() makes all of them durable at once;
 *   3. the manifest is written atomically (temp, fsync, rename, dir fsync);
 *   4. the index is replaced atomically, which is when readers see it.
 * A publish killed before step 4 leaves only unreferenced chunks behind.
 * Concurrent publishers are serialised by the repository's publish lock, and
 * hold its chunk lock shared from start to end, which keeps gc out.
 *
 * Step 1 runs on several threads (by default one more than the online CPUs,
 * so that a worker waiting on a read or a write leaves no CPU idle): workers
 * take batches of consecutive chunks, read them, hash, compress and store
 * them; a chunk lands in the manifest at its index, so the output is the
 * same bytes whatever the thread count or the order the workers finish in.
 * What the image's allocation (image_next_data) says is unallocated is a
 * zero chunk and is never read. A chunk that the repository already holds,
 * or that repeats within the image, is stored once: a re-publish of an
 * unchanged image reads and hashes every data chunk but writes no chunk.
 * A signed publish (keys) also computes each data chunk's SHA-256 for its
 * digests record (digests.h) in the workers, from the bytes it hashed, so
 * the index write does not read the new version's chunks back.
 *
 * Contract: publish_image is called by one thread and returns when its
 * workers have ended; it returns 0 or a negative errno with one sentence in
 * err.
 */
#ifndef IMGFS_PUBLISH_H
#define IMGFS_PUBLISH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sign.h"

/* Chosen by measurement on a real Debian boot: bench/chunk-size/RESULTS.md. */
#define PUBLISH_DEFAULT_CHUNK_SIZE (128u * 1024)
/* Level 1: on a tar of /usr in 128K chunks it compresses in about 0.65x the
 * CPU time of level 3 and stores 3.8% more bytes (bench/RESULTS.md,
 * "Publishing"). Readers decode every level; --level 3 stores what imgfs
 * stored before. */
#define PUBLISH_DEFAULT_ZSTD_LEVEL 1
#define PUBLISH_MAX_THREADS 256

struct publish_options {
    const char *image_path;
    const char *repo_path;
    const char *name;
    uint32_t chunk_size;
    int zstd_level; /* 0 stores chunks uncompressed */
    unsigned threads; /* workers; 0: one more than the online CPUs */
    uint64_t created; /* the manifest's creation time; 0: now */
    /* Keys to sign the new index with (sign.h, repo_write_index); none
     * publishes unsigned, which a signed repository refuses. */
    const struct sign_secret_key *keys;
    size_t key_count;
};

struct publish_result {
    uint64_t version;
    uint64_t size;
    char format[32];
    uint64_t bytes_read;        /* read from the image */
    uint64_t bytes_unallocated; /* the rest: known to be zeros without reading */
    uint64_t chunks_new;
    uint64_t chunks_reused;
    uint64_t chunks_zero;
    uint64_t bytes_stored;
    unsigned threads;
    double sync_seconds; /* of the syncfs that made the chunks durable */
    /* Where the workers' time went, summed over them (monotonic clock, so a
     * worker waiting for a CPU or the disk counts in the stage it waits in):
     * reading the image; the zero test, xxh3 and, signed, SHA-256; zstd;
     * the repository look-up and storing the chunk file. And the CPU seconds
     * the workers used, which against their sum says how long they waited. */
    double read_seconds, hash_seconds, compress_seconds, store_seconds;
    double worker_cpu_seconds;
};

int publish_image(const struct publish_options *opts, struct publish_result *result, char *err,
                  size_t errlen);

#endif
