/* Unit tests for extmap.c: build real ext2/ext4 filesystems with mke2fs -d
 * (bare, in MBR primary and logical partitions, in GPT next to a FAT and a
 * second ext partition), publish them, map file paths to chunks through the
 * repository, and compare with where the files' bytes really are: every
 * block of every source file is looked up by content in the disk image, so
 * the expectation does not depend on libext2fs at all. Then the refusals:
 * no ext filesystem, no paths, missing paths, unreadable or damaged disks. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "chunkfmt.h"
#include "extmap.h"
#include "hash.h"
#include "list.h"
#include "manifest.h"
#include "publish.h"
#include "repo.h"
#include "util.h"
#include "test_files.h"

#define KiB 1024u
#define MiB (1024u * 1024u)

static char tmp[PATH_MAX];
static char src_dir[PATH_MAX];
static char repo_path[PATH_MAX];

/* ---- the source files ---- */

struct tfile {
    const char *path;   /* inside the filesystem */
    size_t size;
    size_t hole_at, hole_len; /* a run of zeros (mke2fs -d leaves it a hole) */
    unsigned char *data;
};

static struct tfile files[] = {
    {"/a.bin", 300 * KiB, 0, 0, NULL},
    {"/nested/dir/b.bin", 1 * MiB, 0, 0, NULL},
    {"/c.txt", 5 * KiB, 0, 0, NULL},
    {"/with space/d e.bin", 20 * KiB, 0, 0, NULL},
    {"/sparse.bin", 64 * KiB + 1 * MiB + 64 * KiB, 64 * KiB, 1 * MiB, NULL},
    {"/empty", 0, 0, 0, NULL},
};
#define NFILES (sizeof(files) / sizeof(files[0]))

/* The paths as a readahead list would give them: counts, comments, blank
 * lines, a relative path, and things that are skipped with a warning. */
static const char *paths_text = "# boot files\n"
                                "/a.bin 12\n"
                                "nested/dir/b.bin\n"
                                "   /c.txt\t3\n"
                                "\n"
                                "/with space/d e.bin 7\n"
                                "/sparse.bin\r\n"
                                "/missing/file 4\n"
                                "/link\n"
                                "/nested\n"
                                "/empty\n"
                                "/a.bin 99\n";

static int run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int run(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    char full[sizeof(cmd) + PATH_MAX + 32];
    snprintf(full, sizeof(full), "(%s) >'%s/cmd.log' 2>&1", cmd, tmp);
    int rc = system(full);
    if (rc != 0) {
        fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
        char cat[PATH_MAX + 32];
        snprintf(cat, sizeof(cat), "cat '%s/cmd.log' >&2", tmp);
        if (system(cat) != 0)
            fprintf(stderr, "(no output)\n");
    }
    return rc;
}

static int write_whole(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return -errno;
    int rc = write_full(fd, data, len);
    close(fd);
    return rc;
}

static int make_sources(void)
{
    path_join(src_dir, sizeof(src_dir), "%s/src", tmp);
    if (run("mkdir -p '%s/nested/dir' '%s/with space' '%s/boot'", src_dir, src_dir, tmp))
        return -1;
    for (size_t i = 0; i < NFILES; i++) {
        struct tfile *f = &files[i];
        f->data = calloc(1, f->size + 1);
        fill_random(f->data, f->size);
        memset(f->data + f->hole_at, 0, f->hole_len);
        char p[PATH_MAX];
        path_join(p, sizeof(p), "%s%s", src_dir, f->path);
        if (write_whole(p, f->data, f->size) < 0)
            return -1;
    }
    char p[PATH_MAX];
    path_join(p, sizeof(p), "%s/link", src_dir);
    if (symlink("a.bin", p) < 0)
        return -1;
    /* A small "boot" filesystem for the GPT disk, holding only /vmlinuz. */
    static unsigned char vmlinuz[40 * KiB];
    fill_random(vmlinuz, sizeof(vmlinuz));
    path_join(p, sizeof(p), "%s/boot/vmlinuz", tmp);
    return write_whole(p, vmlinuz, sizeof(vmlinuz)) < 0 ? -1 : 0;
}

static unsigned char *load(const char *path, size_t *len)
{
    char *data = NULL;
    if (read_file(path, 256u * MiB, &data, len) < 0)
        return NULL;
    return (unsigned char *)data;
}

