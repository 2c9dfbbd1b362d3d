/* sign and trust without a repository: keys and trust files, signature lines
 * (tampering, untrusted keys, several signers), the index sequence rule
 * (rollback refused, kept across a restart), the digest chain (history
 * rewrites refused) and the chunk digest table. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "sign.h"
#include "trust.h"
#include "util.h"

static char dir[] = "/tmp/imgfs-test-trust.XXXXXX";

static void test_keys(struct sign_secret_key *a, struct sign_secret_key *b, struct sign_keyring *ring_a)
{
    char path[256], err[512];
    snprintf(path, sizeof(path), "%s/a", dir);
    CHECK(sign_key_generate(path, "first", err, sizeof(err)) == 0);
    CHECK(sign_key_generate(path, NULL, err, sizeof(err)) == -EEXIST); /* never overwritten */
    struct stat st;
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600);
    CHECK(sign_key_load(path, a, err, sizeof(err)) == 0);
    char pub[300];
    snprintf(pub, sizeof(pub), "%s.pub", path);
    CHECK(sign_keyring_load(pub, ring_a, err, sizeof(err)) == 0 && ring_a->count == 1);
    CHECK(memcmp(ring_a->keys[0].bytes, a->public_key.bytes, SIGN_PUBLIC_KEY_BYTES) == 0);
    chmod(path, 0640);
    CHECK(sign_key_load(path, a, err, sizeof(err)) == -EPERM); /* readable by the group */
    chmod(path, 0600);
    snprintf(path, sizeof(path), "%s/b", dir);
    CHECK(sign_key_generate(path, NULL, err, sizeof(err)) == 0);
    CHECK(sign_key_load(path, b, err, sizeof(err)) == 0);

    struct sign_keyring ring;
    const char *bad[] = {"", "# only a comment\n", "imgfs-key ed25519 0123\n", "imgfs-key rsa 00\n",
                         "imgfs-key ed25519 ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\n"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK(sign_keyring_parse(bad[i], strlen(bad[i]), &ring, err, sizeof(err)) == -EBADMSG);
}

/* text + the signature lines of the given keys, in a static buffer. */
static const char *signed_text(const char *text, const struct sign_secret_key **keys, int n, size_t *len)
{
    static char buf[4096];
    size_t body = strlen(text);
    memcpy(buf, text, body);
    *len = body;
    for (int i = 0; i < n; i++) {
        sign_line(keys[i], buf, body, buf + *len);
        *len += SIGN_LINE_LEN;
    }
    return buf;
}

static void test_signatures(const struct sign_secret_key *a, const struct sign_secret_key *b,
                            const struct sign_keyring *ring_a)
{
    char err[256];
    size_t len, body;
    const struct sign_secret_key *just_a[] = {a}, *just_b[] = {b}, *both[] = {b, a};
    const char *text = signed_text("imgfs-index 1\nx 1\n", just_a, 1, &len);
    CHECK(sign_verify(ring_a, text, len, &body, err, sizeof(err)) == 0 && body == strlen("imgfs-index 1\nx 1\n"));
    char copy[4096];
    memcpy(copy, text, len);
    copy[14] = 'y'; /* the name in the body */
    CHECK(sign_verify(ring_a, copy, len, &body, err, sizeof(err)) == -EPERM);
    CHECK(strstr(err, "does not verify") != NULL);
    text = signed_text("imgfs-index 1\nx 1\n", just_b, 1, &len);
    CHECK(sign_verify(ring_a, text, len, &body, err, sizeof(err)) == -EPERM);
    CHECK(strstr(err, "not in the trust file") != NULL);
    text = signed_text("imgfs-index 1\nx 1\n", both, 2, &len); /* rotation: either key will do */
    CHECK(sign_verify(ring_a, text, len, &body, err, sizeof(err)) == 0);
    unsigned count;
    CHECK(sign_body_len(text, len, &count) == strlen("imgfs-index 1\nx 1\n") && count == 2);
    CHECK(sign_verify(ring_a, "imgfs-index 1\n", 14, &body, err, sizeof(err)) == -EBADMSG); /* unsigned */
    memcpy(copy, text, len);
    copy[len - 5] = 'X'; /* a malformed signature line */
    CHECK(sign_verify(ring_a, copy, len, &body, err, sizeof(err)) != 0);
}

