/* repo: access to a repository of published base images.
 *
 * A repository is a tree of static files, so a plain directory or any web
 * server can hold it:
 *
 *   imgfs-repo                  marker: "imgfs-repo 1\n"
 *   index                       "imgfs-index 1\n" then "NAME LATEST\n" per base;
 *                               replaced atomically by each publish
 *   bases/NAME/N.manifest       version N of NAME (see manifest.h); immutable
 *   bases/NAME/N.digests        its cryptographic record (digests.h), signed repositories
 *   bases/NAME/N.lists/LIST     prefetch lists (list.h), signed repositories: with "+sig" lines
 *   bases/NAME/N.retired        marker: version N was retired (lifecycle.h); its
 *                               manifest and lists are gone, its digests stay
 *   chunks/XY/XYZ...            a stored chunk named by its hash (chunkfmt.h);
 *                               immutable, written once; removed only by gc
 *
 * Versions 1..LATEST of a base all exist, or are retired; they are never
 * modified.
 *
 * A signed index (sign.h, trust.h) has the digest of each base's newest
 * record on its line, a sequence number and a signing time, then one or more
 * signature lines over everything before them:
 *
 *   imgfs-index 1
 *   debian12 3 <64 hex: digest of bases/debian12/3.digests>
 *   +seq 17
 *   +time 1790000000
 *   +sig <key> <signature>
 *
 * Every number read from a repository is bounded (REPO_MAX_*): a hostile
 * index cannot make a host loop, allocate or fetch without end.
 *
 * Readers (repo_get and the helpers built on it) are thread-safe and hold no
 * lock while doing I/O. This module is the reader; the writer side (for
 * local directories only) is repo_publish.h.
 */
#ifndef IMGFS_REPO_H
#define IMGFS_REPO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunkfmt.h"
#include "hash.h"
#include "list.h"
#include "manifest.h"
#include "sign.h"
#include "trust.h"

struct repo;

/* The first bytes of the marker file and of the index. */
#define REPO_MARKER_TEXT "imgfs-repo 1\n"
#define REPO_INDEX_HEADER "imgfs-index 1\n"

struct repo_index_entry {
    char name[65];
    uint64_t latest;
    bool has_record;           /* signed index: the digest of latest's record */
    struct sign_digest record;
};

struct repo_index {
    struct repo_index_entry *entries;
    size_t count;
    bool is_signed; /* it had signature lines (verified only in TRUST_SIGNED) */
    uint64_t seq;   /* 0 when unsigned */
    uint64_t signed_time;
};

/* Limits for reading repository files. */
#define REPO_MAX_INDEX_LEN (16u << 20)
#define REPO_MAX_MANIFEST_LEN (288u << 20) /* MANIFEST_MAX_CHUNKS lines of 33 bytes */
#define REPO_MAX_DIGESTS_LEN (2 * REPO_MAX_MANIFEST_LEN + 4096)
#define REPO_MAX_LIST_LEN (64u << 20)
/* Bounds of the numbers in an index. */
#define REPO_MAX_VERSION (1u << 20)
#define REPO_MAX_SEQ (1ull << 62)

/* How an HTTP repository is reached. Mirrors are tried in order: the first
 * one that answers becomes current; after a failover the preferred (first)
 * mirror is tried again every failback_seconds. */
#define REPO_MAX_MIRRORS 8
struct repo_options {
    const char *mirrors[REPO_MAX_MIRRORS]; /* further URLs after the location */
    int mirror_count;
    const char *proxy;       /* http proxy URL, or NULL for none */
    const char *netrc_file;  /* user names and passwords, netrc style, or NULL: read by
                                curl per request, never copied, logged or shown */
    double connect_timeout;  /* seconds (default 5) */
    double stall_timeout;    /* seconds below 1 KiB/s before a transfer is dropped (default 10) */
    double failback_seconds; /* default 60 */
    bool offline;            /* open even when the repository cannot be reached */
};

struct repo_mirror_stats {
    char url[256];
    uint64_t requests;
    uint64_t bytes;
    uint64_t errors;
    uint64_t retries; /* requests that were a retry after another mirror failed */
    double avg_latency_ms;
    bool current;
    char last_error[160];
    double last_error_age; /* seconds, or -1 */
};

/* Opens an existing repository: a local directory or an http(s):// URL.
 * Returns -ENOENT / -EBADMSG / -EIO with one sentence in err. opts may be
 * NULL for the defaults. */
int repo_open(const char *location, struct repo **out, char *err, size_t errlen);
int repo_open_with(const char *location, const struct repo_options *opts, struct repo **out, char *err,
                   size_t errlen);

/* Per-mirror statistics of an HTTP repository; returns how many were filled. */
size_t repo_mirror_stats(struct repo *repo, struct repo_mirror_stats *out, size_t max);

/* Reports that the bytes last fetched from mirror were bad (failed
 * verification), so that the next attempt goes to another mirror. */
void repo_report_bad(struct repo *repo, int mirror);

void repo_close(struct repo *repo);

const char *repo_location(const struct repo *repo);
/* 1 for a local directory. */
int repo_mirror_count(const struct repo *repo);
bool repo_is_local(const struct repo *repo);

/* Capabilities of the repository's backend, which readers ask instead of
 * testing for a kind:
 *   repo_kind             "local" or "http", for status output
 *   repo_reads_are_cheap  a read never waits on a network (refresh on lookup;
 *                         the fetch engine reads chunks in worker threads)
 *   repo_missing_is_final a missing file will not appear by waiting
 *   repo_has_url_chunks   chunks are fetched by URL (repo_http_prepare), so
 *                         the fetch engine drives them with curl multi */