static uint32_t fs_block_size(const char *fs_img)
{
    char cmd[PATH_MAX + 64];
    snprintf(cmd, sizeof(cmd), "dumpe2fs -h '%s' 2>/dev/null", fs_img);
    FILE *p = popen(cmd, "r");
    char line[256];
    unsigned bs = 0;
    while (p && fgets(line, sizeof(line), p))
        if (sscanf(line, "Block size: %u", &bs) == 1)
            break;
    if (p)
        pclose(p);
    return bs;
}

/* ---- reading the published disk back through the repository ---- */

struct reader {
    struct repo *repo;
    const struct manifest *m;
    int calls;
    int fail; /* make every read fail with EIO */
};

static int repo_read(void *ctx, void *buf, size_t len, uint64_t off)
{
    struct reader *r = ctx;
    r->calls++;
    if (r->fail)
        return -EIO;
    return repo_read_range(r->repo, r->m, buf, len, off);
}

struct published {
    struct repo *repo;
    struct manifest *m;
    struct reader rd;
};

static int publish(const char *disk, const char *name, uint32_t cs, struct published *pub)
{
    char err[512] = "";
    memset(pub, 0, sizeof(*pub));
    struct publish_options opts = {
        .image_path = disk, .repo_path = repo_path, .name = name, .chunk_size = cs, .zstd_level = 1};
    struct publish_result res;
    if (publish_image(&opts, &res, err, sizeof(err)) < 0 || repo_open(repo_path, &pub->repo, err, sizeof(err)) < 0 ||
        repo_read_manifest(pub->repo, name, res.version, &pub->m, err, sizeof(err)) < 0) {
        fprintf(stderr, "publishing %s: %s\n", disk, err);
        return -1;
    }
    pub->rd.repo = pub->repo;
    pub->rd.m = pub->m;
    return 0;
}

static void unpublish(struct published *pub)
{
    manifest_free(pub->m);
    repo_close(pub->repo);
}

static int map(struct published *pub, const char *text, struct chunk_list **list, char **warnings, char *err,
               size_t errlen)
{
    pub->rd.calls = 0;
    err[0] = '\0';
    return extmap_paths_to_list(pub->m, repo_read, &pub->rd, text, list, warnings, err, errlen);
}

/* ---- the expectation, from the bytes of the disk image ---- */

struct blk_key {
    uint64_t key;
    uint64_t blk;
};

static int key_cmp(const void *a, const void *b)
{
    const struct blk_key *x = a, *y = b;
    return x->key < y->key ? -1 : x->key > y->key ? 1 : x->blk < y->blk ? -1 : x->blk > y->blk;
}

struct expect {
    uint64_t *chunks;
    uint64_t count;
    int unfound; /* file blocks not found on the disk */
};

/* Appends the chunks that hold data's blocks, in order, found by content in
 * the filesystem at part_off of disk: the chunks extmap should name. */
static void expect_file(const unsigned char *disk, size_t disk_len, uint64_t part_off, uint32_t bs,
                        const struct blk_key *index, size_t nindex, const struct manifest *m,
                        const unsigned char *data, size_t size, uint8_t *seen, struct expect *ex)
{
    for (size_t off = 0; off < size; off += bs) {
        size_t n = size - off < bs ? size - off : bs;
        if (buffer_is_zero(data + off, n))
            continue; /* a hole: no block */
        uint64_t key = 0;
        memcpy(&key, data + off, n < 8 ? n : 8);
        /* first index entry with this key */
        size_t lo = 0, hi = nindex;
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (index[mid].key < key)
                lo = mid + 1;
            else
                hi = mid;
        }
        uint64_t found = UINT64_MAX;
        for (size_t i = lo; i < nindex && index[i].key == key; i++) {
            uint64_t at = part_off + index[i].blk * bs;
            if (at + n <= disk_len && memcmp(disk + at, data + off, n) == 0) {
                found = at;
                break;
            }
        }
        if (found == UINT64_MAX) {
            ex->unfound++;
            continue;
        }
        uint64_t c = found / m->chunk_size;
        if (seen[c])
            continue;
        seen[c] = 1;
        if (!chunk_hash_is_null(&m->chunks[c]))
            ex->chunks[ex->count++] = c;
    }
}

