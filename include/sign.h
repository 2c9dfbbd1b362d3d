/* sign: keys, signatures and the cryptographic digests.
 *
 * Nothing here is hand-written cryptography: signatures are Ed25519
 * (crypto_sign_detached / crypto_sign_verify_detached, libsodium); the
 * digests are BLAKE2b-256 (crypto_generichash, libsodium) and SHA-256
 * (OpenSSL's EVP, which uses the CPU's SHA extensions where it has them).
 *
 * BLAKE2b-256 is the digest of signed metadata (index bodies, digests
 * records, manifests). Chunk digests name their algorithm in the record that
 * holds them (digests.h): SHA-256 in new records, because chunk bytes are
 * hashed on every fetch and OpenSSL's SHA-256 is the faster of the two on
 * CPUs with SHA-NI (1.9 against 1.1 GB/s measured here); BLAKE2b-256 in
 * records written before.
 *
 * Files (all text, so an operator can read them):
 *
 *   KEYFILE        "imgfs-secret-key 1\n" then 128 hex digits (the 64-byte
 *                  libsodium secret key, which holds the public key too);
 *                  created mode 0600 with O_EXCL, never overwritten
 *   KEYFILE.pub    one trust line: "imgfs-key ed25519 <64 hex> [comment]\n"
 *   trust file     any number of trust lines (cat a.pub b.pub > trust);
 *                  blank lines and lines starting with '#' are ignored.
 *                  Several keys is how keys are rotated.
 *
 * A signed text ends in one or more signature lines, each over every byte
 * before the first of them:
 *
 *   +sig <64 hex public key> <128 hex signature>\n
 *
 * A text verifies when at least one of its signatures is by a key of the
 * keyring and checks out; the others are ignored (a repository signed by an
 * old and a new key is accepted by hosts that trust either).
 *
 * Contract: call sign_init() once before threads exist (it is idempotent and
 * thread-safe in libsodium anyway). Every other function is thread-safe and
 * pure apart from the named files. Parsers accept any bytes and never read
 * past len.
 */
#ifndef IMGFS_SIGN_H
#define IMGFS_SIGN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SIGN_PUBLIC_KEY_BYTES 32
#define SIGN_SECRET_KEY_BYTES 64
#define SIGN_BYTES 64
#define SIGN_DIGEST_BYTES 32
#define SIGN_DIGEST_HEX (2 * SIGN_DIGEST_BYTES)
/* "+sig " + 64 hex + " " + 128 hex + "\n" */
#define SIGN_LINE_LEN (5 + 2 * SIGN_PUBLIC_KEY_BYTES + 1 + 2 * SIGN_BYTES + 1)
/* A keyring is small: a trust file with more keys is refused. */
#define SIGN_MAX_KEYS 64
#define SIGN_MAX_KEYFILE_LEN (64u * 1024)

struct sign_digest {
    uint8_t bytes[SIGN_DIGEST_BYTES];
};

/* The algorithm of a chunk digest. Both give 32 bytes. */
enum sign_digest_alg { SIGN_DIGEST_BLAKE2B, SIGN_DIGEST_SHA256 };
#define SIGN_DIGEST_ALGS 2

struct sign_public_key {
    uint8_t bytes[SIGN_PUBLIC_KEY_BYTES];
};

struct sign_secret_key {
    uint8_t bytes[SIGN_SECRET_KEY_BYTES];
    struct sign_public_key public_key;
};

struct sign_keyring {
    size_t count;
    struct sign_public_key keys[SIGN_MAX_KEYS];
};

/* 0, or -EIO when libsodium or OpenSSL's SHA-256 cannot initialise. */
int sign_init(void);

/* BLAKE2b-256 of data: the digest of metadata. */
void sign_digest_compute(const void *data, size_t len, struct sign_digest *out);
/* The digest of data under alg: the digest of a chunk. 0, or -ENOMEM when
 * OpenSSL cannot set up the computation. */
int sign_digest_compute_alg(enum sign_digest_alg alg, const void *data, size_t len, struct sign_digest *out);
bool sign_digest_equal(const struct sign_digest *a, const struct sign_digest *b);
/* Writes 64 hex digits and a NUL into out[SIGN_DIGEST_HEX + 1]. */
void sign_digest_to_hex(const struct sign_digest *d, char *out);
/* Parses exactly 64 hex digits (then NUL, space or newline); -EINVAL otherwise. */
int sign_digest_from_hex(const char *hex, struct sign_digest *out);

/* Writes a new key pair: path (0600, refused if it exists) and path.pub.
 * comment (may be NULL) goes on the public line. */
int sign_key_generate(const char *path, const char *comment, char *err, size_t errlen);
/* Loads a secret key file; refuses one that others can read. */
int sign_key_load(const char *path, struct sign_secret_key *out, char *err, size_t errlen);

/* Parses trust lines into ring (which is cleared first). */
int sign_keyring_parse(const char *text, size_t len, struct sign_keyring *ring, char *err, size_t errlen);
int sign_keyring_load(const char *path, struct sign_keyring *ring, char *err, size_t errlen);
bool sign_keyring_has(const struct sign_keyring *ring, const struct sign_public_key *key);
/* "imgfs-key ed25519 <hex>" (no newline) into out, which holds >= 96 bytes. */
void sign_public_key_line(const struct sign_public_key *key, char *out, size_t len);

/* Writes the signature line over body[0..len) into line (SIGN_LINE_LEN + 1
 * bytes, NUL-terminated). */
void sign_line(const struct sign_secret_key *key, const void *body, size_t len, char *line);

/* The length of text without its trailing signature lines (text itself
 * when it has none); *count (may be NULL) is how many there were. */
size_t sign_body_len(const char *text, size_t len, unsigned *count);

/* Verifies text's signature lines against ring. On success *body_len is the
 * signed part. -EBADMSG: not signed or a malformed signature line; -EPERM:
 * no signature by a trusted key verifies. err gets one sentence. */
int sign_verify(const struct sign_keyring *ring, const char *text, size_t len, size_t *body_len, char *err,
                size_t errlen);

#endif
