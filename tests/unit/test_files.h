/* test_files: directory helpers shared by the unit tests that work in a
 * temporary directory. */
#ifndef IMGFS_TEST_FILES_H
#define IMGFS_TEST_FILES_H

#include <dirent.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Entries in dir other than . and .., or -1 if it cannot be read. */
static inline int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(d);
    return n;
}

/* rm -rf of a test's temporary directory (a path the test made). */
static inline void remove_tree(const char *dir)
{
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", dir);
}

/* Deterministic pseudo-random bytes (xorshift64*): the same sequence in
 * every run, so a failing case can be replayed. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static inline void fill_random(unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        p[i] = (unsigned char)((rng_state * 0x2545f4914f6cdd1dull) >> 56);
    }
}

#endif