/* The expected list for the given files (indices into files[]). */
static void expect_files(const char *disk_path, uint64_t part_off, uint32_t bs, const struct manifest *m,
                         const size_t *which, size_t nwhich, const unsigned char *extra, size_t extra_len,
                         struct expect *ex)
{
    memset(ex, 0, sizeof(*ex));
    size_t disk_len = 0;
    unsigned char *disk = load(disk_path, &disk_len);
    if (!disk) {
        ex->unfound = -1;
        return;
    }
    size_t nindex = (disk_len - part_off) / bs;
    struct blk_key *index = malloc(nindex * sizeof(*index));
    for (size_t i = 0; i < nindex; i++) {
        memcpy(&index[i].key, disk + part_off + i * bs, 8);
        index[i].blk = i;
    }
    qsort(index, nindex, sizeof(*index), key_cmp);
    uint8_t *seen = calloc(m->chunk_count, 1);
    ex->chunks = calloc(m->chunk_count + 1, sizeof(*ex->chunks));
    for (size_t i = 0; i < nwhich; i++)
        expect_file(disk, disk_len, part_off, bs, index, nindex, m, files[which[i]].data, files[which[i]].size,
                    seen, ex);
    if (extra)
        expect_file(disk, disk_len, part_off, bs, index, nindex, m, extra, extra_len, seen, ex);
    free(seen);
    free(index);
    free(disk);
}

static bool same_chunks(const struct chunk_list *list, const struct expect *ex)
{
    if (list->count != ex->count) {
        fprintf(stderr, "  list has %llu chunks, expected %llu\n", (unsigned long long)list->count,
                (unsigned long long)ex->count);
        return false;
    }
    for (uint64_t i = 0; i < ex->count; i++) {
        if (list->chunks[i] != ex->chunks[i]) {
            fprintf(stderr, "  entry %llu: chunk %llu, expected %llu\n", (unsigned long long)i,
                    (unsigned long long)list->chunks[i], (unsigned long long)ex->chunks[i]);
            return false;
        }
    }
    return true;
}

/* ---- the cases ---- */

struct variant {
    const char *name;
    const char *disk;    /* file name in tmp */
    const char *fs;      /* the filesystem image that went into it */
    uint64_t part_off;
    uint32_t chunk_size;
};

/* Maps paths_text on one published disk and checks the list, the header
 * and the warnings. */
static void check_variant(const struct variant *v)
{
    printf("variant %s: chunk size %u, filesystem at byte %llu\n", v->name, v->chunk_size,
           (unsigned long long)v->part_off);
    char disk[PATH_MAX], fs[PATH_MAX], err[512];
    path_join(disk, sizeof(disk), "%s/%s", tmp, v->disk);
    path_join(fs, sizeof(fs), "%s/%s", tmp, v->fs);
    uint32_t bs = fs_block_size(fs);
    CHECK(bs == 1024 || bs == 4096);
    struct published pub;
    CHECK(publish(disk, v->name, v->chunk_size, &pub) == 0);
    if (!pub.m || !bs)
        return;

    struct chunk_list *list = NULL;
    char *warnings = NULL;
    int rc = map(&pub, paths_text, &list, &warnings, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "  extmap: %s\n", err);
    CHECK(rc == 0 && list);
    if (list) {
        size_t which[] = {0, 1, 2, 3, 4, 5};
        struct expect ex;
        expect_files(disk, v->part_off, bs, pub.m, which, ARRAY_LEN(which), NULL, 0, &ex);
        CHECK(ex.unfound == 0);
        CHECK(ex.count > 0);
        CHECK(same_chunks(list, &ex));
        free(ex.chunks);

        /* The header comes from the manifest, and the list belongs to it. */
        CHECK(strcmp(list->base_name, v->name) == 0);
        CHECK(list->base_version == pub.m->version);
        CHECK(chunk_hash_equal(&list->base_id, &pub.m->id));
        CHECK(list->chunk_size == v->chunk_size);
        char lerr[256];
        CHECK(list_check(list, pub.m, lerr, sizeof(lerr)) == 0);
        char *text = NULL;
        size_t len = 0;
        struct chunk_list *back = NULL;
        CHECK(list_format(list, &text, &len) == 0);
        CHECK(text && list_parse(text, len, &back, lerr, sizeof(lerr)) == 0 && back->count == list->count);
        list_free(back);
        free(text);
        printf("  %llu chunks, %d reads of the disk\n", (unsigned long long)list->count, pub.rd.calls);
    }
    CHECK(warnings && strstr(warnings, "/missing/file: no such file"));
    CHECK(warnings && strstr(warnings, "/link: is a symbolic link"));
    CHECK(warnings && strstr(warnings, "/nested: is a directory"));
    CHECK(!warnings || !strstr(warnings, "/empty"));
    CHECK(!warnings || !strstr(warnings, "a.bin"));
    list_free(list);
    free(warnings);

    /* Only the order of the paths decides the order of the chunks. */
    list = NULL;
    warnings = NULL;
    rc = map(&pub, "/c.txt\n/with space/d e.bin\n/a.bin\n", &list, &warnings, err, sizeof(err));
    CHECK(rc == 0 && list && !warnings);
    if (list) {
        size_t which[] = {2, 3, 0};
        struct expect ex;
        expect_files(disk, v->part_off, bs, pub.m, which, ARRAY_LEN(which), NULL, 0, &ex);
        CHECK(ex.unfound == 0 && same_chunks(list, &ex));
        free(ex.chunks);
    }
    list_free(list);
    free(warnings);

    /* Every path missing: an error, and the warnings say which. */
    list = NULL;
    warnings = NULL;
    rc = map(&pub, "/nope\n/also/nope 3\n/a.bin/x\n", &list, &warnings, err, sizeof(err));
    CHECK(rc == -ENOENT && !list && err[0]);
    CHECK(warnings && strstr(warnings, "/nope") && strstr(warnings, "/also/nope") && strstr(warnings, "/a.bin/x"));
    printf("  all missing -> %s\n", err);
    free(warnings);

    /* No path at all. */
    rc = map(&pub, "# nothing here\n\n   \n", &list, NULL, err, sizeof(err));
    CHECK(rc == -EINVAL && !list && err[0]);

    /* The disk cannot be read: the read error, not a wrong answer. */
    pub.rd.fail = 1;
    rc = map(&pub, paths_text, &list, &warnings, err, sizeof(err));
    CHECK(rc == -EIO && !list && strstr(err, "cannot read"));
    printf("  unreadable -> %s\n", err);
    free(warnings);
    pub.rd.fail = 0;
    unpublish(&pub);
}

