/* Unit tests for publish.c (with repo.c, image.c, manifest.c, chunkfmt.c):
 * publish a raw image into a new local repository, read it back through the
 * repository API and compare every byte; republish; refuse bad input. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "test_files.h"
#include "chunkfmt.h"
#include "hash.h"
#include "manifest.h"
#include "publish.h"
#include "repo.h"
#include "util.h"

#define CS PUBLISH_DEFAULT_CHUNK_SIZE
#define NCHUNKS 7
#define TAIL 12345 /* bytes in the last, partial chunk */
#define IMG_SIZE ((uint64_t)(NCHUNKS - 1) * CS + TAIL)

/* The source image, chunk by chunk:
 *   0: random
 *   1: all zeros                   (zero chunk)
 *   2: zeros, then random          (a zero run inside a chunk)
 *   3: compressible text
 *   4: all zeros                   (zero chunk)
 *   5: random, a zero run in the middle
 *   6: TAIL random bytes           (zero-padded in the repository) */
static unsigned char *make_image(void)
{
    unsigned char *img = calloc(1, IMG_SIZE);
    if (!img)
        abort();
    fill_random(img + 0 * CS, CS);
    fill_random(img + 2 * CS + CS / 2, CS / 2);
    for (size_t i = 0; i < CS; i++)
        img[3 * CS + i] = (unsigned char)"imgfs publishes images. "[i % 24];
    fill_random(img + 5 * CS, CS);
    memset(img + 5 * CS + 1000, 0, 100000);
    fill_random(img + 6 * CS, TAIL);
    return img;
}

static int write_whole(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return -1;
    int rc = write_full(fd, data, len);
    close(fd);
    return rc;
}

/* Reads version of name back from the repository and compares it with src. */
static void check_repo_content(const char *repo_path, const char *name, uint64_t version, const unsigned char *src,
                               uint64_t size, uint32_t cs, struct manifest **out_manifest)
{
    char err[512] = "";
    struct repo *repo = NULL;
    CHECK(repo_open(repo_path, &repo, err, sizeof(err)) == 0 && repo);
    if (!repo) {
        fprintf(stderr, "repo_open: %s\n", err);
        return;
    }
    CHECK(repo_is_local(repo));

    struct repo_index index = {0};
    CHECK(repo_read_index(repo, &index, err, sizeof(err)) == 0);
    const struct repo_index_entry *e = repo_index_find(&index, name);
    CHECK(e && e->latest == version);
    repo_index_free(&index);

    struct manifest *m = NULL;
    CHECK(repo_read_manifest(repo, name, version, &m, err, sizeof(err)) == 0 && m);
    if (!m) {
        fprintf(stderr, "repo_read_manifest: %s\n", err);
        repo_close(repo);
        return;
    }
    CHECK(strcmp(m->name, name) == 0);
    CHECK(m->version == version);
    CHECK(m->size == size);
    CHECK(m->chunk_size == cs);
    CHECK(m->chunk_count == (size + cs - 1) / cs);
    CHECK(strstr(m->source, "raw") != NULL);

    unsigned char *chunk = malloc(cs);
    unsigned char *want = malloc(cs);
    int mismatches = 0, errors = 0;
    for (uint64_t i = 0; i < m->chunk_count; i++) {
        uint64_t off = i * cs;
        size_t len = size - off < cs ? (size_t)(size - off) : cs;
        memset(want, 0, cs);
        memcpy(want, src + off, len);
        if (chunk_hash_is_null(&m->chunks[i])) {
            /* A zero chunk is not stored: its source must be all zeros. */
            mismatches += !buffer_is_zero(want, cs);
            continue;
        }
        char *enc = NULL;
        size_t enc_len = 0;
        if (repo_get_chunk(repo, &m->chunks[i], m->chunk_size, 0, &enc, &enc_len, NULL) != 0) {
            errors++;
            continue;
        }
        /* Decode into an exact-size buffer. */
        if (chunkfmt_decode(enc, enc_len, chunk, cs, &m->chunks[i]) != 0)
            errors++;
        else
            mismatches += memcmp(chunk, want, cs) != 0;
        free(enc);
    }
    CHECK(errors == 0);
    CHECK(mismatches == 0);
    free(chunk);
    free(want);
    repo_close(repo);
    if (out_manifest)
        *out_manifest = m;
    else
        manifest_free(m);
}

/* Counts stored chunk files (and temp files) under repo/chunks. */
static void count_chunk_files(const char *repo, int *chunks, int *temps)
{
    *chunks = *temps = 0;
    for (int i = 0; i < 256; i++) {
        char sub[PATH_MAX];
        path_join(sub, sizeof(sub), "%s/chunks/%02x", repo, i);
        DIR *d = opendir(sub);
        if (!d)
            continue;
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.')
                continue;
            if (strstr(e->d_name, ".tmp"))
                (*temps)++;
            else
                (*chunks)++;
        }
        closedir(d);
    }
}

