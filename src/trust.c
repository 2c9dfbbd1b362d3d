#include "trust.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util.h"

#define STATE_HEADER "imgfs-trust-state 1\n"

/* The expected record digests of one base, from its newest version down:
 * expected[k] is for version top - k, for k < known. anchor is the newest
 * version (and digest) of an earlier accepted index, which the new chain must
 * reach unchanged. */
struct chain {
    char name[65];
    uint64_t top;
    struct sign_digest *expected;
    uint64_t known;
    uint64_t cap;
    uint64_t anchor_version; /* 0: none */
    struct sign_digest anchor;
};

struct table_slot {
    struct chunk_hash name; /* null: empty */
    struct sign_digest digest;
};

/* Open addressing, linear probing, load at most one half. */
struct chunk_table {
    struct table_slot *slots;
    size_t cap; /* a power of two, or 0 */
    size_t used;
};

struct trust {
    enum trust_mode mode;
    struct sign_keyring ring;
    char state_path[PATH_MAX];
    double max_index_age;

    pthread_mutex_t state_lock;
    uint64_t seq; /* newest accepted index */
    uint64_t signed_time;
    struct sign_digest body;
    bool stale_warned;
    struct chain *chains;
    size_t chain_count;
    uint64_t refusals;
    char last_refusal[256];
    uint64_t last_refusal_ns;

    pthread_rwlock_t table_lock;
    /* One table per chunk digest algorithm (records of version 1 and 2):
     * a chunk name in both has two signed digests, and both are checked. */
    struct chunk_table tables[SIGN_DIGEST_ALGS];
    atomic_uint_fast64_t chunks_refused;
};

const char *trust_mode_name(enum trust_mode mode)
{
    switch (mode) {
    case TRUST_SIGNED: return "signed";
    case TRUST_INSECURE: return "insecure";
    default: return "unsigned";
    }
}

static int load_state(struct trust *t, char *err, size_t errlen)
{
    char *data;
    size_t len;
    int rc = read_file(t->state_path, 4096, &data, &len);
    if (rc == -ENOENT)
        return 0;
    if (rc) {
        snprintf(err, errlen, "cannot read %s: %s", t->state_path, strerror(-rc));
        return rc;
    }
    char hex[SIGN_DIGEST_HEX + 1];
    int ok = len > strlen(STATE_HEADER) && memcmp(data, STATE_HEADER, strlen(STATE_HEADER)) == 0 &&
             sscanf(data + strlen(STATE_HEADER), "seq %" SCNu64 "\ntime %" SCNu64 "\nindex %64s", &t->seq,
                    &t->signed_time, hex) == 3 &&
             sign_digest_from_hex(hex, &t->body) == 0;
    free(data);
    if (!ok) {
        snprintf(err, errlen, "%s is damaged; it remembers the newest repository index this host accepted, "
                              "so it is not ignored (remove it to accept any signed index again)",
                 t->state_path);
        return -EBADMSG;
    }
    return 0;
}

static int save_state(struct trust *t)
{
    if (!t->state_path[0])
        return 0;
    char hex[SIGN_DIGEST_HEX + 1], text[256];
    sign_digest_to_hex(&t->body, hex);
    int n = snprintf(text, sizeof(text), STATE_HEADER "seq %" PRIu64 "\ntime %" PRIu64 "\nindex %s\n", t->seq,
                     t->signed_time, hex);
    return write_file_atomic(t->state_path, text, (size_t)n);
}

int trust_create(enum trust_mode mode, const struct sign_keyring *ring, const char *state_path,
                 double max_index_age, struct trust **out, char *err, size_t errlen)
{
    struct trust *t = calloc(1, sizeof(*t));
    if (!t) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    t->mode = mode;
    if (ring)
        t->ring = *ring;
    snprintf(t->state_path, sizeof(t->state_path), "%s", state_path ? state_path : "");
    t->max_index_age = max_index_age;
    pthread_mutex_init(&t->state_lock, NULL);
    pthread_rwlock_init(&t->table_lock, NULL);
    int rc = mode == TRUST_SIGNED && t->state_path[0] ? load_state(t, err, errlen) : 0;
    if (rc) {
        trust_destroy(t);
        return rc;
    }
    *out = t;
    return 0;
}