/* GPT: a FAT system partition, a small ext4 "/boot" and the main ext4. The
 * main one wins for paths that live there, /boot for /vmlinuz. */
static void check_gpt_choice(const char *disk_name, uint64_t boot_off)
{
    char disk[PATH_MAX], fs[PATH_MAX], err[512];
    path_join(disk, sizeof(disk), "%s/%s", tmp, disk_name);
    path_join(fs, sizeof(fs), "%s/boot.img", tmp);
    uint32_t bs = fs_block_size(fs);
    struct published pub;
    CHECK(publish(disk, "gptboot", 16 * KiB, &pub) == 0);
    if (!pub.m)
        return;
    struct chunk_list *list = NULL;
    char *warnings = NULL;
    int rc = map(&pub, "/vmlinuz\n", &list, &warnings, err, sizeof(err));
    CHECK(rc == 0 && list && !warnings);
    if (list) {
        char p[PATH_MAX];
        path_join(p, sizeof(p), "%s/boot/vmlinuz", tmp);
        size_t len = 0;
        unsigned char *vmlinuz = load(p, &len);
        struct expect ex;
        expect_files(disk, boot_off, bs, pub.m, NULL, 0, vmlinuz, len, &ex);
        CHECK(ex.unfound == 0 && ex.count > 0 && same_chunks(list, &ex));
        free(ex.chunks);
        free(vmlinuz);
    }
    list_free(list);
    unpublish(&pub);
}