static void test_publish(const char *tmp)
{
    char image_path[PATH_MAX], repo_path[PATH_MAX], path[PATH_MAX], err[512] = "";
    path_join(image_path, sizeof(image_path), "%s/disk.img", tmp);
    path_join(repo_path, sizeof(repo_path), "%s/repo", tmp);
    unsigned char *src = make_image();
    CHECK(write_whole(image_path, src, IMG_SIZE) == 0);

    struct publish_options opts = {
        .image_path = image_path,
        .repo_path = repo_path,
        .name = "debian12",
        .chunk_size = CS,
        .zstd_level = PUBLISH_DEFAULT_ZSTD_LEVEL,
    };
    struct publish_result r1;
    int rc = publish_image(&opts, &r1, err, sizeof(err));
    CHECK(rc == 0);
    if (rc) {
        fprintf(stderr, "publish_image: %s\n", err);
        free(src);
        return;
    }
    CHECK(r1.version == 1);
    CHECK(r1.size == IMG_SIZE);
    CHECK(strcmp(r1.format, "raw") == 0);
    CHECK(r1.bytes_read == IMG_SIZE);
    CHECK(r1.chunks_zero == 2);
    CHECK(r1.chunks_new == NCHUNKS - 2);
    CHECK(r1.chunks_reused == 0);
    CHECK(r1.bytes_stored > 0 && r1.bytes_stored < (NCHUNKS - 2) * (uint64_t)(CS + CHUNKFMT_HEADER_LEN));
    /* The stage times are measured, whatever they are: each stage that ran
     * took some time (the CPU seconds may round to 0 for so small an image). */
    CHECK(r1.read_seconds > 0 && r1.hash_seconds > 0 && r1.compress_seconds > 0 && r1.store_seconds > 0);
    CHECK(r1.worker_cpu_seconds >= 0);

    /* Repository layout. */
    struct stat st;
    path_join(path, sizeof(path), "%s/imgfs-repo", repo_path);
    CHECK(stat(path, &st) == 0 && S_ISREG(st.st_mode));
    path_join(path, sizeof(path), "%s/bases/debian12/1.manifest", repo_path);
    CHECK(stat(path, &st) == 0 && S_ISREG(st.st_mode));
    int chunk_files, temp_files;
    count_chunk_files(repo_path, &chunk_files, &temp_files);
    CHECK(chunk_files == NCHUNKS - 2);
    CHECK(temp_files == 0);

    struct manifest *m1 = NULL;
    check_repo_content(repo_path, "debian12", 1, src, IMG_SIZE, CS, &m1);
    CHECK(m1 && chunk_hash_is_null(&m1->chunks[1]) && chunk_hash_is_null(&m1->chunks[4]));
    CHECK(m1 && !chunk_hash_is_null(&m1->chunks[2]) && !chunk_hash_is_null(&m1->chunks[6]));

    /* The same image again: version 2, every chunk reused. */
    struct publish_result r2;
    rc = publish_image(&opts, &r2, err, sizeof(err));
    CHECK(rc == 0);
    if (rc)
        fprintf(stderr, "publish_image: %s\n", err);
    CHECK(r2.version == 2);
    CHECK(r2.chunks_new == 0);
    CHECK(r2.chunks_reused == r1.chunks_new);
    CHECK(r2.chunks_zero == r1.chunks_zero);
    CHECK(r2.bytes_stored == 0);
    CHECK(r2.compress_seconds == 0); /* nothing new to compress */
    count_chunk_files(repo_path, &chunk_files, &temp_files);
    CHECK(chunk_files == NCHUNKS - 2 && temp_files == 0);
    struct manifest *m2 = NULL;
    check_repo_content(repo_path, "debian12", 2, src, IMG_SIZE, CS, &m2);
    if (m1 && m2) {
        CHECK(m1->chunk_count == m2->chunk_count);
        int same = 1;
        for (uint64_t i = 0; i < m1->chunk_count && i < m2->chunk_count; i++)
            same &= chunk_hash_equal(&m1->chunks[i], &m2->chunks[i]);
        CHECK(same);
        CHECK(!chunk_hash_equal(&m1->id, &m2->id)); /* different versions */
    }
    manifest_free(m1);
    manifest_free(m2);

    /* Version 1 is still there and unchanged. */
    {
        struct repo *repo = NULL;
        CHECK(repo_open(repo_path, &repo, err, sizeof(err)) == 0);
        struct manifest *m = NULL;
        if (repo) {
            CHECK(repo_read_manifest(repo, "debian12", 1, &m, err, sizeof(err)) == 0 && m && m->version == 1);
            manifest_free(m);
            m = NULL;
            CHECK(repo_read_manifest(repo, "debian12", 3, &m, err, sizeof(err)) == -ENOENT && !m);
            CHECK(repo_read_manifest(repo, "../x", 1, &m, err, sizeof(err)) < 0 && !m);
            repo_close(repo);
        }
    }

    /* A second base, uncompressed, whose content changed in one chunk:
     * only that chunk is new. */
    unsigned char *orig = malloc(IMG_SIZE);
    if (!orig)
        abort();
    memcpy(orig, src, IMG_SIZE);
    src[3 * CS + 7] ^= 0x55;
    CHECK(write_whole(image_path, src, IMG_SIZE) == 0);
    opts.name = "debian12-raw";
    opts.zstd_level = 0;
    struct publish_result r3;
    rc = publish_image(&opts, &r3, err, sizeof(err));
    CHECK(rc == 0);
    if (rc)
        fprintf(stderr, "publish_image: %s\n", err);
    CHECK(r3.version == 1);
    CHECK(r3.chunks_new == 1 && r3.chunks_reused == r1.chunks_new - 1);
    CHECK(r3.bytes_stored == CS + CHUNKFMT_HEADER_LEN); /* stored raw */
    check_repo_content(repo_path, "debian12-raw", 1, src, IMG_SIZE, CS, NULL);
    /* Publishing another base did not touch the first one. */
    check_repo_content(repo_path, "debian12", 2, orig, IMG_SIZE, CS, NULL);
    free(orig);
    free(src);
}

