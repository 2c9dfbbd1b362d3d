#include "sign.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

#define SECRET_HEADER "imgfs-secret-key 1\n"
#define TRUST_PREFIX "imgfs-key ed25519 "
#define SIG_PREFIX "+sig "

/* SHA-256 fetched from OpenSSL's default provider once: EVP_sha256() would
 * look the implementation up again on every call. Written once, before any
 * reader (pthread_once). */
static EVP_MD *sha256_md;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;

static void fetch_sha256(void) { sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL); }

int sign_init(void)
{
    pthread_once(&sha256_once, fetch_sha256);
    return sodium_init() < 0 || !sha256_md ? -EIO : 0;
}

void sign_digest_compute(const void *data, size_t len, struct sign_digest *out)
{
    crypto_generichash(out->bytes, sizeof(out->bytes), data, len, NULL, 0);
}

int sign_digest_compute_alg(enum sign_digest_alg alg, const void *data, size_t len, struct sign_digest *out)
{
    if (alg == SIGN_DIGEST_BLAKE2B) {
        sign_digest_compute(data, len, out);
        return 0;
    }
    pthread_once(&sha256_once, fetch_sha256);
    unsigned int n = 0;
    /* EVP_Digest fails only without memory (it allocates its context). */
    if (!sha256_md || !EVP_Digest(data, len, out->bytes, &n, sha256_md, NULL) || n != sizeof(out->bytes))
        return -ENOMEM;
    return 0;
}

bool sign_digest_equal(const struct sign_digest *a, const struct sign_digest *b)
{
    return sodium_memcmp(a->bytes, b->bytes, sizeof(a->bytes)) == 0;
}

static void to_hex(const uint8_t *bytes, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    out[2 * n] = '\0';
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1; /* lower case only: one spelling per value */
}

/* Parses exactly 2n hex digits at hex (which must have that many bytes). */
static int from_hex(const char *hex, uint8_t *bytes, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -EINVAL;
        bytes[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}

void sign_digest_to_hex(const struct sign_digest *d, char *out) { to_hex(d->bytes, sizeof(d->bytes), out); }

int sign_digest_from_hex(const char *hex, struct sign_digest *out)
{
    if (strnlen(hex, SIGN_DIGEST_HEX + 1) < SIGN_DIGEST_HEX)
        return -EINVAL;
    char after = hex[SIGN_DIGEST_HEX];
    if (after != '\0' && after != ' ' && after != '\n')
        return -EINVAL;
    return from_hex(hex, out->bytes, sizeof(out->bytes));
}

void sign_public_key_line(const struct sign_public_key *key, char *out, size_t len)
{
    char hex[2 * SIGN_PUBLIC_KEY_BYTES + 1];
    to_hex(key->bytes, sizeof(key->bytes), hex);
    snprintf(out, len, TRUST_PREFIX "%s", hex);
}

/* Creates path with O_EXCL|O_NOFOLLOW (never through a planted symlink,
 * never over an existing key) and writes data to it. */
static int create_file(const char *path, const char *data, size_t len, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0)
        return -errno;
    int err = write_full(fd, data, len);
    if (!err && fchmod(fd, mode) < 0) /* whatever the umask */
        err = -errno;
    if (!err && fsync(fd) < 0)
        err = -errno;
    if (close(fd) < 0 && !err)
        err = -errno;
    if (err)
        unlink(path);
    return err;
}