/* Disks without an ext filesystem, and damaged ones. */
static void check_refusals(void)
{
    char path[PATH_MAX], err[512];
    struct chunk_list *list = NULL;
    char *warnings = NULL;
    struct published pub;
    int rc;

    /* random bytes */
    size_t rlen = 4 * MiB;
    unsigned char *junk = malloc(rlen);
    fill_random(junk, rlen);
    path_join(path, sizeof(path), "%s/random.img", tmp);
    CHECK(write_whole(path, junk, rlen) == 0);
    free(junk);
    if (publish(path, "random", 64 * KiB, &pub) == 0) {
        rc = map(&pub, paths_text, &list, &warnings, err, sizeof(err));
        CHECK(rc == -EINVAL && !list && strstr(err, "no ext2/3/4 filesystem"));
        printf("random bytes -> %s\n", err);
        free(warnings);
        unpublish(&pub);
    }

    /* FAT (when dosfstools is installed) */
    if (system("command -v mkfs.vfat >/dev/null 2>&1") == 0) {
        path_join(path, sizeof(path), "%s/vfat.img", tmp);
        CHECK(run("mkfs.vfat -C '%s' 16384", path) == 0);
        if (publish(path, "vfat", 64 * KiB, &pub) == 0) {
            rc = map(&pub, paths_text, &list, &warnings, err, sizeof(err));
            CHECK(rc == -EINVAL && !list && strstr(err, "FAT filesystem"));
            printf("vfat -> %s\n", err);
            free(warnings);
            unpublish(&pub);
        }
    } else {
        printf("mkfs.vfat not installed: FAT case skipped\n");
    }

    /* All zeros: nothing at all */
    path_join(path, sizeof(path), "%s/zero.img", tmp);
    CHECK(run("truncate -s 8M '%s'", path) == 0);
    if (publish(path, "zero", 64 * KiB, &pub) == 0) {
        rc = map(&pub, paths_text, &list, &warnings, err, sizeof(err));
        CHECK(rc == -EINVAL && !list && err[0]);
        free(warnings);
        unpublish(&pub);
    }

    /* A truncated filesystem (the first 6 MiB of 32) and one with garbage
     * over its group descriptors: an error or warnings, never a crash. */
    path_join(path, sizeof(path), "%s/trunc.img", tmp);
    CHECK(run("head -c 6M '%s/fs1k.img' > '%s'", tmp, path) == 0);
    if (publish(path, "trunc", 64 * KiB, &pub) == 0) {
        rc = map(&pub, paths_text, &list, &warnings, err, sizeof(err));
        CHECK(rc == 0 ? list != NULL : (list == NULL && err[0]));
        printf("truncated -> %d %s%s\n%s", rc, rc ? err : "", rc ? "" : "(listed what it could)", warnings ? warnings : "");
        list_free(list);
        list = NULL;
        free(warnings);
        unpublish(&pub);
    }
    path_join(path, sizeof(path), "%s/garbled.img", tmp);
    char fs1k[PATH_MAX];
    path_join(fs1k, sizeof(fs1k), "%s/fs1k.img", tmp);
    size_t glen = 0;
    unsigned char *garbled = load(fs1k, &glen);
    CHECK(garbled && glen > 10240);
    if (garbled)
        fill_random(garbled + 2048, 8192); /* deterministic garbage over the group descriptors */
    CHECK(garbled && write_whole(path, garbled, glen) == 0);
    free(garbled);
    if (publish(path, "garbled", 64 * KiB, &pub) == 0) {
        rc = map(&pub, paths_text, &list, &warnings, err, sizeof(err));
        CHECK(rc == -EINVAL && !list && err[0]);
        printf("garbled -> %d %s\n%s", rc, rc ? err : "", warnings ? warnings : "");
        list_free(list);
        list = NULL;
        free(warnings);
        unpublish(&pub);
    }

    /* Hostile partition tables: entries far past the disk's end, an
     * extended partition that points at itself. */
    path_join(path, sizeof(path), "%s/hostile.img", tmp);
    unsigned char mbr[512] = {0};
    mbr[446 + 4] = 0x83;
    memcpy(mbr + 446 + 8, "\xff\xff\xff\x7f\x10\x00\x00\x00", 8);
    mbr[462 + 4] = 0x05;
    memcpy(mbr + 462 + 8, "\x01\x00\x00\x00\x10\x00\x00\x00", 8);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    unsigned char *disk = calloc(1, 1 * MiB);
    memcpy(disk, mbr, sizeof(mbr));
    memcpy(disk + 512, mbr, sizeof(mbr)); /* the EBR at sector 1 names sector 1 again */
    CHECK(write_whole(path, disk, 1 * MiB) == 0);
    free(disk);
    if (publish(path, "hostile", 64 * KiB, &pub) == 0) {
        rc = map(&pub, paths_text, &list, &warnings, err, sizeof(err));
        CHECK(rc == -EINVAL && !list && err[0]);
        printf("hostile partition table -> %s\n", err);
        free(warnings);
        unpublish(&pub);
    }
}