static void test_sequence(const struct sign_keyring *ring)
{
    char state[256], err[512];
    snprintf(state, sizeof(state), "%s/trust-state", dir);
    struct trust *t;
    struct sign_digest d1, d2;
    sign_digest_compute("one", 3, &d1);
    sign_digest_compute("two", 3, &d2);
    CHECK(trust_create(TRUST_SIGNED, ring, state, 0, &t, err, sizeof(err)) == 0);
    CHECK(trust_accept_index(t, 5, 100, &d1, err, sizeof(err)) == 0);
    CHECK(trust_accept_index(t, 5, 100, &d1, err, sizeof(err)) == 0);       /* the same again */
    CHECK(trust_accept_index(t, 5, 100, &d2, err, sizeof(err)) == -ESTALE); /* same number, other text */
    CHECK(trust_accept_index(t, 4, 200, &d2, err, sizeof(err)) == -ESTALE); /* older */
    CHECK(trust_accept_index(t, 6, 200, &d2, err, sizeof(err)) == 0);
    trust_destroy(t);
    /* A restart remembers 6. */
    CHECK(trust_create(TRUST_SIGNED, ring, state, 0, &t, err, sizeof(err)) == 0);
    CHECK(trust_accept_index(t, 5, 300, &d1, err, sizeof(err)) == -ESTALE);
    struct trust_status st;
    trust_get_status(t, &st);
    CHECK(st.index_seq == 6 && st.mode == TRUST_SIGNED && st.keys == 1);
    trust_destroy(t);
    /* A damaged state file is not ignored. */
    CHECK(write_file_atomic(state, "junk\n", 5) == 0);
    CHECK(trust_create(TRUST_SIGNED, ring, state, 0, &t, err, sizeof(err)) == -EBADMSG);
}

static void test_chain_and_chunks(const struct sign_keyring *ring)
{
    char err[256];
    struct trust *t;
    CHECK(trust_create(TRUST_SIGNED, ring, NULL, 0, &t, err, sizeof(err)) == 0);
    struct sign_digest r3, r2, r1, other, got;
    sign_digest_compute("r3", 2, &r3);
    sign_digest_compute("r2", 2, &r2);
    sign_digest_compute("r1", 2, &r1);
    sign_digest_compute("other", 5, &other);
    trust_set_top(t, "x", 3, &r3);
    uint64_t low;
    CHECK(trust_lowest_known(t, "x", &low) == 0 && low == 3);
    CHECK(trust_expected(t, "x", 2, &got) == -ENOENT);
    CHECK(trust_learn_previous(t, "x", 3, &r2, err, sizeof(err)) == 0);
    CHECK(trust_expected(t, "x", 2, &got) == 0 && sign_digest_equal(&got, &r2));
    CHECK(trust_learn_previous(t, "x", 2, &r1, err, sizeof(err)) == 0);
    CHECK(trust_expected(t, "x", 1, &got) == 0 && sign_digest_equal(&got, &r1));
    /* A newer index: version 4 must lead back to the same version 3. */
    struct sign_digest r4;
    sign_digest_compute("r4", 2, &r4);
    trust_set_top(t, "x", 4, &r4);
    CHECK(trust_learn_previous(t, "x", 4, &other, err, sizeof(err)) == -EBADMSG);
    CHECK(strstr(err, "rewritten") != NULL);
    CHECK(trust_learn_previous(t, "x", 4, &r3, err, sizeof(err)) == 0);
    CHECK(trust_lowest_known(t, "nosuch", &low) == -ENOENT);

    /* The chunk table: a chunk is checked against the digest of its name. */
    struct manifest *m = manifest_new(2);
    snprintf(m->name, sizeof(m->name), "x");
    m->version = 1;
    m->chunk_count = 2;
    static char data[4096], bad[4096];
    memset(data, 7, sizeof(data));
    memset(bad, 8, sizeof(bad));
    chunk_hash_compute(data, sizeof(data), &m->chunks[0]);
    struct version_digests *d = digests_new(2);
    CHECK(d->chunk_alg == SIGN_DIGEST_SHA256); /* what new records use */
    CHECK(sign_digest_compute_alg(d->chunk_alg, data, sizeof(data), &d->chunks[0]) == 0);
    CHECK(trust_add_chunks(t, m, d, err, sizeof(err)) == 0);
    CHECK(trust_check_chunk(t, &m->chunks[0], data, sizeof(data)) == 0);
    CHECK(trust_check_chunk(t, &m->chunks[0], bad, sizeof(bad)) == -EBADMSG);
    struct chunk_hash unknown;
    chunk_hash_compute(bad, sizeof(bad), &unknown);
    CHECK(trust_check_chunk(t, &unknown, bad, sizeof(bad)) == -EBADMSG); /* no signed digest */
    d->chunks[0] = other; /* another version claiming another digest for the name */
    CHECK(trust_add_chunks(t, m, d, err, sizeof(err)) == -EBADMSG);
    struct trust_status st;
    trust_get_status(t, &st);
    CHECK(st.chunk_digests == 1 && st.chunks_refused == 2);

    /* The same name in an older (BLAKE2b) record: both digests must match. */
    struct version_digests *old = digests_new(2);
    old->chunk_alg = SIGN_DIGEST_BLAKE2B;
    sign_digest_compute(bad, sizeof(bad), &old->chunks[0]); /* other bytes under the old record */
    CHECK(trust_add_chunks(t, m, old, err, sizeof(err)) == 0); /* another table: not a conflict yet */
    CHECK(trust_check_chunk(t, &m->chunks[0], data, sizeof(data)) == -EBADMSG); /* SHA-256 fits, BLAKE2b not */
    CHECK(trust_check_chunk(t, &m->chunks[0], bad, sizeof(bad)) == -EBADMSG);  /* BLAKE2b fits, SHA-256 not */
    trust_destroy(t);
    CHECK(trust_create(TRUST_SIGNED, ring, NULL, 0, &t, err, sizeof(err)) == 0);
    sign_digest_compute(data, sizeof(data), &old->chunks[0]);
    CHECK(trust_add_chunks(t, m, old, err, sizeof(err)) == 0); /* only the old record */
    CHECK(trust_check_chunk(t, &m->chunks[0], data, sizeof(data)) == 0);
    CHECK(trust_check_chunk(t, &m->chunks[0], bad, sizeof(bad)) == -EBADMSG);
    CHECK(sign_digest_compute_alg(SIGN_DIGEST_SHA256, data, sizeof(data), &d->chunks[0]) == 0);
    CHECK(trust_add_chunks(t, m, d, err, sizeof(err)) == 0); /* and a new one, agreeing */
    CHECK(trust_check_chunk(t, &m->chunks[0], data, sizeof(data)) == 0);
    CHECK(trust_check_chunk(t, &m->chunks[0], bad, sizeof(bad)) == -EBADMSG);
    trust_get_status(t, &st);
    CHECK(st.chunk_digests == 2);
    digests_free(old);
    digests_free(d);
    manifest_free(m);
    trust_destroy(t);
    /* Unverified modes check nothing. */
    CHECK(trust_create(TRUST_INSECURE, NULL, NULL, 0, &t, err, sizeof(err)) == 0);
    CHECK(trust_check_chunk(t, &unknown, bad, sizeof(bad)) == 0);
    trust_destroy(t);
}

