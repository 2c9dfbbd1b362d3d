/* Unit tests for the fast publish paths (publish.c, image.c, qcow2map.c):
 * for raw dense, raw sparse and qcow2 images (compressed clusters, zero
 * clusters, backing chains, v2 and v3, odd sizes), the manifest that
 * publish_image writes on 1 and on 3 threads is byte for byte the manifest
 * of the old sequential path (every chunk read through image_read, hashed
 * and encoded in order), and so is every stored chunk file. The image's
 * allocation map is checked against qemu-img's own reading of the image, and
 * a re-publish of an unchanged image writes nothing. A signed publish, whose
 * workers compute the chunk digests, writes the same repository files as an
 * unsigned publish signed afterwards (imgfsctl sign), which reads the chunks
 * back to digest them. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <libqcow.h>

#include "check.h"
#include "test_files.h"
#include "chunkfmt.h"
#include "hash.h"
#include "image.h"
#include "manifest.h"
#include "publish.h"
#include "qcow2map.h"
#include "repo.h"
#include "repo_publish.h"
#include "sign.h"
#include "util.h"

#define CS PUBLISH_DEFAULT_CHUNK_SIZE
#define CREATED 1790000000u

static char tmp[] = "/tmp/imgfs-test-publish-paths-XXXXXX";

static int run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int run(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    if (rc != 0)
        fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
    return rc;
}

/* Writes len bytes at off: random when fill < 0, else that byte value. */
static void put(const char *path, uint64_t off, size_t len, int fill)
{
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    unsigned char *buf = malloc(len);
    if (fd < 0 || !buf)
        abort();
    if (fill < 0)
        fill_random(buf, len);
    else
        memset(buf, fill, len);
    CHECK(write_full_at(fd, buf, len, (off_t)off) == 0);
    free(buf);
    close(fd);
}

static void make_sized(const char *path, uint64_t size)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0 && ftruncate(fd, (off_t)size) == 0);
    close(fd);
}

/* The manifest of the old, sequential publish: every chunk read in order
 * through image_read (of data_path, the image itself or qemu-img's raw
 * reading of it), zero chunks marked, the rest hashed. */
static struct manifest *reference_manifest(const char *image_path, const char *data_path, uint32_t cs)
{
    char err[512];
    struct image *img = NULL, *data_img = NULL;
    CHECK(image_open(image_path, &img, err, sizeof(err)) == 0);
    CHECK(image_open(data_path, &data_img, err, sizeof(err)) == 0);
    if (!img || !data_img) {
        fprintf(stderr, "image_open: %s\n", err);
        image_close(img);
        image_close(data_img);
        return NULL;
    }
    uint64_t size = image_size(img);
    CHECK(image_size(data_img) == size);
    struct manifest *m = manifest_new((size + cs - 1) / cs);
    unsigned char *data = malloc(cs);
    if (!m || !data)
        abort();
    snprintf(m->name, sizeof(m->name), "img");
    m->version = 1;
    m->size = size;
    m->chunk_size = cs;
    m->created = CREATED;
    const char *base = strrchr(image_path, '/');
    snprintf(m->source, sizeof(m->source), "%s %s", base ? base + 1 : image_path, image_format(img));
    for (uint64_t i = 0; i < m->chunk_count; i++) {
        uint64_t off = i * cs;
        size_t len = size - off < cs ? (size_t)(size - off) : cs;
        memset(data, 0, cs);
        CHECK(image_read(data_img, data, len, off) == 0);
        if (!buffer_is_zero(data, cs))
            chunk_hash_compute(data, cs, &m->chunks[i]);
    }
    free(data);
    image_close(img);
    image_close(data_img);
    return m;
}

/* The old path for a single qcow2 file: libqcow reads the whole disk.
 * True when its chunks hash as ref's. */