int main(void)
{
    const char *old_path = getenv("PATH");
    char new_path[4096];
    snprintf(new_path, sizeof(new_path), "%s:/usr/sbin:/sbin", old_path ? old_path : "/usr/bin:/bin");
    setenv("PATH", new_path, 1);
    if (system("command -v mkfs.ext4 >/dev/null && command -v sfdisk >/dev/null && "
               "command -v dumpe2fs >/dev/null") != 0) {
        fprintf(stderr, "test_extmap needs mkfs.ext4, dumpe2fs (e2fsprogs) and sfdisk (fdisk)\n");
        return 1;
    }
    snprintf(tmp, sizeof(tmp), "%s/imgfs-extmap.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/var/tmp");
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 1;
    }
    path_join(repo_path, sizeof(repo_path), "%s/repo", tmp);
    CHECK(make_sources() == 0);
    const char *T = tmp, *S = src_dir;
    bool have_vfat = system("command -v mkfs.vfat >/dev/null 2>&1") == 0;

    /* The filesystems: ext4 with 1 KiB blocks (mke2fs's choice for small
     * ones) and with 4 KiB blocks, ext2 (indirect blocks), a small /boot. */
    CHECK(run("mkfs.ext4 -q -F -d '%s' '%s/fs1k.img' 32M", S, T) == 0);
    CHECK(run("mkfs.ext4 -q -F -b 4096 -d '%s' '%s/fs4k.img' 32M", S, T) == 0);
    CHECK(run("mkfs.ext2 -q -F -d '%s' '%s/fs2.img' 32M", S, T) == 0);
    CHECK(run("mkfs.ext4 -q -F -d '%s/boot' '%s/boot.img' 4M", T, T) == 0);

    /* MBR: an empty type-83 partition first, then the filesystem. */
    CHECK(run("truncate -s 40M '%s/mbr.img' && printf 'label: dos\\nstart=2048, size=4096, type=83\\n"
              "start=8192, type=83\\n' | sfdisk -q --no-reread --no-tell-kernel '%s/mbr.img' && "
              "dd if='%s/fs4k.img' of='%s/mbr.img' bs=1M seek=4 conv=notrunc status=none",
              T, T, T, T) == 0);
    /* MBR with the filesystem in a logical partition. */
    CHECK(run("truncate -s 40M '%s/logical.img' && printf 'label: dos\\nstart=2048, size=4096, type=83\\n"
              "start=8192, type=5\\nx5 : start=10240, type=83\\n' | "
              "sfdisk -q --no-reread --no-tell-kernel '%s/logical.img' && "
              "dd if='%s/fs1k.img' of='%s/logical.img' bs=1M seek=5 conv=notrunc status=none",
              T, T, T, T) == 0);
    /* GPT: EFI system partition (FAT when mkfs.vfat exists), /boot, root. */
    CHECK(run("truncate -s 48M '%s/gpt.img' && printf 'label: gpt\\nstart=2048, size=4096, type=U\\n"
              "start=6144, size=8192, type=L\\nstart=16384, type=L\\n' | "
              "sfdisk -q --no-reread --no-tell-kernel '%s/gpt.img' && "
              "dd if='%s/boot.img' of='%s/gpt.img' bs=1M seek=3 conv=notrunc status=none && "
              "dd if='%s/fs4k.img' of='%s/gpt.img' bs=1M seek=8 conv=notrunc status=none",
              T, T, T, T, T, T) == 0);
    if (have_vfat)
        CHECK(run("mkfs.vfat -C '%s/esp.img' 2048 && dd if='%s/esp.img' of='%s/gpt.img' bs=1M seek=1 "
                  "conv=notrunc status=none",
                  T, T, T) == 0);

    const struct variant variants[] = {
        {"bare", "fs1k.img", "fs1k.img", 0, 64 * KiB},
        {"ext2", "fs2.img", "fs2.img", 0, 4 * KiB},
        {"mbr", "mbr.img", "fs4k.img", 4 * MiB, 128 * KiB},
        {"logical", "logical.img", "fs1k.img", 5 * MiB, 32 * KiB},
        {"gpt", "gpt.img", "fs4k.img", 8 * MiB, 16 * KiB},
    };
    for (size_t i = 0; i < ARRAY_LEN(variants); i++)
        check_variant(&variants[i]);
    check_gpt_choice("gpt.img", 3 * MiB);
    check_refusals();

    for (size_t i = 0; i < NFILES; i++)
        free(files[i].data);
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp);
    if (system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", tmp);
    return check_summary();
}
