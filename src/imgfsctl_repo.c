/* imgfsctl versions, retire and gc: the life cycle of a repository's versions
 * (lifecycle.h). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imgfsctl.h"
#include "lifecycle.h"
#include "repo.h"
#include "util.h"

void versions_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl versions REPO [NAME]\n"
                 "\n"
                 "Lists every version of every base of the repository REPO (a directory or URL),\n"
                 "or of base NAME only: when it was published (UTC), its virtual size, how many\n"
                 "distinct chunks it stores and their stored (compressed) size, and how much of\n"
                 "that no other version shares, which is what retire plus gc would free. Stored\n"
                 "sizes are shown for local repositories only. Retired versions are listed as\n"
                 "such.\n");
}

static const char *size_or_dash(uint64_t bytes, char *buf, size_t len)
{
    return bytes == LIFECYCLE_UNKNOWN ? "-" : format_size(bytes, buf, len);
}

int versions_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        versions_help(stdout);
        return 0;
    }
    if (argc != 2 && argc != 3)
        return usage_error("versions", "needs REPO and optionally NAME");
    char err[512];
    struct repo *repo;
    if (repo_open(argv[1], &repo, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl versions: %s\n", err);
        return 1;
    }
    struct version_info *v;
    size_t count;
    int rc = lifecycle_scan(repo, argc == 3 ? argv[2] : NULL, &v, &count, err, sizeof(err));
    repo_close(repo);
    if (rc) {
        fprintf(stderr, "imgfsctl versions: %s\n", err);
        return 1;
    }
    printf("%-24s %7s  %-16s %10s %8s %10s %10s\n", "BASE", "VERSION", "PUBLISHED", "SIZE", "CHUNKS", "STORED",
           "OWN");
    for (size_t i = 0; i < count; i++) {
        if (v[i].retired) {
            printf("%-24s %7" PRIu64 "  retired\n", v[i].name, v[i].version);
            continue;
        }
        char when[32], size[32], stored[32], own[32];
        time_t t = (time_t)v[i].created;
        struct tm tm;
        strftime(when, sizeof(when), "%Y-%m-%d %H:%M", gmtime_r(&t, &tm));
        printf("%-24s %7" PRIu64 "  %-16s %10s %8" PRIu64 " %10s %10s%s\n", v[i].name, v[i].version, when,
               format_size(v[i].size, size, sizeof(size)), v[i].stored_chunks,
               size_or_dash(v[i].stored_bytes, stored, sizeof(stored)), size_or_dash(v[i].own_bytes, own, sizeof(own)),
               v[i].latest ? "  latest" : "");
    }
    free(v);
    return 0;
}

void retire_help(FILE *out)
{
    fprintf(out,
            "usage: imgfsctl retire REPO NAME@VERSION\n"
            "\n"
            "Retires an old version of a base in the local repository REPO: its manifest\n"
            "and prefetch lists are removed (a marker, bases/NAME/VERSION.retired, stays),\n"
            "new mounts no longer show it, and `imgfsctl gc REPO` then removes the chunks\n"
            "that no other version uses. The newest version of a base cannot be retired.\n"
            "\n"
            "Hosts that still have the version mounted keep serving what they have cached;\n"
            "once gc has run, their reads of chunks they do not have fail with EIO. A VM\n"
            "stays on the version it was made on: remove the VMs on a version first.\n");
}

int retire_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        retire_help(stdout);
        return 0;
    }
    if (argc != 3)
        return usage_error("retire", "needs REPO and NAME@VERSION");
    char name[80], err[512];
    const char *at = strchr(argv[2], '@');
    uint64_t version;
    if (!at || (size_t)(at - argv[2]) >= sizeof(name) || parse_u64(at + 1, &version) < 0)
        return usage_error("retire", "the version is written NAME@VERSION, e.g. debian12@3");
    snprintf(name, sizeof(name), "%.*s", (int)(at - argv[2]), argv[2]);
    if (!name_is_valid(name))
        return usage_error("retire", "invalid base name");
    if (lifecycle_retire(argv[1], name, version, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl retire: %s\n", err);
        return 1;
    }
    printf("retired %s@%" PRIu64 "; run imgfsctl gc %s to remove its chunks\n", name, version, argv[1]);
    return 0;
}

void gc_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl gc REPO [--dry-run]\n"
                 "\n"
                 "Removes from the local repository REPO every chunk that no version references\n"
                 "(after imgfsctl retire), and the temporary files of killed publishes. A publish\n"
                 "running at the same time is waited for, and so are its chunks kept. Nothing is\n"
                 "removed when a manifest cannot be read.\n"
                 "\n"
                 "  --dry-run   count what would be removed, remove nothing\n");
}

static void say_waiting(void)
{
    fprintf(stderr, "imgfsctl gc: waiting for a publish to finish\n");
}

int gc_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        gc_help(stdout);
        return 0;
    }
    bool dry_run;
    const char *repo;
    int rc = parse_arg_and_flag("gc", argc, argv, "REPO", &repo, "--dry-run", &dry_run);
    if (rc)
        return rc;
    struct gc_result res;
    char err[512], kept[32], removed[32];
    if (lifecycle_gc(repo, dry_run, say_waiting, &res, err, sizeof(err)) != 0) {
        fprintf(stderr, "imgfsctl gc: %s\n", err);
        return 1;
    }
    printf("%s %" PRIu64 " chunks (%s), %" PRIu64 " temporary files; kept %" PRIu64 " chunks (%s) of %" PRIu64
           " versions\n",
           dry_run ? "would remove" : "removed", res.chunks_removed, format_size(res.bytes_removed, removed, 32),
           res.temp_removed, res.chunks_kept, format_size(res.bytes_kept, kept, 32), res.versions);
    return 0;
}