static bool libqcow_agrees(const struct manifest *m, const char *qcow_path)
{
    libqcow_file_t *file = NULL;
    if (libqcow_file_initialize(&file, NULL) != 1)
        return false;
    bool same = libqcow_file_open(file, qcow_path, LIBQCOW_OPEN_READ, NULL) == 1;
    unsigned char *data = malloc(m->chunk_size);
    for (uint64_t i = 0; same && data && i < m->chunk_count; i++) {
        memset(data, 0, m->chunk_size);
        uint64_t off = i * m->chunk_size;
        size_t len = m->size - off < m->chunk_size ? (size_t)(m->size - off) : m->chunk_size;
        same = libqcow_file_read_buffer_at_offset(file, data, len, (off64_t)off, NULL) == (ssize_t)len;
        struct chunk_hash h = {{0}};
        if (!buffer_is_zero(data, m->chunk_size))
            chunk_hash_compute(data, m->chunk_size, &h);
        if (same && !chunk_hash_equal(&h, &m->chunks[i])) {
            fprintf(stderr, "chunk %" PRIu64 " read by libqcow differs\n", i);
            same = false;
        }
    }
    free(data);
    libqcow_file_close(file, NULL);
    libqcow_file_free(&file, NULL);
    return same;
}

/* Every byte that the allocation map of image_path calls a hole reads as
 * zeros in data_path, and the map's data adds up to *data_bytes. */
static void check_map_against_reads(const char *image_path, const char *data_path, uint64_t *data_bytes)
{
    char err[512];
    struct image *img = NULL, *data_img = NULL;
    *data_bytes = 0;
    if (image_open(image_path, &img, err, sizeof(err)) != 0)
        return;
    if (image_open(data_path, &data_img, err, sizeof(err)) != 0) {
        image_close(img);
        return;
    }
    uint64_t size = image_size(img), at = 0, start, end;
    size_t buf_len = 1 << 20;
    unsigned char *buf = malloc(buf_len);
    int nonzero_holes = 0;
    for (;;) {
        int rc = image_next_data(img, at, &start, &end);
        uint64_t hole_end = rc == 0 ? start : size;
        for (uint64_t off = at; off < hole_end; off += buf_len) {
            size_t n = hole_end - off < buf_len ? (size_t)(hole_end - off) : buf_len;
            CHECK(image_read(data_img, buf, n, off) == 0);
            nonzero_holes += !buffer_is_zero(buf, n);
        }
        if (rc != 0)
            break;
        CHECK(start >= at && end > start && end <= size);
        *data_bytes += end - start;
        at = end;
    }
    CHECK(nonzero_holes == 0);
    free(buf);
    image_close(img);
    image_close(data_img);
}

/* A sorted listing of the chunk files with inode, size and mtime: equal
 * listings mean that nothing was written. */
static char *chunk_listing(const char *repo)
{
    char cmd[PATH_MAX + 128], *out = NULL;
    snprintf(cmd, sizeof(cmd), "find '%s/chunks' -printf '%%p %%i %%s %%T@\\n' | sort", repo);
    FILE *f = popen(cmd, "r");
    size_t len = 0;
    if (f) {
        FILE *mem = open_memstream(&out, &len);
        char line[PATH_MAX + 128];
        while (fgets(line, sizeof(line), f))
            fputs(line, mem);
        fclose(mem);
        pclose(f);
    }
    return out;
}

static struct sign_secret_key signing_key;

static int publish_signed(const char *image_path, const char *repo, uint32_t cs, unsigned threads,
                          const struct sign_secret_key *key, struct publish_result *r)
{
    struct publish_options opts = {
        .image_path = image_path,
        .repo_path = repo,
        .name = "img",
        .chunk_size = cs,
        .zstd_level = PUBLISH_DEFAULT_ZSTD_LEVEL,
        .threads = threads,
        .created = CREATED,
        .keys = key,
        .key_count = key ? 1 : 0,
    };
    char err[512] = "";
    int rc = publish_image(&opts, r, err, sizeof(err));
    if (rc)
        fprintf(stderr, "publish_image %s: %s\n", image_path, err);
    return rc;
}

