/* vmstress: random writes to a VM disk, mirrored in a shadow file, then a
 * byte-for-byte comparison of the two.
 *
 *   vmstress DISK SHADOW SEED WRITES [--fsync-every N] [--no-verify] [--inside]
 *   vmstress DISK SHADOW SEED WRITES --unsynced RANGES
 *   vmstress --verify DISK SHADOW
 *   vmstress --verify-except DISK SYNCED RANGES [FINAL]
 *
 * SHADOW is a regular file that starts equal to DISK (a copy of the base, or
 * the state a previous run left). Each write goes to SHADOW first and then to
 * DISK, at random unaligned offsets with random lengths (1 byte to ~300 KiB):
 * some straddle 4 KiB blocks and 128 KiB chunk boundaries, some end exactly at
 * the end of the disk, a few run past it (the disk must not grow and the part
 * that was refused must not land; --inside leaves these out, for a page
 * cache that takes such a write and fails it later), some are all zeros. About a quarter go
 * through a second descriptor opened with O_DIRECT, when the file allows it.
 *
 * Normal mode: DISK is fsync'd every N writes (default 0: only at the end),
 * printing "SYNCED n" after each fsync, and "DONE n" after the final one; so
 * the shadow at "DONE" is exactly the durable state. Then both files are
 * compared through O_DIRECT reads (the daemon, not the page cache).
 *
 * --unsynced RANGES: never fsyncs. Before each write its range "OFF LEN" is
 * appended to RANGES (with write(2), so it survives this process), then the
 * shadow and the disk are written. WRITES 0 means until a write fails (the
 * daemon was killed): that is expected, and exits 3. Prints "WROTE n" every
 * 50 writes, and pauses 1 ms after each write so that whoever kills the
 * daemon on "WROTE n" does so after a few more writes, not hundreds.
 *
 * --verify-except: every byte outside the ranges listed in RANGES must equal
 * SYNCED; bytes inside them are counted as equal to SYNCED, to FINAL (if
 * given) or to neither, for information only. Any read error fails.
 *
 * Exit status: 0 all matched, 1 mismatch or I/O error, 2 usage, 3 a write
 * failed in --unsynced mode. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_WRITE (300 * 1024 + 123)
#define PIECE (1u << 20)
#define BLOCK 4096u
#define CHUNK 131072u

static uint64_t rng_state;

static uint64_t rnd(void)
{
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

static void *aligned_alloc_or_die(size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, len) != 0) {
        fprintf(stderr, "vmstress: out of memory\n");
        exit(1);
    }
    return p;
}

static uint64_t file_size(int fd, const char *path)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        fprintf(stderr, "vmstress: stat %s: %s\n", path, strerror(errno));
        exit(1);
    }
    return (uint64_t)st.st_size;
}

/* Reads up to len bytes at off; returns bytes read (short only at EOF) or -1. */
static ssize_t read_at(int fd, char *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        done += (size_t)n;
    }
    return (ssize_t)done;
}