static void expect_refused(const struct publish_options *opts, int want_rc, const char *what)
{
    struct publish_result r;
    char err[512] = "";
    int rc = publish_image(opts, &r, err, sizeof(err));
    if ((want_rc ? rc != want_rc : rc >= 0) || err[0] == '\0')
        fprintf(stderr, "%s: publish_image returned %d (%s)\n", what, rc, err);
    CHECK(want_rc ? rc == want_rc : rc < 0);
    CHECK(err[0] != '\0');
    CHECK(r.version == 0);
}

static void test_refusals(const char *tmp)
{
    char image_path[PATH_MAX], repo_path[PATH_MAX], path[PATH_MAX];
    path_join(image_path, sizeof(image_path), "%s/small.img", tmp);
    unsigned char data[8192];
    fill_random(data, sizeof(data));
    CHECK(write_whole(image_path, data, sizeof(data)) == 0);
    path_join(repo_path, sizeof(repo_path), "%s/repo2", tmp);

    struct publish_options opts = {
        .image_path = image_path,
        .repo_path = repo_path,
        .chunk_size = 4096,
        .zstd_level = 3,
    };
    static const char *bad_names[] = {"../x", "a/b", "", ".", "..", "-x", ".x", "a b", "x\n",
                                      "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"};
    for (size_t i = 0; i < sizeof(bad_names) / sizeof(bad_names[0]); i++) {
        opts.name = bad_names[i];
        expect_refused(&opts, -EINVAL, bad_names[i]);
    }
    /* Nothing was created for a refused name. */
    CHECK(access(repo_path, F_OK) != 0);

    opts.name = "ok";
    opts.chunk_size = 3000;
    expect_refused(&opts, -EINVAL, "chunk size 3000");
    opts.chunk_size = 2048;
    expect_refused(&opts, -EINVAL, "chunk size 2048");
    opts.chunk_size = 32u << 20;
    expect_refused(&opts, -EINVAL, "chunk size 32M");
    opts.chunk_size = 4096;

    /* A non-empty directory that is not a repository is left alone. */
    path_join(path, sizeof(path), "%s/notrepo", tmp);
    CHECK(mkdir(path, 0755) == 0);
    char junk[PATH_MAX];
    path_join(junk, sizeof(junk), "%s/precious.txt", path);
    CHECK(write_whole(junk, "keep me\n", 8) == 0);
    opts.repo_path = path;
    expect_refused(&opts, 0, "non-empty directory");
    CHECK(count_entries(path) == 1);
    char *text = NULL;
    size_t len = 0;
    CHECK(read_file(junk, 64, &text, &len) == 0 && len == 8 && memcmp(text, "keep me\n", 8) == 0);
    free(text);

    /* A repository path that is a regular file. */
    opts.repo_path = junk;
    expect_refused(&opts, 0, "repository is a file");

    /* An empty image, a missing image, a directory as image. */
    char empty[PATH_MAX];
    path_join(empty, sizeof(empty), "%s/empty.img", tmp);
    CHECK(write_whole(empty, "", 0) == 0);
    opts.repo_path = repo_path;
    opts.image_path = empty;
    expect_refused(&opts, 0, "empty image");
    path_join(path, sizeof(path), "%s/missing.img", tmp);
    opts.image_path = path;
    expect_refused(&opts, 0, "missing image");
    opts.image_path = tmp;
    expect_refused(&opts, 0, "directory as image");

    /* An empty existing directory becomes a repository. */
    path_join(path, sizeof(path), "%s/emptydir", tmp);
    CHECK(mkdir(path, 0755) == 0);
    opts.repo_path = path;
    opts.image_path = image_path;
    struct publish_result r;
    char err[512] = "";
    CHECK(publish_image(&opts, &r, err, sizeof(err)) == 0);
    CHECK(r.version == 1 && r.chunks_new == 2 && r.size == sizeof(data));
    check_repo_content(path, "ok", 1, data, sizeof(data), 4096, NULL);
}

int main(void)
{
    rng_state = 0x243f6a8885a308d3ull; /* this test's own sequence, as before */
    char tmp[] = "/tmp/imgfs-test-publish-XXXXXX";
    CHECK(mkdtemp(tmp) != NULL);
    test_publish(tmp);
    test_refusals(tmp);
    remove_tree(tmp);
    return check_summary();
}
