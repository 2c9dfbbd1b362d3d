/* digestspeed: how fast this build hashes one chunk, with each of the
 * hashes a fetched chunk may be checked by (xxh3-128 name, SHA-256 and
 * BLAKE2b-256 signed digests), in turns, on the same random bytes.
 *
 *   digestspeed [CHUNK_SIZE [ROUNDS]]     (defaults 131072 and 5)
 *
 * Prints one line per hash: the median GB/s over the rounds and the time of
 * one chunk. For bench/bench-trust.sh, which puts it next to its cold reads. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "hash.h"
#include "sign.h"

enum { XXH3, SHA256, BLAKE2B, KINDS };
static const char *names[KINDS] = {"xxh3-128", "sha256", "blake2b-256"};

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Seconds for iterations hashes of buf with kind. */
static double run(int kind, const void *buf, size_t len, int iterations)
{
    struct chunk_hash h;
    struct sign_digest d;
    double t0 = seconds();
    for (int i = 0; i < iterations; i++) {
        if (kind == XXH3)
            chunk_hash_compute(buf, len, &h);
        else if (sign_digest_compute_alg(kind == SHA256 ? SIGN_DIGEST_SHA256 : SIGN_DIGEST_BLAKE2B, buf, len, &d))
            return -1;
    }
    return seconds() - t0;
}

int main(int argc, char **argv)
{
    size_t len = argc > 1 ? strtoul(argv[1], NULL, 0) : 131072;
    int rounds = argc > 2 ? atoi(argv[2]) : 5;
    if (argc > 3 || len == 0 || len > (64u << 20) || rounds < 1 || rounds > 100) {
        fprintf(stderr, "usage: digestspeed [CHUNK_SIZE [ROUNDS]] (size up to 64M, 1 to 100 rounds)\n");
        return 2;
    }
    if (sign_init() != 0) {
        fprintf(stderr, "digestspeed: cannot initialise libsodium or OpenSSL\n");
        return 1;
    }
    unsigned char *buf = malloc(len);
    if (!buf) {
        fprintf(stderr, "digestspeed: out of memory\n");
        return 1;
    }
    srand(1);
    for (size_t i = 0; i < len; i++)
        buf[i] = (unsigned char)rand();
    int iterations = (int)((256u << 20) / len) + 1; /* about 256 MiB a round */
    double rate[KINDS][100];
    for (int r = 0; r < rounds; r++)
        for (int k = 0; k < KINDS; k++) {
            double s = run(k, buf, len, iterations);
            if (s < 0) {
                fprintf(stderr, "digestspeed: %s failed\n", names[k]);
                return 1;
            }
            rate[k][r] = (double)len * iterations / s / 1e9;
        }
    for (int k = 0; k < KINDS; k++) {
        qsort(rate[k], (size_t)rounds, sizeof(double), compare);
        double median = rate[k][rounds / 2];
        printf("%-12s %6.2f GB/s  %7.1f us per %zu-byte chunk\n", names[k], median, (double)len / median / 1e3, len);
    }
    free(buf);
    return 0;
}