int sign_key_generate(const char *path, const char *comment, char *err, size_t errlen)
{
    char pub_path[PATH_MAX];
    if (path_join(pub_path, sizeof(pub_path), "%s.pub", path) != 0) {
        snprintf(err, errlen, "key file name is too long");
        return -ENAMETOOLONG;
    }
    if (comment && (strchr(comment, '\n') || strlen(comment) > 200)) {
        snprintf(err, errlen, "the key comment must be one line of at most 200 characters");
        return -EINVAL;
    }
    struct sign_secret_key key;
    crypto_sign_keypair(key.public_key.bytes, key.bytes);
    char secret[sizeof(SECRET_HEADER) + 2 * SIGN_SECRET_KEY_BYTES + 2];
    memcpy(secret, SECRET_HEADER, strlen(SECRET_HEADER));
    to_hex(key.bytes, sizeof(key.bytes), secret + strlen(SECRET_HEADER));
    strcat(secret, "\n");
    char pub[400];
    sign_public_key_line(&key.public_key, pub, sizeof(pub));
    size_t n = strlen(pub);
    snprintf(pub + n, sizeof(pub) - n, "%s%s\n", comment ? " " : "", comment ? comment : "");

    int rc = create_file(path, secret, strlen(secret), 0600);
    sodium_memzero(secret, sizeof(secret));
    sodium_memzero(&key, sizeof(key));
    if (rc) {
        snprintf(err, errlen, "cannot create key file %s: %s", path,
                 rc == -EEXIST ? "it already exists (keys are never overwritten)" : strerror(-rc));
        return rc;
    }
    rc = create_file(pub_path, pub, strlen(pub), 0644);
    if (rc) {
        unlink(path);
        snprintf(err, errlen, "cannot create public key file %s: %s", pub_path,
                 rc == -EEXIST ? "it already exists" : strerror(-rc));
    }
    return rc;
}

int sign_key_load(const char *path, struct sign_secret_key *out, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open key file %s: %s", path, strerror(errno));
        return -errno;
    }
    struct stat st;
    char text[256];
    ssize_t n = -1;
    int rc = 0;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "key file %s is not a regular file", path);
        rc = -EINVAL;
    } else if (st.st_mode & 077) {
        snprintf(err, errlen, "key file %s can be read by others (mode %03o); chmod 600 it", path,
                 (unsigned)(st.st_mode & 0777));
        rc = -EPERM;
    } else if ((n = read(fd, text, sizeof(text) - 1)) < 0) {
        rc = -errno;
        snprintf(err, errlen, "cannot read key file %s: %s", path, strerror(errno));
    }
    close(fd);
    if (rc)
        return rc;
    size_t hl = strlen(SECRET_HEADER);
    size_t want = hl + 2 * SIGN_SECRET_KEY_BYTES;
    if ((size_t)n < want || memcmp(text, SECRET_HEADER, hl) != 0 ||
        from_hex(text + hl, out->bytes, sizeof(out->bytes)) < 0 ||
        ((size_t)n > want && !((size_t)n == want + 1 && text[want] == '\n'))) {
        sodium_memzero(text, sizeof(text));
        snprintf(err, errlen, "%s is not an imgfs secret key file", path);
        return -EBADMSG;
    }
    sodium_memzero(text, sizeof(text));
    crypto_sign_ed25519_sk_to_pk(out->public_key.bytes, out->bytes);
    return 0;
}

int sign_keyring_parse(const char *text, size_t len, struct sign_keyring *ring, char *err, size_t errlen)
{
    ring->count = 0;
    size_t line_no = 0;
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        line_no++;
        size_t pl = strlen(TRUST_PREFIX);
        size_t hex = 2 * SIGN_PUBLIC_KEY_BYTES;
        if (n == 0 || p[0] == '#') {
            /* blank or comment */
        } else if (n < pl + hex || memcmp(p, TRUST_PREFIX, pl) != 0 || (n > pl + hex && p[pl + hex] != ' ')) {
            snprintf(err, errlen, "trust file line %zu is not \"imgfs-key ed25519 HEX [comment]\"", line_no);
            return -EBADMSG;
        } else if (ring->count == SIGN_MAX_KEYS) {
            snprintf(err, errlen, "trust file has more than %d keys", SIGN_MAX_KEYS);
            return -EBADMSG;
        } else if (from_hex(p + pl, ring->keys[ring->count].bytes, SIGN_PUBLIC_KEY_BYTES) < 0) {
            snprintf(err, errlen, "trust file line %zu has a malformed key", line_no);
            return -EBADMSG;
        } else if (!sign_keyring_has(ring, &ring->keys[ring->count])) {
            ring->count++;
        }
        p += n + (nl ? 1 : 0);
    }
    if (ring->count == 0) {
        snprintf(err, errlen, "trust file holds no key");
        return -EBADMSG;
    }
    return 0;
}

