/* randread: reads random, unaligned ranges of FILE from several threads at
 * once and compares every byte with REFERENCE.
 *
 *   randread FILE REFERENCE THREADS ITERATIONS [SEED]
 *
 * Exits 0 when every read matched, 1 on any mismatch or read error. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct worker {
    const char *path;
    int ref_fd;
    uint64_t size;
    long iterations;
    unsigned seed;
    long mismatches;
    long errors;
    pthread_t thread;
};

static uint64_t next_random(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    int fd = open(w->path, O_RDONLY);
    if (fd < 0) {
        perror(w->path);
        w->errors++;
        return NULL;
    }
    enum { MAX_LEN = 1 << 20 };
    char *got = malloc(MAX_LEN), *want = malloc(MAX_LEN);
    uint64_t state = 0x9e3779b97f4a7c15ull ^ w->seed;
    for (long i = 0; i < w->iterations && got && want; i++) {
        uint64_t r = next_random(&state);
        /* Mostly small reads, some large, all at unaligned offsets. */
        size_t len = (r & 3) == 0 ? 1 + next_random(&state) % MAX_LEN : 1 + next_random(&state) % 16384;
        uint64_t off = next_random(&state) % w->size;
        if (off + len > w->size)
            len = (size_t)(w->size - off);
        ssize_t n = pread(fd, got, len, (off_t)off);
        ssize_t m = pread(w->ref_fd, want, len, (off_t)off);
        if (n < 0 || m < 0) {
            fprintf(stderr, "read error at %llu+%zu: %s\n", (unsigned long long)off, len, strerror(errno));
            w->errors++;
        } else if (n != m || memcmp(got, want, (size_t)n) != 0) {
            fprintf(stderr, "mismatch at %llu+%zu\n", (unsigned long long)off, len);
            w->mismatches++;
        }
    }
    free(got);
    free(want);
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: randread FILE REFERENCE THREADS ITERATIONS [SEED]\n");
        return 2;
    }
    int ref_fd = open(argv[2], O_RDONLY);
    struct stat st;
    if (ref_fd < 0 || fstat(ref_fd, &st) < 0 || st.st_size == 0) {
        fprintf(stderr, "randread: cannot use reference %s\n", argv[2]);
        return 2;
    }
    int threads = atoi(argv[3]);
    long iterations = atol(argv[4]);
    unsigned seed = argc > 5 ? (unsigned)atoi(argv[5]) : 1;
    if (threads < 1 || threads > 256 || iterations < 1) {
        fprintf(stderr, "randread: bad THREADS or ITERATIONS\n");
        return 2;
    }
    struct worker *w = calloc((size_t)threads, sizeof(*w));
    for (int i = 0; i < threads; i++) {
        w[i] = (struct worker){argv[1], ref_fd, (uint64_t)st.st_size, iterations, seed * 1000u + (unsigned)i, 0, 0, 0};
        pthread_create(&w[i].thread, NULL, run, &w[i]);
    }
    long mismatches = 0, errors = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(w[i].thread, NULL);
        mismatches += w[i].mismatches;
        errors += w[i].errors;
    }
    printf("randread: %d threads x %ld reads: %ld mismatches, %ld errors\n", threads, iterations, mismatches, errors);
    free(w);
    return mismatches || errors ? 1 : 0;
}