static int publish_into(const char *image_path, const char *repo, uint32_t cs, unsigned threads,
                        struct publish_result *r)
{
    return publish_signed(image_path, repo, cs, threads, NULL, r);
}

/* The index of repo up to its "+seq" line: the part that does not depend on
 * when it was signed. */
static char *index_body(const char *repo)
{
    char path[PATH_MAX], *text = NULL;
    size_t len = 0;
    path_join(path, sizeof(path), "%s/index", repo);
    if (read_file(path, REPO_MAX_INDEX_LEN, &text, &len) != 0)
        return NULL;
    char *seq = strstr(text, "\n+seq ");
    if (seq)
        seq[1] = '\0';
    return text;
}

/* What `imgfsctl sign REPO` does: every version's record from the chunks
 * read back, and a signed index. */
static int sign_afterwards(const char *repo_path)
{
    char err[512];
    struct repo *repo;
    struct repo_index index = {0};
    int rc = repo_open(repo_path, &repo, err, sizeof(err));
    if (rc)
        return rc;
    repo_set_signers(repo, &signing_key, 1);
    rc = repo_read_index(repo, &index, err, sizeof(err));
    if (!rc)
        rc = repo_write_index(repo, &index);
    repo_index_free(&index);
    repo_close(repo);
    return rc;
}

/* Publishes first then second (versions 1 and 2) signed, on 1 and 3
 * threads, and unsigned then signed afterwards: every file but the index's
 * time and signature lines is the same. Then a version 3 of second over a
 * damaged chunk file: its record holds the digest of the image's bytes (the
 * workers'), which is what a host checks the damaged file against. */
static void check_signed(const char *label, const char *first, const char *second)
{
    static int case_no;
    case_no++;
    char after[PATH_MAX];
    path_join(after, sizeof(after), "%s/signed-%d-after", tmp, case_no);
    struct publish_result r;
    CHECK(publish_into(first, after, CS, 2, &r) == 0 && publish_into(second, after, CS, 2, &r) == 0);
    CHECK(sign_afterwards(after) == 0);
    char *want = index_body(after);
    CHECK(want != NULL);
    unsigned thread_counts[] = {1, 3};
    for (size_t t = 0; t < ARRAY_LEN(thread_counts); t++) {
        char repo[PATH_MAX];
        path_join(repo, sizeof(repo), "%s/signed-%d-%u", tmp, case_no, thread_counts[t]);
        CHECK(publish_signed(first, repo, CS, thread_counts[t], &signing_key, &r) == 0 && r.version == 1);
        CHECK(publish_signed(second, repo, CS, thread_counts[t], &signing_key, &r) == 0 && r.version == 2);
        CHECK(run("diff -r --exclude=index '%s' '%s'", after, repo) == 0);
        char *got = index_body(repo);
        CHECK(want && got && strcmp(want, got) == 0 && strstr(got, "\nimg 2 ") != NULL);
        free(got);
    }
    free(want);

    /* Damage one chunk file of version 2 (the first data chunk's), then
     * publish second again. */
    char repo[PATH_MAX], path[PATH_MAX], rel[64];
    path_join(repo, sizeof(repo), "%s/signed-%d-3", tmp, case_no);
    struct manifest *m = NULL;
    char *text = NULL, *record = NULL, err[512];
    size_t len = 0, record_len = 0;
    path_join(path, sizeof(path), "%s/bases/img/2.manifest", repo);
    CHECK(read_file(path, REPO_MAX_MANIFEST_LEN, &text, &len) == 0 &&
          manifest_parse(text, len, &m, err, sizeof(err)) == 0);
    uint64_t i = 0;
    while (m && i < m->chunk_count && chunk_hash_is_null(&m->chunks[i]))
        i++;
    if (m && i < m->chunk_count) {
        repo_chunk_relpath(&m->chunks[i], rel, sizeof(rel));
        CHECK(run("truncate -s 10 '%s/%s'", repo, rel) == 0);
        CHECK(publish_signed(second, repo, CS, 3, &signing_key, &r) == 0 && r.version == 3 && r.chunks_new == 0);
        free(text);
        text = NULL;
        path_join(path, sizeof(path), "%s/bases/img/2.digests", repo);
        CHECK(read_file(path, REPO_MAX_DIGESTS_LEN, &text, &len) == 0);
        path_join(path, sizeof(path), "%s/bases/img/3.digests", repo);
        CHECK(read_file(path, REPO_MAX_DIGESTS_LEN, &record, &record_len) == 0);
        /* The chunk lines (after "chunks N") of versions 2 and 3 agree. */
        const char *a = text ? strstr(text, "\nchunks ") : NULL;
        const char *b = record ? strstr(record, "\nchunks ") : NULL;
        CHECK(a && b && strcmp(a, b) == 0);
    } else {
        CHECK(!"second has no data chunk");
    }
    printf("%s: signed publish, same files as signing afterwards\n", label);
    free(text);
    free(record);
    manifest_free(m);
}