static int write_all_at(int fd, const char *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

/* Opens path for reading, bypassing the page cache when the file allows. */
static int open_uncached(const char *path, bool *direct)
{
    int fd = open(path, O_RDONLY | O_DIRECT);
    *direct = fd >= 0;
    if (fd < 0)
        fd = open(path, O_RDONLY);
    if (fd >= 0 && !*direct)
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    return fd;
}

struct range {
    uint64_t off, len;
};

/* Compares DISK with SHADOW. With ranges, bytes inside them are only
 * counted (against SHADOW and FINAL), not required to match. */
static int verify(const char *disk_path, const char *shadow_path, const struct range *ranges, size_t nranges,
                  const char *final_path)
{
    bool direct;
    int disk = open_uncached(disk_path, &direct);
    int shadow = open(shadow_path, O_RDONLY);
    int final = final_path ? open(final_path, O_RDONLY) : -1;
    if (disk < 0 || shadow < 0 || (final_path && final < 0)) {
        fprintf(stderr, "vmstress: cannot open %s: %s\n", disk < 0 ? disk_path : shadow < 0 ? shadow_path : final_path,
                strerror(errno));
        return 1;
    }
    uint64_t size = file_size(disk, disk_path);
    if (size != file_size(shadow, shadow_path)) {
        fprintf(stderr, "vmstress: %s is %" PRIu64 " bytes but %s is %" PRIu64 "\n", disk_path, size, shadow_path,
                file_size(shadow, shadow_path));
        return 1;
    }
    /* One flag per byte: covered by an unsynced range. */
    uint8_t *touched = NULL;
    if (ranges) {
        touched = calloc(size ? size : 1, 1);
        if (!touched) {
            fprintf(stderr, "vmstress: out of memory\n");
            return 1;
        }
        for (size_t i = 0; i < nranges; i++)
            if (ranges[i].off < size)
                memset(touched + ranges[i].off, 1,
                       ranges[i].len < size - ranges[i].off ? ranges[i].len : size - ranges[i].off);
    }
    char *got = aligned_alloc_or_die(PIECE), *want = aligned_alloc_or_die(PIECE), *fin = aligned_alloc_or_die(PIECE);
    uint64_t mismatches = 0, bad_blocks = 0, first = UINT64_MAX, last_bad_block = UINT64_MAX;
    uint64_t in_synced = 0, in_final = 0, in_neither = 0, in_total = 0;
    int rc = 0;
    for (uint64_t off = 0; off < size; off += PIECE) {
        size_t len = size - off < PIECE ? (size_t)(size - off) : PIECE;
        ssize_t n = read_at(disk, got, len, off);
        if (n < 0) {
            fprintf(stderr, "vmstress: read error on %s at %" PRIu64 ": %s\n", disk_path, off, strerror(errno));
            rc = 1;
            break;
        }
        if ((size_t)n != len) {
            fprintf(stderr, "vmstress: short read on %s at %" PRIu64 ": %zd of %zu\n", disk_path, off, n, len);
            rc = 1;
            break;
        }
        if (read_at(shadow, want, len, off) != (ssize_t)len ||
            (final >= 0 && read_at(final, fin, len, off) != (ssize_t)len)) {
            fprintf(stderr, "vmstress: cannot read the reference files at %" PRIu64 "\n", off);
            rc = 1;
            break;
        }
        if (!touched && memcmp(got, want, len) == 0)
            continue;
        for (size_t i = 0; i < len; i++) {
            uint64_t at = off + i;
            if (touched && touched[at]) {
                in_total++;
                if (got[i] == want[i])
                    in_synced++;
                else if (final >= 0 && got[i] == fin[i])
                    in_final++;
                else
                    in_neither++;
                continue;
            }
            if (got[i] == want[i])
                continue;
            if (first == UINT64_MAX) {
                first = at;
                fprintf(stderr, "vmstress: first mismatch at offset %" PRIu64 ": disk 0x%02x, expected 0x%02x\n", at,
                        (unsigned char)got[i], (unsigned char)want[i]);
            }
            mismatches++;
            if (at / BLOCK != last_bad_block) {
                bad_blocks++;
                last_bad_block = at / BLOCK;
            }
        }
    }
    if (touched)
        printf("unsynced bytes %" PRIu64 ": %" PRIu64 " as synced, %" PRIu64 " as last written, %" PRIu64
               " neither\n",
               in_total, in_synced, in_final, in_neither);
    if (mismatches) {
        printf("MISMATCH %" PRIu64 " bytes in %" PRIu64 " blocks, first at %" PRIu64 " (%s reads)\n", mismatches,
               bad_blocks, first, direct ? "O_DIRECT" : "buffered");
        rc = 1;
    } else if (!rc) {
        printf("VERIFY OK %" PRIu64 " bytes%s (%s reads)\n", size, touched ? " outside unsynced ranges" : "",
               direct ? "O_DIRECT" : "buffered");
    }
    fflush(stdout);
    free(touched);
    free(got);
    free(want);
    free(fin);
    close(disk);
    close(shadow);
    if (final >= 0)
        close(final);
    return rc;
}

static int load_ranges(const char *path, struct range **out, size_t *count)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "vmstress: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 0, n = 0;
    struct range *r = NULL;
    uint64_t off, len;
    while (fscanf(f, "%" SCNu64 " %" SCNu64, &off, &len) == 2) {
        if (n == cap) {
            cap = cap ? cap * 2 : 256;
            r = realloc(r, cap * sizeof(*r));
            if (!r) {
                fclose(f);
                return -1;
            }
        }
        r[n++] = (struct range){off, len};
    }
    fclose(f);
    *out = r;
    *count = n;
    return 0;
}

static bool stay_inside; /* --inside: no write runs past the end */

/* Picks the next write: an offset and a length within [0, size], possibly
 * running past size when past_end is set. */