void trust_destroy(struct trust *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->chain_count; i++)
        free(t->chains[i].expected);
    free(t->chains);
    for (int a = 0; a < SIGN_DIGEST_ALGS; a++)
        free(t->tables[a].slots);
    pthread_mutex_destroy(&t->state_lock);
    pthread_rwlock_destroy(&t->table_lock);
    free(t);
}

enum trust_mode trust_mode(const struct trust *t) { return t->mode; }
const struct sign_keyring *trust_keyring(const struct trust *t) { return &t->ring; }

void trust_note_refusal(struct trust *t, const char *what)
{
    pthread_mutex_lock(&t->state_lock);
    bool repeated = strcmp(t->last_refusal, what) == 0;
    t->refusals++;
    snprintf(t->last_refusal, sizeof(t->last_refusal), "%s", what);
    t->last_refusal_ns = now_ns();
    pthread_mutex_unlock(&t->state_lock);
    if (!repeated)
        log_warn("refused: %s", what);
}

int trust_accept_index(struct trust *t, uint64_t seq, uint64_t signed_time, const struct sign_digest *body,
                       char *err, size_t errlen)
{
    int rc = 0;
    pthread_mutex_lock(&t->state_lock);
    if (seq < t->seq || (seq == t->seq && !sign_digest_equal(body, &t->body))) {
        snprintf(err, errlen,
                 "the repository index has sequence number %" PRIu64 ", but this host already accepted %" PRIu64
                 "%s (an older or replayed copy: keeping what it has)",
                 seq, t->seq, seq == t->seq ? " with other contents" : "");
        rc = -ESTALE;
    } else if (seq > t->seq) {
        uint64_t old_seq = t->seq, old_time = t->signed_time;
        struct sign_digest old_body = t->body;
        t->seq = seq;
        t->signed_time = signed_time;
        t->body = *body;
        rc = save_state(t);
        if (rc) {
            t->seq = old_seq, t->signed_time = old_time, t->body = old_body;
            snprintf(err, errlen, "cannot remember the accepted index in %s: %s", t->state_path, strerror(-rc));
        }
    }
    bool warn = false;
    double age = difftime(time(NULL), (time_t)t->signed_time);
    if (!rc && t->max_index_age > 0) {
        bool stale = age > t->max_index_age;
        warn = stale && !t->stale_warned;
        t->stale_warned = stale;
    }
    pthread_mutex_unlock(&t->state_lock);
    if (warn)
        log_warn("the repository index was signed %.0f s ago, more than max_index_age (%.0f s): the repository "
                 "is not being re-signed, or someone is holding back newer indexes",
                 age, t->max_index_age);
    return rc;
}

/* Called with state_lock held. */
static struct chain *find_chain(struct trust *t, const char *name)
{
    for (size_t i = 0; i < t->chain_count; i++)
        if (strcmp(t->chains[i].name, name) == 0)
            return &t->chains[i];
    return NULL;
}

void trust_set_top(struct trust *t, const char *name, uint64_t latest, const struct sign_digest *record)
{
    pthread_mutex_lock(&t->state_lock);
    struct chain *c = find_chain(t, name);
    if (!c) {
        struct chain *grown = realloc(t->chains, (t->chain_count + 1) * sizeof(*grown));
        if (!grown)
            goto out; /* the base stays unknown: its versions are refused */
        t->chains = grown;
        c = &t->chains[t->chain_count++];
        memset(c, 0, sizeof(*c));
        snprintf(c->name, sizeof(c->name), "%s", name);
    }
    if (c->known && c->top == latest && sign_digest_equal(&c->expected[0], record))
        goto out;
    if (c->known && c->top < latest) {
        c->anchor_version = c->top;
        c->anchor = c->expected[0];
    } else if (c->known) {
        c->anchor_version = 0; /* a newer signed index may retire versions */
    }
    if (!c->cap) {
        if (!(c->expected = malloc(16 * sizeof(*c->expected)))) {
            c->known = 0;
            goto out;
        }
        c->cap = 16;
    }
    c->top = latest;
    c->expected[0] = *record;
    c->known = 1;
out:
    pthread_mutex_unlock(&t->state_lock);
}