/* Publishes image_path on 1 and 3 threads and compares with the old path:
 * every chunk read in order, hashed and encoded. For a qcow2 image the data
 * is qemu-img's raw conversion raw_truth, and for a single qcow2 file the
 * old path's reading through libqcow must agree with it. In a backing chain
 * libqcow read wrongly (it ignores the zero flag of a cluster over backing
 * data, misreads compressed clusters of a backing file and spins at the end
 * of a backing file smaller than the top), so there qemu-img's reading alone
 * is the reference. */
static void check_image(const char *label, const char *image_path, const char *raw_truth, uint32_t cs,
                        bool expect_skips, bool single_qcow2)
{
    static int case_no;
    case_no++;
    const char *data_path = raw_truth ? raw_truth : image_path;
    struct manifest *ref = reference_manifest(image_path, data_path, cs);
    if (!ref)
        return;
    if (single_qcow2)
        CHECK(libqcow_agrees(ref, image_path));
    char *ref_text = NULL;
    size_t ref_len = 0;
    CHECK(manifest_format(ref, &ref_text, &ref_len) == 0);

    uint64_t data_bytes = 0;
    check_map_against_reads(image_path, data_path, &data_bytes);
    if (expect_skips)
        CHECK(data_bytes < ref->size / 2);

    unsigned thread_counts[] = {1, 3};
    for (size_t t = 0; t < ARRAY_LEN(thread_counts); t++) {
        char repo[PATH_MAX], path[PATH_MAX];
        path_join(repo, sizeof(repo), "%s/repo-%d-%u", tmp, case_no, thread_counts[t]);
        struct publish_result r;
        if (publish_into(image_path, repo, cs, thread_counts[t], &r) != 0) {
            CHECK(!"publish failed");
            continue;
        }
        CHECK(r.version == 1 && r.threads == thread_counts[t]);
        CHECK(r.bytes_read == data_bytes);
        CHECK(r.bytes_read + r.bytes_unallocated == ref->size);
        CHECK(r.chunks_new + r.chunks_reused + r.chunks_zero == ref->chunk_count);

        /* The manifest, byte for byte. */
        char *text = NULL;
        size_t len = 0;
        path_join(path, sizeof(path), "%s/bases/img/1.manifest", repo);
        CHECK(read_file(path, REPO_MAX_MANIFEST_LEN, &text, &len) == 0);
        bool same = text && len == ref_len && memcmp(text, ref_text, len) == 0;
        if (!same)
            fprintf(stderr, "%s, %u threads: the manifest differs from the old path's\n", label,
                    thread_counts[t]);
        CHECK(same);
        free(text);

        /* Every stored chunk is what the old path's encoder makes of it. */
        struct image *img = NULL;
        char err[512];
        CHECK(image_open(data_path, &img, err, sizeof(err)) == 0);
        unsigned char *data = malloc(cs);
        size_t enc_cap = chunkfmt_bound(cs);
        char *enc = malloc(enc_cap);
        int bad = 0;
        uint64_t distinct = 0;
        for (uint64_t i = 0; img && i < ref->chunk_count; i++) {
            if (chunk_hash_is_null(&ref->chunks[i]))
                continue;
            uint64_t off = i * cs;
            size_t n = ref->size - off < cs ? (size_t)(ref->size - off) : cs;
            memset(data, 0, cs);
            CHECK(image_read(img, data, n, off) == 0);
            long want = chunkfmt_encode(data, cs, PUBLISH_DEFAULT_ZSTD_LEVEL, enc, enc_cap);
            char rel[64], *stored = NULL;
            size_t stored_len = 0;
            repo_chunk_relpath(&ref->chunks[i], rel, sizeof(rel));
            path_join(path, sizeof(path), "%s/%s", repo, rel);
            bad += read_file(path, MANIFEST_MAX_CHUNK_SIZE * 2, &stored, &stored_len) != 0 ||
                   stored_len != (size_t)want || memcmp(stored, enc, stored_len) != 0;
            free(stored);
            bool first = true;
            for (uint64_t k = 0; k < i && first; k++)
                first = !chunk_hash_equal(&ref->chunks[k], &ref->chunks[i]);
            distinct += first;
        }
        CHECK(bad == 0);
        CHECK(r.chunks_new == distinct);
        free(data);
        free(enc);
        image_close(img);

        /* Unchanged re-publish: reads and hashes, writes no chunk. */
        if (t == 0) {
            char *before = chunk_listing(repo);
            struct publish_result again;
            CHECK(publish_into(image_path, repo, cs, 2, &again) == 0);
            char *after = chunk_listing(repo);
            CHECK(before && after && strcmp(before, after) == 0);
            CHECK(again.version == 2 && again.chunks_new == 0 && again.bytes_stored == 0);
            CHECK(again.chunks_reused == r.chunks_new + r.chunks_reused);
            CHECK(again.bytes_read == r.bytes_read);
            free(before);
            free(after);
        }
    }
    printf("%s: %" PRIu64 " chunks, %" PRIu64 " data bytes of %" PRIu64 "\n", label, ref->chunk_count, data_bytes,
           ref->size);
    free(ref_text);
    manifest_free(ref);
}