int sign_keyring_load(const char *path, struct sign_keyring *ring, char *err, size_t errlen)
{
    char *data;
    size_t len;
    int rc = read_file(path, SIGN_MAX_KEYFILE_LEN, &data, &len);
    if (rc) {
        snprintf(err, errlen, "cannot read trust file %s: %s", path, strerror(-rc));
        return rc;
    }
    char why[200];
    rc = sign_keyring_parse(data, len, ring, why, sizeof(why));
    free(data);
    if (rc)
        snprintf(err, errlen, "%s: %s", path, why);
    return rc;
}

bool sign_keyring_has(const struct sign_keyring *ring, const struct sign_public_key *key)
{
    for (size_t i = 0; i < ring->count; i++)
        if (memcmp(ring->keys[i].bytes, key->bytes, sizeof(key->bytes)) == 0)
            return true;
    return false;
}

void sign_line(const struct sign_secret_key *key, const void *body, size_t len, char *line)
{
    uint8_t sig[SIGN_BYTES];
    crypto_sign_detached(sig, NULL, body, len, key->bytes);
    memcpy(line, SIG_PREFIX, strlen(SIG_PREFIX));
    char *p = line + strlen(SIG_PREFIX);
    to_hex(key->public_key.bytes, SIGN_PUBLIC_KEY_BYTES, p);
    p += 2 * SIGN_PUBLIC_KEY_BYTES;
    *p++ = ' ';
    to_hex(sig, SIGN_BYTES, p);
    p += 2 * SIGN_BYTES;
    *p++ = '\n';
    *p = '\0';
}

/* True when the SIGN_LINE_LEN bytes at p look like a signature line. */
static bool is_sig_line(const char *p)
{
    return memcmp(p, SIG_PREFIX, strlen(SIG_PREFIX)) == 0 && p[SIGN_LINE_LEN - 1] == '\n';
}

size_t sign_body_len(const char *text, size_t len, unsigned *count)
{
    size_t body = len;
    unsigned n = 0;
    /* Signature lines have a fixed length, so they are found from the end;
     * the one before must end a line. */
    while (body >= SIGN_LINE_LEN && is_sig_line(text + body - SIGN_LINE_LEN) &&
           (body == SIGN_LINE_LEN || text[body - SIGN_LINE_LEN - 1] == '\n')) {
        body -= SIGN_LINE_LEN;
        n++;
    }
    if (count)
        *count = n;
    return body;
}

int sign_verify(const struct sign_keyring *ring, const char *text, size_t len, size_t *body_len, char *err,
                size_t errlen)
{
    unsigned count;
    size_t body = sign_body_len(text, len, &count);
    if (count == 0) {
        snprintf(err, errlen, "it is not signed");
        return -EBADMSG;
    }
    bool any_trusted = false;
    for (unsigned i = 0; i < count; i++) {
        const char *line = text + body + (size_t)i * SIGN_LINE_LEN + strlen(SIG_PREFIX);
        struct sign_public_key key;
        uint8_t sig[SIGN_BYTES];
        if (from_hex(line, key.bytes, sizeof(key.bytes)) < 0 || line[2 * SIGN_PUBLIC_KEY_BYTES] != ' ' ||
            from_hex(line + 2 * SIGN_PUBLIC_KEY_BYTES + 1, sig, sizeof(sig)) < 0) {
            snprintf(err, errlen, "it has a malformed signature line");
            return -EBADMSG;
        }
        if (!sign_keyring_has(ring, &key))
            continue;
        any_trusted = true;
        if (crypto_sign_verify_detached(sig, (const unsigned char *)text, body, key.bytes) == 0) {
            *body_len = body;
            return 0;
        }
    }
    snprintf(err, errlen, any_trusted ? "its signature does not verify (altered after signing)"
                                      : "it is signed only by keys that are not in the trust file");
    return -EPERM;
}
