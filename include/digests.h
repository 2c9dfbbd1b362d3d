/* digests: the cryptographic record of one published version.
 *
 * Next to each manifest of a signed repository, bases/NAME/V.digests holds
 * the digest (sign.h) of the manifest file and of every chunk. Version 2,
 * which imgfsctl writes:
 *
 *   imgfs-digests 2
 *   base NAME V
 *   manifest <64 hex>      BLAKE2b-256 of the bytes of bases/NAME/V.manifest
 *   previous <64 hex>      BLAKE2b-256 of bases/NAME/(V-1).digests, "none" for V = 1
 *   chunk-digest sha256    the algorithm of the chunk lines below
 *   chunks N
 *   <64 hex>               one line per chunk, in disk order, of the
 *   0                      uncompressed chunk; "0" for an all-zero chunk
 *
 * Version 1 (written before SHA-256 came in, and still accepted) is the
 * same without the chunk-digest line, with BLAKE2b-256 chunk digests.
 * Each record has one spelling: a version 2 record names sha256 (a
 * BLAKE2b record is written as version 1). The algorithm is part of the
 * record, which the signed chain covers, so it cannot be changed either.
 * Digests of metadata (manifest, previous, and the index's digest of the
 * newest record) are BLAKE2b-256 in both versions: the chain reads the
 * same whichever algorithm each record's chunks use.
 *
 * Records are not signed one by one. The signed index (repo.h) names the
 * digest of each base's newest record, and each record names its
 * predecessor's, so one signature covers every version of every base: a
 * manifest or chunk that does not match the chain from the currently
 * accepted index is refused, whichever signed state it came from
 * (no mix-and-match). Manifests themselves are unchanged by signing, so a
 * manifest's identity (the xxh3-128 that VM layers record) stays the same
 * when an existing repository is signed.
 *
 * Contract: pure functions; a parsed record is owned by the caller and
 * released with digests_free().
 */
#ifndef IMGFS_DIGESTS_H
#define IMGFS_DIGESTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "manifest.h"
#include "sign.h"

struct version_digests {
    char name[65];
    uint64_t version;
    struct sign_digest manifest;
    bool has_previous; /* false only for version 1 */
    struct sign_digest previous;
    enum sign_digest_alg chunk_alg; /* BLAKE2b: record version 1; SHA-256: 2 */
    uint64_t chunk_count;
    struct sign_digest *chunks; /* all zero bytes for an all-zero chunk */
};

/* Parses a record; -EBADMSG with one sentence in err when malformed. */
int digests_parse(const char *text, size_t len, struct version_digests **out, char *err, size_t errlen);
/* Serialises a record into a malloc'd buffer. */
int digests_format(const struct version_digests *d, char **text, size_t *len);
/* A record of chunk_count zero digests, chunk_alg SHA-256 (what new records use). */
struct version_digests *digests_new(uint64_t chunk_count);
void digests_free(struct version_digests *d);

/* Checks that d describes manifest m, whose file bytes are text[0..len):
 * same name, version and chunk count, matching manifest digest, and a zero
 * digest exactly where m has a zero chunk. -EBADMSG with a sentence otherwise. */
int digests_check(const struct version_digests *d, const struct manifest *m, const char *text, size_t len,
                  char *err, size_t errlen);

/* "bases/NAME/V.digests" */
int digests_relpath(const char *name, uint64_t version, char *out, size_t len);

#endif