static void path_in(char *out, const char *name) { path_join(out, PATH_MAX, "%s/%s", tmp, name); }

static void test_raw(void)
{
    char dense[PATH_MAX], sparse[PATH_MAX];
    path_in(dense, "dense.raw");
    path_in(sparse, "sparse.raw");

    /* Dense, not chunk-aligned: random, text, zero and repeated chunks. */
    uint64_t size = 9 * (uint64_t)CS + 12345;
    put(dense, 0, (size_t)size, 0);
    put(dense, 0, CS, -1);
    put(dense, 2 * CS + 100, CS, -1);
    for (int i = 0; i < 3; i++)
        put(dense, 4 * CS + (uint64_t)i * CS, CS, 'x'); /* three equal chunks */
    put(dense, size - 12345, 12345, -1);
    check_image("raw dense", dense, NULL, CS, false, false);
    check_image("raw dense, 4K chunks", dense, NULL, 4096, false, false);

    /* Sparse: data that crosses chunk borders, data in the partial last
     * chunk, and written zeros (allocated, but a zero chunk). */
    size = 300 * (uint64_t)CS + 777;
    make_sized(sparse, size);
    put(sparse, 0, 4096, -1);
    put(sparse, 3 * CS + 1000, 5000, -1);
    put(sparse, 10 * CS - 100, 300, -1);
    put(sparse, 40 * CS, 2 * CS, -1);
    put(sparse, 80 * CS, CS, 0);
    put(sparse, 120 * CS + 5, 3 * CS, 'y');
    put(sparse, size - 500, 500, -1);
    check_image("raw sparse", sparse, NULL, CS, true, false);
    check_image("raw sparse, 1M chunks", sparse, NULL, 1u << 20, true, false);
    check_signed("raw dense, then sparse", dense, sparse);
}