int trust_expected(struct trust *t, const char *name, uint64_t version, struct sign_digest *out)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&t->state_lock);
    struct chain *c = find_chain(t, name);
    if (c && c->known && version <= c->top && c->top - version < c->known) {
        *out = c->expected[c->top - version];
        rc = 0;
    }
    pthread_mutex_unlock(&t->state_lock);
    return rc;
}

int trust_lowest_known(struct trust *t, const char *name, uint64_t *version)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&t->state_lock);
    struct chain *c = find_chain(t, name);
    if (c && c->known) {
        *version = c->top - (c->known - 1);
        rc = 0;
    }
    pthread_mutex_unlock(&t->state_lock);
    return rc;
}

int trust_learn_previous(struct trust *t, const char *name, uint64_t version, const struct sign_digest *previous,
                         char *err, size_t errlen)
{
    int rc = 0;
    pthread_mutex_lock(&t->state_lock);
    struct chain *c = find_chain(t, name);
    /* Only the record of the lowest known version extends the chain. */
    bool next_link = c && c->known && version >= 2 && c->top - (c->known - 1) == version;
    if (next_link && version - 1 == c->anchor_version && !sign_digest_equal(previous, &c->anchor)) {
        snprintf(err, errlen, "the history of %s was rewritten: version %" PRIu64 " differs from the one accepted "
                              "before", name, version - 1);
        rc = -EBADMSG;
    } else if (next_link && c->known == c->cap) {
        struct sign_digest *grown = realloc(c->expected, 2 * c->cap * sizeof(*grown));
        if (grown) {
            c->expected = grown;
            c->cap *= 2;
        } else {
            snprintf(err, errlen, "out of memory");
            rc = -ENOMEM;
        }
    }
    if (!rc && next_link)
        c->expected[c->known++] = *previous;
    pthread_mutex_unlock(&t->state_lock);
    return rc;
}

/* ---- chunk table ----------------------------------------------------------- */

/* Called with table_lock held (any mode). */
static struct table_slot *find_slot(struct table_slot *slots, size_t cap, const struct chunk_hash *name)
{
    size_t mask = cap - 1;
    for (size_t i = (size_t)chunk_hash_bucket(name) & mask;; i = (i + 1) & mask)
        if (chunk_hash_is_null(&slots[i].name) || chunk_hash_equal(&slots[i].name, name))
            return &slots[i];
}

/* Called with table_lock held for writing: room for `more` entries in tb at
 * a load of at most one half. */
static int reserve(struct chunk_table *tb, uint64_t more)
{
    if (tb->cap && (tb->used + more) * 2 <= tb->cap)
        return 0;
    size_t cap = tb->cap ? tb->cap : 1024;
    while ((tb->used + more) * 2 > cap) {
        if (cap > SIZE_MAX / 2 / sizeof(struct table_slot))
            return -ENOMEM;
        cap *= 2;
    }
    struct table_slot *slots = calloc(cap, sizeof(*slots));
    if (!slots)
        return -ENOMEM;
    for (size_t i = 0; i < tb->cap; i++)
        if (!chunk_hash_is_null(&tb->slots[i].name))
            *find_slot(slots, cap, &tb->slots[i].name) = tb->slots[i];
    free(tb->slots);
    tb->slots = slots;
    tb->cap = cap;
    return 0;
}