static void check_hex(enum sign_digest_alg alg, const char *data, const char *want)
{
    struct sign_digest got;
    char hex[SIGN_DIGEST_HEX + 1];
    CHECK(sign_digest_compute_alg(alg, data, strlen(data), &got) == 0);
    sign_digest_to_hex(&got, hex);
    CHECK(strcmp(hex, want) == 0);
}

/* Known answers (FIPS 180-2 and RFC 7693's "abc"), and the two record
 * versions: each parses, formats back to its own bytes, and names its
 * algorithm; other spellings are refused. */
static void test_digest_algorithms(void)
{
    check_hex(SIGN_DIGEST_SHA256, "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    check_hex(SIGN_DIGEST_BLAKE2B, "abc", "bddd813c634239723171ef3fee98579b94964e3bb1cb3e427262c8c068d52319");
    check_hex(SIGN_DIGEST_SHA256, "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");

    const char *hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    char v1[1024], v2[1024], bad[1024];
    snprintf(v1, sizeof(v1), "imgfs-digests 1\nbase x 2\nmanifest %s\nprevious %s\nchunks 2\n%s\n0\n", hex, hex, hex);
    snprintf(v2, sizeof(v2), "imgfs-digests 2\nbase x 2\nmanifest %s\nprevious %s\nchunk-digest sha256\nchunks 2\n%s\n0\n",
             hex, hex, hex);
    const char *texts[] = {v1, v2};
    const enum sign_digest_alg algs[] = {SIGN_DIGEST_BLAKE2B, SIGN_DIGEST_SHA256};
    char err[256];
    for (int i = 0; i < 2; i++) {
        struct version_digests *d = NULL;
        char *out = NULL;
        size_t len = 0;
        CHECK(digests_parse(texts[i], strlen(texts[i]), &d, err, sizeof(err)) == 0);
        CHECK(d && d->chunk_alg == algs[i] && d->chunk_count == 2);
        CHECK(d && digests_format(d, &out, &len) == 0 && len == strlen(texts[i]) && memcmp(out, texts[i], len) == 0);
        free(out);
        digests_free(d);
    }
    const char *wrong[] = {"chunk-digest blake2b", "chunk-digest sha512", "chunk-digest sha256 ", ""};
    for (size_t i = 0; i < sizeof(wrong) / sizeof(wrong[0]); i++) {
        struct version_digests *d = NULL;
        snprintf(bad, sizeof(bad), "imgfs-digests 2\nbase x 2\nmanifest %s\nprevious %s\n%s%schunks 2\n%s\n0\n", hex,
                 hex, wrong[i], wrong[i][0] ? "\n" : "", hex);
        CHECK(digests_parse(bad, strlen(bad), &d, err, sizeof(err)) == -EBADMSG && !d);
    }
    /* A version 1 record with an algorithm line is refused too. */
    struct version_digests *d = NULL;
    snprintf(bad, sizeof(bad), "imgfs-digests 1\nbase x 2\nmanifest %s\nprevious %s\nchunk-digest sha256\nchunks 2\n%s\n0\n",
             hex, hex, hex);
    CHECK(digests_parse(bad, strlen(bad), &d, err, sizeof(err)) == -EBADMSG && !d);
}

int main(void)
{
    if (sign_init() != 0 || !mkdtemp(dir))
        return 1;
    struct sign_secret_key a, b;
    struct sign_keyring ring_a;
    test_keys(&a, &b, &ring_a);
    test_signatures(&a, &b, &ring_a);
    test_sequence(&ring_a);
    test_chain_and_chunks(&ring_a);
    test_digest_algorithms();
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        return 1;
    return check_summary();
}