static void test_qcow2(void)
{
    char sparse[PATH_MAX], q[PATH_MAX], truth[PATH_MAX], base[PATH_MAX], mid[PATH_MAX], top[PATH_MAX];
    path_in(sparse, "sparse.raw");
    path_in(truth, "truth.raw");

    path_in(q, "plain.qcow2");
    if (run("qemu-img convert -q -f raw -O qcow2 '%s' '%s' && qemu-img convert -q -O raw '%s' '%s'", sparse, q,
            q, truth) == 0)
        check_image("qcow2", q, truth, CS, true, true);

    path_in(q, "compressed.qcow2");
    if (run("qemu-img convert -q -c -f raw -O qcow2 '%s' '%s' && qemu-img convert -q -O raw '%s' '%s'", sparse,
            q, q, truth) == 0)
        check_image("qcow2 compressed", q, truth, CS, true, true);

    path_in(q, "v2-4k.qcow2");
    if (run("qemu-img convert -q -f raw -O qcow2 -o compat=0.10,cluster_size=4096 '%s' '%s' && "
            "qemu-img convert -q -O raw '%s' '%s'",
            sparse, q, q, truth) == 0)
        check_image("qcow2 v2, 4K clusters", q, truth, CS, true, true);

    path_in(q, "2m.qcow2");
    if (run("qemu-img convert -q -f raw -O qcow2 -o cluster_size=2M '%s' '%s' && "
            "qemu-img convert -q -O raw '%s' '%s'",
            sparse, q, q, truth) == 0)
        check_image("qcow2 2M clusters, 64K chunks", q, truth, 64 * 1024, true, true);

    /* qcow version 1: no map is read, every byte goes through libqcow. */
    path_in(q, "v1.qcow");
    if (run("qemu-img convert -q -f raw -O qcow '%s' '%s' && qemu-img convert -q -O raw '%s' '%s'", sparse, q, q,
            truth) == 0) {
        char err[512];
        struct image *img = NULL;
        CHECK(image_open(q, &img, err, sizeof(err)) == 0 && strcmp(image_map_source(img), "none") == 0);
        image_close(img);
        check_image("qcow v1, read whole", q, truth, CS, false, true);
    }

    /* Preallocated metadata (every cluster has a host offset, reading as
     * zeros), data, and zero-flag clusters that keep their host cluster over
     * data that was written there before: libqcow (the old path) returns
     * that stale data; qemu and the new path read zeros. */
    path_in(q, "prealloc.qcow2");
    if (run("qemu-img create -q -f qcow2 -o preallocation=metadata '%s' %u >/dev/null && "
            "qemu-io -f qcow2 -c 'write -P 0x44 %u 200k' -c 'write -z %u 64k' -c 'write -P 0x45 %u 64k' '%s' "
            ">/dev/null && qemu-img convert -q -O raw '%s' '%s'",
            q, 64 * CS, 3 * CS, 3 * CS, 40 * CS + 4096, q, q, truth) == 0)
        check_image("qcow2 preallocated, zero clusters over data", q, truth, CS, false, false);

    /* Chains of three: data, compressed clusters and (the second) zero
     * clusters over backing data and a top larger than its backing files,
     * which the old path read wrongly or not at all. */
    path_in(base, "base.qcow2");
    path_in(mid, "mid.qcow2");
    uint64_t sparse_size = 300 * (uint64_t)CS + 777;
    uint64_t sizes[] = {sparse_size, 400 * (uint64_t)CS + 4097};
    for (int i = 0; i < 2; i++) {
        char zero_mid[64] = "", zero_top[64] = "", name[32];
        if (i) {
            snprintf(zero_mid, sizeof(zero_mid), "-c 'write -z %u %u'", 40 * CS, CS);
            snprintf(zero_top, sizeof(zero_top), "-c 'write -z 0 64k'");
        }
        snprintf(name, sizeof(name), "top%d.qcow2", i);
        path_in(top, name);
        if (run("qemu-img convert -q -f raw -O qcow2 '%s' '%s'", sparse, base) == 0 &&
            run("qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' >/dev/null && "
                "qemu-io -f qcow2 -c 'write -P 0x5a 1M 100k' %s -c 'write -c -P 0x11 0 64k' '%s' >/dev/null",
                base, mid, zero_mid, mid) == 0 &&
            run("qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' %" PRIu64 " >/dev/null && "
                "qemu-io -f qcow2 -c 'write -P 0x77 %u 64k' %s -c 'write -P 0x33 %" PRIu64 " 4097' '%s' "
                ">/dev/null && qemu-img convert -q -O raw '%s' '%s'",
                mid, top, sizes[i], 120 * CS, zero_top, sizes[i] - 4097, top, top, truth) == 0)
            check_image(i ? "qcow2 chain of 3, zero clusters, top larger" : "qcow2 chain of 3", top, truth, CS,
                        true, false);
    }
}