static void pick(uint64_t size, uint64_t *off, size_t *len, bool *past_end)
{
    uint64_t r = below(100);
    size_t l;
    if (r < 25)
        l = 1 + (size_t)below(64); /* tiny */
    else if (r < 55)
        l = 1 + (size_t)below(3 * BLOCK); /* within or across a few blocks */
    else if (r < 75)
        l = BLOCK * (1 + (size_t)below(16)); /* block multiples (offset may be unaligned) */
    else
        l = 1 + (size_t)below(MAX_WRITE); /* up to ~300 KiB */
    if (l > size)
        l = (size_t)size;
    uint64_t where = below(100), o;
    *past_end = false;
    if (where < 40) {
        o = below(size - l + 1); /* anywhere, unaligned */
    } else if (where < 58) {
        /* straddling a 4 KiB block boundary */
        uint64_t b = BLOCK * below(size / BLOCK + 1);
        o = b > l / 2 ? b - l / 2 - below(2) : 0;
    } else if (where < 78) {
        /* straddling a 128 KiB chunk boundary */
        uint64_t c = CHUNK * (1 + below(size / CHUNK));
        o = c > 1 + below(l) ? c - 1 - below(l) : 0;
    } else if (where < 90) {
        o = size - l; /* ending exactly at the end of the disk */
    } else if (where < 93) {
        o = below(2 * BLOCK); /* the very start */
    } else if (where < 95 && !stay_inside) {
        /* past the end: starts inside, ends outside */
        o = size - 1 - below(l < size ? l : size);
        *past_end = o + l > size;
    } else {
        o = size - l - below(2 * BLOCK + 1 < size - l ? 2 * BLOCK + 1 : size - l + 1); /* near the end */
    }
    if (o > size - 1)
        o = size - 1;
    if (!*past_end && o + l > size)
        l = (size_t)(size - o);
    *off = o;
    *len = l;
}

static void fill(char *buf, size_t len)
{
    uint64_t kind = below(10);
    if (kind == 0) {
        memset(buf, 0, len); /* zeros: must overwrite whatever was there */
    } else if (kind == 1) {
        memset(buf, (int)(1 + below(255)), len);
    } else {
        size_t i = 0;
        for (; i + 8 <= len; i += 8) {
            uint64_t v = rnd();
            memcpy(buf + i, &v, 8);
        }
        for (; i < len; i++)
            buf[i] = (char)rnd();
    }
}

