/* imgfsctl versions, retire and gc: the life cycle of a repository's versions. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imgfsctl.h"
#include "repo.h"
#include "util.h"
void versions_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl versions REPO\n"
                 "\n"
                 "Lists the bases of the repository REPO (a directory or URL) with their newest\n"
                 "version, size and chunk size.\n");
}

int versions_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        versions_help(stdout);
        return 0;
    }
    if (argc != 2)
        return usage_error("versions", "needs exactly REPO");
    char err[512];
    struct repo *repo;
    struct repo_index index;
    if (repo_open(argv[1], &repo, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl versions: %s\n", err);
        return 1;
    }
    int status = 0;
    if (repo_read_index(repo, &index, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl versions: %s\n", err);
        repo_close(repo);
        return 1;
    }
    printf("%-24s %8s %16s %10s\n", "NAME", "LATEST", "SIZE", "CHUNK");
    for (size_t i = 0; i < index.count; i++) {
        struct manifest *m;
        if (repo_read_manifest(repo, index.entries[i].name, index.entries[i].latest, &m, err, sizeof(err))) {
            fprintf(stderr, "imgfsctl versions: %s\n", err);
            status = 1;
            continue;
        }
        printf("%-24s %8" PRIu64 " %16" PRIu64 " %10" PRIu32 "\n", m->name, m->version, m->size, m->chunk_size);
        manifest_free(m);
    }
    repo_index_free(&index);
    repo_close(repo);
    return status;
}