int trust_add_chunks(struct trust *t, const struct manifest *m, const struct version_digests *d, char *err,
                     size_t errlen)
{
    if (t->mode != TRUST_SIGNED)
        return 0;
    int rc = 0;
    pthread_rwlock_wrlock(&t->table_lock);
    struct chunk_table *tb = &t->tables[d->chunk_alg];
    rc = reserve(tb, m->chunk_count);
    for (uint64_t i = 0; !rc && i < m->chunk_count; i++) {
        if (chunk_hash_is_null(&m->chunks[i]))
            continue;
        struct table_slot *s = find_slot(tb->slots, tb->cap, &m->chunks[i]);
        if (chunk_hash_is_null(&s->name)) {
            s->name = m->chunks[i];
            s->digest = d->chunks[i];
            tb->used++;
        } else if (!sign_digest_equal(&s->digest, &d->chunks[i])) {
            char hex[CHUNK_HASH_HEX + 1];
            chunk_hash_to_hex(&m->chunks[i], hex);
            snprintf(err, errlen, "chunk %s has two different signed digests (an xxh3-128 collision)", hex);
            rc = -EBADMSG;
        }
    }
    if (rc == -ENOMEM)
        snprintf(err, errlen, "out of memory for the chunk digests");
    pthread_rwlock_unlock(&t->table_lock);
    return rc;
}

bool trust_checks_chunks(const struct trust *t) { return t && t->mode == TRUST_SIGNED; }

int trust_check_chunk(struct trust *t, const struct chunk_hash *hash, const void *data, size_t len)
{
    if (!trust_checks_chunks(t))
        return 0;
    struct sign_digest want[SIGN_DIGEST_ALGS];
    bool found[SIGN_DIGEST_ALGS] = {false};
    pthread_rwlock_rdlock(&t->table_lock);
    for (int a = 0; a < SIGN_DIGEST_ALGS; a++) {
        const struct chunk_table *tb = &t->tables[a];
        if (!tb->cap)
            continue;
        const struct table_slot *s = find_slot(tb->slots, tb->cap, hash);
        if (!chunk_hash_is_null(&s->name)) {
            want[a] = s->digest;
            found[a] = true;
        }
    }
    pthread_rwlock_unlock(&t->table_lock);
    /* Every signed digest the name has must match: a name signed under both
     * algorithms (shared by versions with records of both kinds) could
     * otherwise stand for two different chunks, one per record. */
    int rc = -EBADMSG; /* no signed digest at all: refused */
    for (int a = 0; a < SIGN_DIGEST_ALGS; a++) {
        struct sign_digest got;
        if (!found[a])
            continue;
        rc = sign_digest_compute_alg((enum sign_digest_alg)a, data, len, &got);
        if (!rc && !sign_digest_equal(&got, &want[a]))
            rc = -EBADMSG;
        if (rc)
            break;
    }
    if (rc == -EBADMSG)
        atomic_fetch_add(&t->chunks_refused, 1);
    return rc;
}

void trust_get_status(struct trust *t, struct trust_status *out)
{
    memset(out, 0, sizeof(*out));
    out->mode = t->mode;
    out->keys = t->ring.count;
    out->max_index_age = t->max_index_age;
    pthread_mutex_lock(&t->state_lock);
    out->index_seq = t->seq;
    out->index_time = t->signed_time;
    out->index_refusals = t->refusals;
    snprintf(out->last_refusal, sizeof(out->last_refusal), "%s", t->last_refusal);
    out->last_refusal_age = t->last_refusal_ns ? (double)(now_ns() - t->last_refusal_ns) / 1e9 : -1;
    pthread_mutex_unlock(&t->state_lock);
    out->stale = t->max_index_age > 0 && t->signed_time &&
                 difftime(time(NULL), (time_t)t->signed_time) > t->max_index_age;
    pthread_rwlock_rdlock(&t->table_lock);
    for (int a = 0; a < SIGN_DIGEST_ALGS; a++)
        out->chunk_digests += t->tables[a].used;
    pthread_rwlock_unlock(&t->table_lock);
    out->chunks_refused = atomic_load(&t->chunks_refused);
}