static int usage(void)
{
    fprintf(stderr, "usage: vmstress DISK SHADOW SEED WRITES [--fsync-every N] [--no-verify] [--inside] [--unsynced RANGES]\n"
                    "       vmstress --verify DISK SHADOW\n"
                    "       vmstress --verify-except DISK SYNCED RANGES [FINAL]\n");
    return 2;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4 && strcmp(argv[1], "--verify") == 0)
        return verify(argv[2], argv[3], NULL, 0, NULL);
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "--verify-except") == 0) {
        struct range *ranges = NULL;
        size_t count = 0;
        if (load_ranges(argv[4], &ranges, &count) < 0)
            return 1;
        int rc = verify(argv[2], argv[3], ranges ? ranges : (struct range[1]){{0, 0}}, count,
                        argc == 6 ? argv[5] : NULL);
        free(ranges);
        return rc;
    }
    if (argc < 5)
        return usage();
    const char *disk_path = argv[1], *shadow_path = argv[2], *ranges_path = NULL;
    char *end;
    uint64_t seed = strtoull(argv[3], &end, 10);
    long writes = strtol(argv[4], &end, 10);
    long fsync_every = 0;
    bool do_verify = true;
    if (*end || writes < 0)
        return usage();
    for (int i = 5; i < argc; i++) {
        if (strcmp(argv[i], "--fsync-every") == 0 && i + 1 < argc)
            fsync_every = strtol(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--no-verify") == 0)
            do_verify = false;
        else if (strcmp(argv[i], "--inside") == 0)
            stay_inside = true;
        else if (strcmp(argv[i], "--unsynced") == 0 && i + 1 < argc)
            ranges_path = argv[++i];
        else
            return usage();
    }
    if (!ranges_path && writes == 0)
        return usage();
    rng_state = 0x9e3779b97f4a7c15ull ^ (seed * 0x100000001b3ull) ^ 0x5555;
    for (int i = 0; i < 8; i++)
        rnd();

    int disk = open(disk_path, O_RDWR);
    int direct_fd = open(disk_path, O_RDWR | O_DIRECT);
    int shadow = open(shadow_path, O_RDWR);
    int ranges = ranges_path ? open(ranges_path, O_WRONLY | O_CREAT | O_APPEND, 0644) : -1;
    if (disk < 0 || shadow < 0 || (ranges_path && ranges < 0)) {
        fprintf(stderr, "vmstress: cannot open %s: %s\n",
                disk < 0 ? disk_path : shadow < 0 ? shadow_path : ranges_path, strerror(errno));
        return 1;
    }
    uint64_t size = file_size(disk, disk_path);
    if (size != file_size(shadow, shadow_path) || size == 0) {
        fprintf(stderr, "vmstress: %s (%" PRIu64 " bytes) and %s (%" PRIu64 " bytes) differ in size\n", disk_path,
                size, shadow_path, file_size(shadow, shadow_path));
        return 1;
    }
    /* Static: the early exits on a failed write need not free it. */
    static char *buf;
    buf = aligned_alloc_or_die(MAX_WRITE + BLOCK);
    long done = 0, direct_writes = 0, past_end_writes = 0;
    for (long i = 0; writes == 0 || i < writes; i++) {
        uint64_t off;
        size_t len;
        bool past_end;
        pick(size, &off, &len, &past_end);
        fill(buf, len);
        if (past_end) {
            /* A disk does not grow: the write fails or is cut at the end.
             * Whatever the disk took is mirrored. */
            ssize_t n = pwrite(disk, buf, len, (off_t)off);
            if (n < 0 && errno != ENOSPC && errno != EFBIG && errno != EINVAL) {
                fprintf(stderr, "vmstress: write past the end at %" PRIu64 "+%zu failed: %s\n", off, len,
                        strerror(errno));
                if (ranges_path)
                    return 3;
                return 1;
            }
            if (n > 0) {
                if ((uint64_t)n > size - off) {
                    fprintf(stderr, "vmstress: write past the end at %" PRIu64 "+%zu wrote %zd bytes\n", off, len, n);
                    return 1;
                }
                if (ranges_path) {
                    char line[64];
                    int m = snprintf(line, sizeof(line), "%" PRIu64 " %zd\n", off, n);
                    if (write(ranges, line, (size_t)m) != m)
                        return 1;
                }
                if (write_all_at(shadow, buf, (size_t)n, off) < 0)
                    return 1;
            }
            past_end_writes++;
        } else {
            if (ranges_path) {
                char line[64];
                int m = snprintf(line, sizeof(line), "%" PRIu64 " %zu\n", off, len);
                if (write(ranges, line, (size_t)m) != m) {
                    fprintf(stderr, "vmstress: cannot log to %s: %s\n", ranges_path, strerror(errno));
                    return 1;
                }
            }
            if (write_all_at(shadow, buf, len, off) < 0) {
                fprintf(stderr, "vmstress: cannot write %s: %s\n", shadow_path, strerror(errno));
                return 1;
            }
            bool use_direct = direct_fd >= 0 && below(4) == 0;
            if (write_all_at(use_direct ? direct_fd : disk, buf, len, off) < 0) {
                if (use_direct && errno == EINVAL) {
                    /* The file refuses this O_DIRECT write: stop using it. */
                    close(direct_fd);
                    direct_fd = -1;
                    if (write_all_at(disk, buf, len, off) == 0)
                        goto written;
                }
                fprintf(stderr, "vmstress: write %ld at %" PRIu64 "+%zu failed: %s\n", i, off, len, strerror(errno));
                if (ranges_path) {
                    printf("STOPPED after %ld writes\n", done);
                    return 3;
                }
                return 1;
            }
        written:
            direct_writes += use_direct;
        }
        done++;
        if (ranges_path && done % 50 == 0)
            printf("WROTE %ld\n", done);
        if (ranges_path)
            usleep(1000); /* paced, so that a kill lands after few writes */
        if (!ranges_path && fsync_every > 0 && done % fsync_every == 0) {
            if (fsync(disk) < 0) {
                fprintf(stderr, "vmstress: fsync failed: %s\n", strerror(errno));
                return 1;
            }
            printf("SYNCED %ld\n", done);
        }
    }
    if (ranges_path) {
        printf("WROTE %ld (all, unsynced)\n", done);
        return 0;
    }
    if (fsync(disk) < 0) {
        fprintf(stderr, "vmstress: fsync failed: %s\n", strerror(errno));
        return 1;
    }
    printf("DONE %ld writes (%ld O_DIRECT, %ld past the end)\n", done, direct_writes, past_end_writes);
    uint64_t now = file_size(disk, disk_path);
    if (now != size) {
        fprintf(stderr, "vmstress: the disk's size changed from %" PRIu64 " to %" PRIu64 "\n", size, now);
        return 1;
    }
    free(buf);
    close(disk);
    if (direct_fd >= 0)
        close(direct_fd);
    close(shadow);
    return do_verify ? verify(disk_path, shadow_path, NULL, 0, NULL) : 0;
}
