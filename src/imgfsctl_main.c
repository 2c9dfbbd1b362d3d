/* imgfsctl: administration of imgfs repositories and mounts. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "publish.h"
#include "repo.h"
#include "util.h"

struct subcommand {
    const char *name;
    const char *summary;
    int (*run)(int argc, char **argv);
    void (*help)(FILE *out);
};

static int usage_error(const char *cmd, const char *msg)
{
    fprintf(stderr, "imgfsctl %s: %s (see imgfsctl %s --help)\n", cmd, msg, cmd);
    return 2;
}

static bool wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            break;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return true;
    }
    return false;
}

/* ---- publish ------------------------------------------------------------------ */

static void publish_help(FILE *out)
{
    fprintf(out,
            "usage: imgfsctl publish IMAGE REPO --name NAME [--chunk-size SIZE] [--level N]\n"
            "\n"
            "Publishes IMAGE (raw or qcow2, detected from its content) as a new version of\n"
            "NAME in the local repository directory REPO (created if missing or empty).\n"
            "Chunks that the repository already holds are not stored again, and all-zero\n"
            "chunks are not stored at all. Prints the new version number and a summary.\n"
            "\n"
            "  --name NAME        base name: letters, digits, '.', '_', '-' (max 64)\n"
            "  --chunk-size SIZE  power of two from 4K to 16M (default 128K)\n"
            "  --level N          zstd level 1-19, 0 stores chunks uncompressed (default 3)\n");
}

static int publish_main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"name", required_argument, NULL, 'n'},
        {"chunk-size", required_argument, NULL, 'c'},
        {"level", required_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    struct publish_options opts = {.chunk_size = PUBLISH_DEFAULT_CHUNK_SIZE,
                                   .zstd_level = PUBLISH_DEFAULT_ZSTD_LEVEL};
    int c;
    uint64_t v;
    opterr = 0; /* one message of our own instead of getopt's */
    while ((c = getopt_long(argc, argv, "n:c:l:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'n': opts.name = optarg; break;
        case 'c':
            if (parse_size(optarg, &v) < 0 || v > UINT32_MAX)
                return usage_error("publish", "--chunk-size needs a size such as 256K");
            opts.chunk_size = (uint32_t)v;
            break;
        case 'l':
            if (parse_u64(optarg, &v) < 0 || v > 19)
                return usage_error("publish", "--level needs a number from 0 to 19");
            opts.zstd_level = (int)v;
            break;
        case 'h': publish_help(stdout); return 0;
        default: return usage_error("publish", "unknown or incomplete option");
        }
    }
    if (argc - optind != 2)
        return usage_error("publish", "needs exactly IMAGE and REPO");
    if (!opts.name)
        return usage_error("publish", "--name is required");
    opts.image_path = argv[optind];
    opts.repo_path = argv[optind + 1];

    struct publish_result res;
    char err[512];
    double started = now_seconds();
    if (publish_image(&opts, &res, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl publish: %s\n", err);
        return 1;
    }
    double elapsed = now_seconds() - started;
    char read_s[32], stored_s[32];
    printf("published %s@%" PRIu64 "\n", opts.name, res.version);
    printf("source      %s (%s), %" PRIu64 " bytes\n", opts.image_path, res.format, res.size);
    printf("read        %s in %.1f s\n", format_size(res.bytes_read, read_s, sizeof(read_s)), elapsed);
    printf("chunks      %" PRIu64 " new, %" PRIu64 " reused, %" PRIu64 " zero (chunk size %" PRIu32 ")\n",
           res.chunks_new, res.chunks_reused, res.chunks_zero, opts.chunk_size);
    printf("stored      %s (%" PRIu64 " bytes)\n", format_size(res.bytes_stored, stored_s, sizeof(stored_s)),
           res.bytes_stored);
    return 0;
}

/* ---- status --------------------------------------------------------------------- */

static void status_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl status MOUNTPOINT\n"
                 "\n"
                 "Prints the status of the imgfs mounted at MOUNTPOINT (its .imgfs/stats file).\n");
}

static int status_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        status_help(stdout);
        return 0;
    }
    if (argc != 2)
        return usage_error("status", "needs exactly MOUNTPOINT");
    char path[PATH_MAX];
    if (path_join(path, sizeof(path), "%s/.imgfs/stats", argv[1]) < 0)
        return usage_error("status", "mount point path is too long");
    char *text;
    size_t len;
    int rc = read_file(path, 64u << 20, &text, &len);
    if (rc) {
        fprintf(stderr, "imgfsctl status: %s is not an imgfs mount (%s)\n", argv[1], strerror(-rc));
        return 1;
    }
    fwrite(text, 1, len, stdout);
    free(text);
    return 0;
}

/* ---- versions ------------------------------------------------------------------- */

static void versions_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl versions REPO\n"
                 "\n"
                 "Lists the bases of the repository REPO (a directory or URL) with their newest\n"
                 "version, size and chunk size.\n");
}

static int versions_main(int argc, char **argv)
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

/* ---- dispatch --------------------------------------------------------------------- */

static const struct subcommand subcommands[] = {
    {"publish", "publish a raw or qcow2 image as a new base version", publish_main, publish_help},
    {"status", "show the status of a mount", status_main, status_help},
    {"versions", "list the bases of a repository", versions_main, versions_help},
};

static void main_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl SUBCOMMAND [ARGS...]\n\nSubcommands:\n");
    for (size_t i = 0; i < ARRAY_LEN(subcommands); i++)
        fprintf(out, "  %-10s %s\n", subcommands[i].name, subcommands[i].summary);
    fprintf(out, "\nEvery subcommand answers --help. Sizes accept suffixes (64K, 20G).\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        main_help(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        main_help(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("imgfsctl %s\n", IMGFS_VERSION);
        return 0;
    }
    for (size_t i = 0; i < ARRAY_LEN(subcommands); i++)
        if (strcmp(argv[1], subcommands[i].name) == 0)
            return subcommands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "imgfsctl: unknown subcommand '%s' (see imgfsctl --help)\n", argv[1]);
    return 2;
}
