/* chunkfmt: how one chunk is stored in a repository.
 *
 * A stored chunk is a 16-byte header followed by the payload:
 *   magic "IMGC" | u8 format (0 = raw, 1 = zstd) | 3 reserved zero bytes |
 *   u32 LE uncompressed length | u32 LE payload length
 * The chunk's name is the xxh3-128 hash of its uncompressed bytes, so a
 * decoded chunk is checked against the name it was fetched under; a damaged
 * header, payload or a wrong file all end in -EBADMSG, never in wrong data.
 *
 * Contract: pure functions, thread-safe (an encoder is used by one thread
 * at a time).
 */
#ifndef IMGFS_CHUNKFMT_H
#define IMGFS_CHUNKFMT_H

#include <stddef.h>
#include <stdint.h>

#include "hash.h"

#define CHUNKFMT_HEADER_LEN 16
#define CHUNKFMT_RAW 0
#define CHUNKFMT_ZSTD 1
/* A stored chunk is never larger than its raw bytes plus this. */
#define CHUNKFMT_MAX_OVERHEAD CHUNKFMT_HEADER_LEN

/* Upper bound of an encoded chunk of data_len bytes. */
size_t chunkfmt_bound(size_t data_len);

/* Encodes data into out (capacity >= chunkfmt_bound). Compresses with zstd at
 * level when that saves at least 1/16 of the size, else stores raw.
 * Returns the encoded length, or a negative errno. */
long chunkfmt_encode(const void *data, size_t data_len, int level, void *out, size_t out_cap);

/* A reusable zstd context, for one thread at a time: chunkfmt_encode_with
 * gives exactly the bytes of chunkfmt_encode at the encoder's level, without
 * setting zstd up for every chunk. NULL when out of memory. */
struct chunkfmt_encoder;
struct chunkfmt_encoder *chunkfmt_encoder_new(int level);
void chunkfmt_encoder_free(struct chunkfmt_encoder *e);
long chunkfmt_encode_with(struct chunkfmt_encoder *e, const void *data, size_t data_len, void *out,
                          size_t out_cap);

/* Decodes an encoded chunk into out, which must hold exactly expected_len
 * bytes, and verifies its hash against want. Returns 0, or -EBADMSG for any
 * malformed input or hash mismatch. */
int chunkfmt_decode(const void *enc, size_t enc_len, void *out, size_t expected_len,
                    const struct chunk_hash *want);
/* The same without the hash check, for a caller that checks the bytes with
 * something stronger (a signed digest, repo_decode_chunk). -EBADMSG for any
 * malformed input. */
int chunkfmt_unpack(const void *enc, size_t enc_len, void *out, size_t expected_len);

/* The payload of a well-formed raw-stored chunk of expected_len bytes (a
 * pointer into enc), or NULL when enc is anything else. Lets a reader use
 * the stored bytes in place instead of copying them out; they still have to
 * be checked (nothing here looks at their hash). */
const void *chunkfmt_raw_payload(const void *enc, size_t enc_len, size_t expected_len);

#endif
