/* trust: what a host accepts from its repository.
 *
 * Three modes:
 *   TRUST_UNSIGNED  a local directory without -o trust=: nothing is checked
 *                   beyond the xxh3-128 names (the embedded default);
 *   TRUST_INSECURE  -o insecure: the same over http(s), reported as such in
 *                   the log and in .imgfs/stats;
 *   TRUST_SIGNED    -o trust=FILE: the index must carry a valid signature by
 *                   a key of FILE, every manifest must match the digest chain
 *                   that starts in that index (digests.h), and every chunk
 *                   fetched must match its signed digest (SHA-256, or
 *                   BLAKE2b-256 from older records) before it enters the
 *                   cache.
 *
 * No rollback, no freeze (TRUST_SIGNED): every signed index carries a
 * sequence number and a signing time. The newest accepted one is kept in
 * the state file (CACHE/meta/trust-state); an index with a lower number, or
 * the same number and other contents, is refused and the host keeps serving
 * what it had. An index older than max_index_age is accepted with a warning
 * (a repository that is not re-signed may be frozen by an attacker).
 *
 * The chain: for each base the accepted index gives the digest of its newest
 * record; reading a record of version V gives the digest expected for V-1.
 * trust keeps those expected digests, so that each version is checked
 * against the signed index it was reached from.
 *
 * Chunk digests: a table per digest algorithm from chunk name (xxh3-128) to
 * its signed digest, filled as manifests are accepted, consulted by
 * trust_check_chunk() (which the fetch path calls once per chunk fetched,
 * never per cached read). A name with digests in both tables (a chunk shared
 * by versions whose records use different algorithms) must match both.
 *
 * Locking: state_lock guards the index state, the chains and the refusal
 * report; table_lock (a rwlock) guards the chunk table. Neither is held
 * across I/O other than the small write of the state file, and neither is
 * taken while holding the other. Every function is thread-safe.
 */
#ifndef IMGFS_TRUST_H
#define IMGFS_TRUST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "digests.h"
#include "hash.h"
#include "manifest.h"
#include "sign.h"

enum trust_mode { TRUST_UNSIGNED, TRUST_INSECURE, TRUST_SIGNED };

struct trust;

struct trust_status {
    enum trust_mode mode;
    size_t keys;
    uint64_t index_seq;  /* of the newest accepted signed index, 0 if none */
    uint64_t index_time; /* its signing time (Unix seconds) */
    double max_index_age; /* seconds, 0: not checked */
    bool stale;           /* the accepted index is older than max_index_age */
    uint64_t index_refusals;
    char last_refusal[256];
    double last_refusal_age; /* seconds, or -1 */
    uint64_t chunk_digests;  /* entries in the chunk table */
    uint64_t chunks_refused; /* fetched chunks that failed their digest */
};

/* ring is copied (NULL unless mode is TRUST_SIGNED). state_path is where the
 * newest accepted index is remembered ("" or NULL: not kept). */
int trust_create(enum trust_mode mode, const struct sign_keyring *ring, const char *state_path,
                 double max_index_age, struct trust **out, char *err, size_t errlen);
void trust_destroy(struct trust *t);

enum trust_mode trust_mode(const struct trust *t);
const struct sign_keyring *trust_keyring(const struct trust *t);
const char *trust_mode_name(enum trust_mode mode);

/* Accepts a signed index with sequence number seq, signing time and body
 * digest, or refuses it with -ESTALE (older than the newest accepted). */
int trust_accept_index(struct trust *t, uint64_t seq, uint64_t signed_time, const struct sign_digest *body,
                       char *err, size_t errlen);
/* Records a refusal for the log and the status (logs it once per message). */
void trust_note_refusal(struct trust *t, const char *what);

/* The chain of one base: the accepted index says its newest version is
 * latest with record digest record. */
void trust_set_top(struct trust *t, const char *name, uint64_t latest, const struct sign_digest *record);
/* The digest the record of name@version must have: 0, or -ENOENT when not
 * known yet (walk down from trust_lowest_known()). */
int trust_expected(struct trust *t, const char *name, uint64_t version, struct sign_digest *out);
/* The lowest version of name whose expected digest is known; -ENOENT when
 * the accepted index does not name the base. */
int trust_lowest_known(struct trust *t, const char *name, uint64_t *version);
/* The verified record of name@version names previous for version-1.
 * -EBADMSG when that contradicts what an earlier accepted index said. */
int trust_learn_previous(struct trust *t, const char *name, uint64_t version, const struct sign_digest *previous,
                         char *err, size_t errlen);

/* Adds the chunk digests of an accepted version; -EBADMSG (with err) when a
 * chunk name already has another digest. */
int trust_add_chunks(struct trust *t, const struct manifest *m, const struct version_digests *d, char *err,
                     size_t errlen);
/* True when trust_check_chunk() checks digests (TRUST_SIGNED): a chunk that
 * passes it needs no other check of its bytes. t may be NULL. */
bool trust_checks_chunks(const struct trust *t);
/* 0 when data (the decoded chunk) matches every signed digest of hash, or
 * when the mode checks no digests; -EBADMSG otherwise (also when hash has no
 * signed digest); -ENOMEM when a digest cannot be computed. */
int trust_check_chunk(struct trust *t, const struct chunk_hash *hash, const void *data, size_t len);

void trust_get_status(struct trust *t, struct trust_status *out);

#endif
