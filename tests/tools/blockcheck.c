/* blockcheck: a client that must never see an error, for takeover tests.
 *
 *   blockcheck DISK SHADOW SEED STOPFILE [LATENCIES]
 *
 * Until STOPFILE exists: picks a random 4 KiB block of DISK, writes fresh
 * random bytes there with O_DIRECT, fsyncs, reads the block back with
 * O_DIRECT and compares; SHADOW (a regular file equal to DISK at the start)
 * gets the same bytes. Every error of any call, and every block that does
 * not read back as written, is counted and printed. After each 20 blocks it
 * writes "OPS n" to stdout (for the test to see progress). At the end it
 * prints "ops N errors E mismatches M max_ms X" and exits 0 only when E and
 * M are 0.
 *
 * LATENCIES, if given, gets "START_MS DURATION_MS" (CLOCK_MONOTONIC) for
 * every block that took more than 5 ms end to end: what a client saw of a
 * pause.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

static uint64_t rng = 88172645463325252ull;

static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int main(int argc, char **argv)
{
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: blockcheck DISK SHADOW SEED STOPFILE [LATENCIES]\n");
        return 2;
    }
    rng ^= strtoull(argv[3], NULL, 10) * 0x9e3779b97f4a7c15ull;
    int disk = open(argv[1], O_RDWR | O_DIRECT);
    int shadow = open(argv[2], O_RDWR);
    FILE *lat = argc == 6 ? fopen(argv[5], "w") : NULL;
    struct stat st;
    if (disk < 0 || shadow < 0 || fstat(disk, &st) < 0 || st.st_size < BLOCK || (argc == 6 && !lat)) {
        fprintf(stderr, "blockcheck: cannot open %s, %s or %s: %s\n", argv[1], argv[2], argc == 6 ? argv[5] : "",
                strerror(errno));
        return 2;
    }
    uint64_t blocks = (uint64_t)st.st_size / BLOCK;
    unsigned char *buf, *back;
    if (posix_memalign((void **)&buf, BLOCK, BLOCK) || posix_memalign((void **)&back, BLOCK, BLOCK))
        return 2;
    uint64_t ops = 0, errors = 0, mismatches = 0;
    double max_ms = 0;
    while (access(argv[4], F_OK) != 0) {
        uint64_t b = next() % blocks;
        for (size_t i = 0; i < BLOCK; i += 8) {
            uint64_t v = next();
            memcpy(buf + i, &v, 8);
        }
        off_t off = (off_t)(b * BLOCK);
        double start = now_ms();
        if (pwrite(shadow, buf, BLOCK, off) != BLOCK) {
            fprintf(stderr, "blockcheck: shadow write: %s\n", strerror(errno));
            return 2;
        }
        if (pwrite(disk, buf, BLOCK, off) != BLOCK) {
            fprintf(stderr, "blockcheck: write of block %" PRIu64 ": %s\n", b, strerror(errno));
            errors++;
        }
        if (fsync(disk) != 0) {
            fprintf(stderr, "blockcheck: fsync after block %" PRIu64 ": %s\n", b, strerror(errno));
            errors++;
        }
        ssize_t n = pread(disk, back, BLOCK, off);
        if (n != BLOCK) {
            fprintf(stderr, "blockcheck: read of block %" PRIu64 ": %s\n", b, n < 0 ? strerror(errno) : "short");
            errors++;
        } else if (memcmp(buf, back, BLOCK) != 0) {
            fprintf(stderr, "blockcheck: block %" PRIu64 " does not read back as written\n", b);
            mismatches++;
        }
        double took = now_ms() - start;
        if (took > max_ms)
            max_ms = took;
        if (lat && took > 5)
            fprintf(lat, "%.3f %.3f\n", start, took);
        if (++ops % 20 == 0) {
            printf("OPS %" PRIu64 "\n", ops);
            fflush(stdout);
        }
    }
    if (lat)
        fclose(lat);
    printf("ops %" PRIu64 " errors %" PRIu64 " mismatches %" PRIu64 " max_ms %.1f\n", ops, errors, mismatches,
           max_ms);
    free(buf);
    free(back);
    close(disk);
    close(shadow);
    return errors || mismatches ? 1 : 0;
}