const char *repo_kind(const struct repo *repo);
bool repo_reads_are_cheap(const struct repo *repo);
bool repo_missing_is_final(const struct repo *repo);
bool repo_has_url_chunks(const struct repo *repo);

/* Fetches one repository file into a malloc'd, NUL-terminated buffer.
 * -ENOENT when it does not exist, -EFBIG when larger than max_len, another
 * negative errno (typically -EIO or -ETIMEDOUT) when the repository could not
 * be reached. */
int repo_get(struct repo *repo, const char *relpath, size_t max_len, char **data, size_t *len);
/* The same with a deadline (monotonic ns, 0 for none) for the whole attempt
 * over all mirrors; *mirror (may be NULL) tells which mirror answered. */
int repo_get_from(struct repo *repo, const char *relpath, size_t max_len, uint64_t deadline_ns, char **data,
                  size_t *len, int *mirror);

/* Keeps copies of the index and of manifests in dir (which must exist).
 * Manifests are then read from there first (versions never change). With
 * offline_fallback the kept index stands in when the repository is
 * unreachable, so a mount can serve what is cached. */
void repo_set_meta_cache(struct repo *repo, const char *dir, bool offline_fallback);

/* Who the repository is trusted by (trust.h; not owned, must outlive repo).
 * Without it, or in TRUST_UNSIGNED and TRUST_INSECURE, nothing is verified
 * beyond the xxh3-128 names. Call before the repository is shared. */
void repo_set_trust(struct repo *repo, struct trust *trust);

/* Reads the index. In TRUST_SIGNED it must carry a signature by a trusted key
 * and be no older than the newest accepted one; a refused index is reported
 * (trust_note_refusal) and the kept copy of the accepted one stands in when
 * there is one, so that the host keeps serving what it had. */
int repo_read_index(struct repo *repo, struct repo_index *out, char *err, size_t errlen);
void repo_index_free(struct repo_index *index);
/* Parses index text (its signature lines are not checked here): 0, -EBADMSG
 * or -ENOMEM. Pure; for readers and the fuzzer. */
int repo_index_parse(const char *data, size_t len, struct repo_index *out);
/* Returns the entry for name, or NULL. */
const struct repo_index_entry *repo_index_find(const struct repo_index *index, const char *name);

/* Reads a manifest. In TRUST_SIGNED it must match the digest chain from the
 * accepted index, and its chunk digests are handed to the trust table. */
int repo_read_manifest(struct repo *repo, const char *name, uint64_t version, struct manifest **out,
                       char *err, size_t errlen);

/* Reads list LIST of the version m describes and checks that it belongs to
 * it (list_check). In TRUST_SIGNED the list must be signed by a trusted key.
 * -ENOENT when there is no such list. */
int repo_read_list(struct repo *repo, const struct manifest *m, const char *list_name, struct chunk_list **out,
                   char *err, size_t errlen);

/* Decodes a fetched chunk (enc, as stored) into out (chunk_size bytes) and
 * checks it, once: against its signed digest when the repository is verified
 * (trust_check_chunk; the digest is the stronger check, so the xxh3-128 name
 * is not computed as well), else against its name. 0; -EBADMSG when it must
 * not be used, with *why (may be NULL) saying which check failed; -ENOMEM. */
int repo_decode_chunk(struct repo *repo, const struct chunk_hash *hash, const void *enc, size_t enc_len, void *out,
                      size_t chunk_size, const char **why);
/* The check of repo_decode_chunk on bytes already decoded (a raw-stored
 * chunk used in place). */
int repo_check_chunk(struct repo *repo, const struct chunk_hash *hash, const void *data, size_t chunk_size,
                     const char **why);

/* Fetches the stored (encoded) bytes of one chunk. */
int repo_get_chunk(struct repo *repo, const struct chunk_hash *hash, uint32_t chunk_size, uint64_t deadline_ns,
                   char **enc, size_t *len, int *mirror);

/* The pieces a fetch engine needs to drive HTTP chunk transfers itself
 * (curl multi, see fetch.h) while mirror choice and per-mirror statistics
 * stay here. None of them does I/O or holds a lock across I/O.
 *
 * repo_pick_mirror: the mirror to try first now (with failback to mirror 0
 * after failback_seconds); repo_next_mirror: the one after `mirror` for a
 * retry within one attempt. repo_http_prepare sets up curl easy handle h
 * (a CURL *) for a GET of relpath from mirror: URL, proxy, connect and stall
 * timeouts, redirects. repo_note_request / _success / _failure keep the
 * mirror's counters; a failure also makes the mirror "down" for a while and
 * fails over to the next one. */
int repo_pick_mirror(struct repo *repo);
int repo_next_mirror(const struct repo *repo, int mirror);
int repo_http_prepare(struct repo *repo, int mirror, const char *relpath, void *h);
void repo_note_request(struct repo *repo, int mirror, bool retry);
void repo_note_success(struct repo *repo, int mirror, uint64_t bytes, uint64_t latency_ns);
void repo_note_failure(struct repo *repo, int mirror, const char *what);

/* Reads len bytes at off of the disk that manifest m describes, straight
 * from the repository (every chunk verified), without any cache. */
int repo_read_range(struct repo *repo, const struct manifest *m, void *buf, size_t len, uint64_t off);

/* "chunks/ab/ab01..." for hash. out must hold at least 48 bytes. */
void repo_chunk_relpath(const struct chunk_hash *hash, char *out, size_t len);

/* "bases/NAME/V.retired", and whether that marker exists. */
int repo_retired_relpath(const char *name, uint64_t version, char *out, size_t len);
bool repo_version_retired(struct repo *repo, const char *name, uint64_t version);

/* The writer side's state, kept in each repo and used only by
 * repo_publish.c (the publisher; see repo_publish.h). */
struct repo_writer *repo_writer(struct repo *repo);

#endif