/* qcow2map on its own: states of a small image, and refusals. */
static void test_qcow2map(void)
{
    char q[PATH_MAX], junk[PATH_MAX];
    path_in(q, "map.qcow2");
    if (run("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -f qcow2 -c 'write 64k 64k' -c 'write -z 256k 64k' "
            "-c 'write -c 512k 64k' '%s' >/dev/null",
            q, q) != 0)
        return;
    struct qcow2map map;
    CHECK(qcow2map_read(q, &map) == 0);
    static const struct {
        uint64_t start, end;
        enum qcow2map_state state;
    } want[] = {
        {0, 64 << 10, QCOW2MAP_UNALLOCATED},        {64 << 10, 128 << 10, QCOW2MAP_DATA},
        {128 << 10, 256 << 10, QCOW2MAP_UNALLOCATED}, {256 << 10, 320 << 10, QCOW2MAP_ZERO},
        {320 << 10, 512 << 10, QCOW2MAP_UNALLOCATED}, {512 << 10, 576 << 10, QCOW2MAP_DATA},
        {576 << 10, 1 << 20, QCOW2MAP_UNALLOCATED},
    };
    CHECK(map.size == 1 << 20 && map.count == ARRAY_LEN(want));
    for (size_t i = 0; i < map.count && i < ARRAY_LEN(want); i++)
        CHECK(map.runs[i].start == want[i].start && map.runs[i].end == want[i].end &&
              map.runs[i].state == want[i].state);
    /* Over no backing file, unallocated reads as zeros. */
    struct qcow2map none = {0}, seen;
    CHECK(qcow2map_overlay(&map, &none, &seen) == 0);
    CHECK(seen.count == 5 && seen.runs[0].state == QCOW2MAP_ZERO && seen.runs[1].state == QCOW2MAP_DATA);
    qcow2map_free(&seen);
    qcow2map_free(&map);

    /* A truncated image (tables cut off) and a file that is not qcow2. */
    path_in(junk, "cut.qcow2");
    if (run("head -c 70000 '%s' > '%s'", q, junk) == 0)
        CHECK(qcow2map_read(junk, &map) == -EBADMSG);
    path_in(junk, "dense.raw");
    CHECK(qcow2map_read(junk, &map) == -EBADMSG);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    CHECK(mkdtemp(tmp) != NULL);
    char key_path[PATH_MAX], err[512];
    path_in(key_path, "key");
    CHECK(sign_init() == 0 && sign_key_generate(key_path, NULL, err, sizeof(err)) == 0 &&
          sign_key_load(key_path, &signing_key, err, sizeof(err)) == 0);
    test_raw();
    test_qcow2();
    test_qcow2map();
    remove_tree(tmp);
    return check_summary();
}
