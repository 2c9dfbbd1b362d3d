/* imgfsctl status: a summary of a mount, read from its status files. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imgfsctl.h"
#include "util.h"

void status_help(FILE *out)
{
    fprintf(out, "usage: imgfsctl status MOUNTPOINT [--json]\n"
                 "\n"
                 "Prints a summary of the imgfs mounted at MOUNTPOINT: repository, cache, fetches,\n"
                 "mirrors, and one line per base version and per VM. Every figure comes from\n"
                 "MOUNTPOINT/.imgfs/stats, which has them all.\n"
                 "\n"
                 "  --json   print MOUNTPOINT/.imgfs/status.json instead: the same figures as a\n"
                 "           JSON object (untitled sections by name, titled ones by title:\n"
                 "           .cache.bytes, .base[\"deb@1\"].cache_hits, .vm.web1.layer_bytes)\n");
}

/* .imgfs/stats as lines of "key value" under "[section]" headers. */
struct stats {
    char *text;
    size_t len;
};

/* The value of key in section (the whole rest of the line), or "?". */
static const char *stat_get(const struct stats *s, const char *section, const char *key, char *out, size_t len)
{
    const char *p = s->text;
    bool in = false;
    size_t klen = strlen(key);
    snprintf(out, len, "?");
    while (p && *p) {
        const char *eol = strchr(p, '\n');
        size_t n = eol ? (size_t)(eol - p) : strlen(p);
        if (p[0] == '[') {
            in = n == strlen(section) + 2 && strncmp(p + 1, section, strlen(section)) == 0;
        } else if (in && n > klen && strncmp(p, key, klen) == 0 && p[klen] == ' ') {
            const char *v = p + klen;
            while (*v == ' ')
                v++;
            snprintf(out, len, "%.*s", (int)(n - (size_t)(v - p)), v);
            return out;
        }
        p = eol ? eol + 1 : NULL;
    }
    return out;
}

static uint64_t stat_u64(const struct stats *s, const char *section, const char *key)
{
    char v[64];
    uint64_t n = 0;
    parse_u64(stat_get(s, section, key, v, sizeof(v)), &n);
    return n;
}

static const char *size_of(const struct stats *s, const char *section, const char *key, char *out, size_t len)
{
    return format_size(stat_u64(s, section, key), out, len);
}

/* Calls fn for the title of each "[kind TITLE]" section. */
static void each_titled(const struct stats *s, const char *kind, void (*fn)(const struct stats *, const char *))
{
    size_t klen = strlen(kind);
    for (const char *p = s->text; p && *p;) {
        const char *eol = strchr(p, '\n');
        size_t n = eol ? (size_t)(eol - p) : strlen(p);
        if (p[0] == '[' && n > klen + 3 && strncmp(p + 1, kind, klen) == 0 && p[klen + 1] == ' ') {
            char title[256];
            snprintf(title, sizeof(title), "%.*s", (int)(n - klen - 3), p + klen + 2);
            fn(s, title);
        }
        p = eol ? eol + 1 : NULL;
    }
}

static void print_base(const struct stats *s, const char *title)
{
    char section[300], size[32], resident[32], rate[32];
    snprintf(section, sizeof(section), "base %s", title);
    uint64_t stored = stat_u64(s, section, "stored_chunks"), in = stat_u64(s, section, "resident_chunks");
    printf("  %-24s %10s %10s %6.0f%% %7.1f%% %8" PRIu64 " %8" PRIu64 "\n", title,
           size_of(s, section, "size", size, 32), size_of(s, section, "resident_bytes", resident, 32),
           stored ? 100.0 * (double)in / (double)stored : 100.0,
           100 * strtod(stat_get(s, section, "hit_rate", rate, sizeof(rate)), NULL), stat_u64(s, section, "cache_misses"),
           stat_u64(s, section, "read_errors"));
}

static void print_vm(const struct stats *s, const char *title)
{
    char section[300], base[128], size[32], layer[32];
    snprintf(section, sizeof(section), "vm %s", title);
    printf("  %-24s %-20s %10s %10s %6" PRIu64 " %9" PRIu64 "\n", title, stat_get(s, section, "base", base, sizeof(base)),
           size_of(s, section, "size", size, 32), size_of(s, section, "layer_bytes", layer, 32),
           stat_u64(s, section, "open"), stat_u64(s, section, "snapshots"));
}

static void print_mirror(const struct stats *s, const char *title)
{
    char section[300], url[300], current[16], error[300];
    snprintf(section, sizeof(section), "mirror %s", title);
    printf("mirror %-6s %s%s: %" PRIu64 " requests, %" PRIu64 " errors, last error %s\n", title,
           stat_get(s, section, "url", url, sizeof(url)),
           strcmp(stat_get(s, section, "current", current, sizeof(current)), "yes") == 0 ? " (current)" : "",
           stat_u64(s, section, "requests"), stat_u64(s, section, "errors"),
           stat_get(s, section, "last_error", error, sizeof(error)));
}

static bool has_titled(const struct stats *s, const char *kind)
{
    char header[64];
    snprintf(header, sizeof(header), "\n[%s ", kind);
    return strstr(s->text, header) != NULL;
}

static void print_summary(const char *mountpoint, const struct stats *s)
{
    char a[300], b[300], c[64], d[64];
    uint64_t up = stat_u64(s, "daemon", "uptime_seconds");
    printf("imgfs %s at %s, up %" PRIu64 " h %02" PRIu64 " min\n", stat_get(s, "daemon", "version", a, sizeof(a)),
           mountpoint, up / 3600, up % 3600 / 60);
    printf("repository   %s (%s)\n", stat_get(s, "daemon", "repository", a, sizeof(a)),
           stat_get(s, "daemon", "repository_kind", b, sizeof(b)));
    uint64_t limit = stat_u64(s, "cache", "limit");
    printf("cache        %s: %s in %" PRIu64 " chunks, limit %s, %s pinned, %" PRIu64 " evicted\n",
           stat_get(s, "cache", "directory", a, sizeof(a)), size_of(s, "cache", "bytes", c, sizeof(c)),
           stat_u64(s, "cache", "chunks"), limit ? format_size(limit, b, sizeof(b)) : "none",
           size_of(s, "cache", "pinned_bytes", d, sizeof(d)), stat_u64(s, "cache", "evictions"));
    printf("fetch        %" PRIu64 " requests, %s transferred, %" PRIu64 " errors, %" PRIu64
           " failed verification\n",
           stat_u64(s, "fetch", "requests"), size_of(s, "fetch", "bytes_transferred", c, sizeof(c)),
           stat_u64(s, "fetch", "errors"), stat_u64(s, "fetch", "verify_failures"));
    printf("last error   %s\n", stat_get(s, "fetch", "last_error", a, sizeof(a)));
    each_titled(s, "mirror", print_mirror);
    if (strcmp(stat_get(s, "daemon", "refresh_error", a, sizeof(a)), "none") != 0)
        printf("problem      repository refresh: %s\n", a);
    if (strcmp(stat_get(s, "vms", "load_errors", a, sizeof(a)), "none") != 0)
        printf("problem      VMs that did not load: %s\n", a);
    if (has_titled(s, "base")) {
        /* CACHED: stored chunks resident; HITS: chunk reads that needed no fetch. */
        printf("\n  %-24s %10s %10s %7s %8s %8s %8s\n", "BASE", "SIZE", "RESIDENT", "CACHED", "HITS", "MISSES",
               "ERRORS");
        each_titled(s, "base", print_base);
    }
    if (has_titled(s, "vm")) {
        printf("\n  %-24s %-20s %10s %10s %6s %9s\n", "VM", "BASE", "SIZE", "LAYERS", "OPEN", "SNAPSHOTS");
        each_titled(s, "vm", print_vm);
    }
}

int status_main(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        status_help(stdout);
        return 0;
    }
    bool json;
    const char *mountpoint;
    int rc = parse_arg_and_flag("status", argc, argv, "MOUNTPOINT", &mountpoint, "--json", &json);
    if (rc)
        return rc;
    char path[PATH_MAX];
    if (path_join(path, sizeof(path), "%s/.imgfs/%s", mountpoint, json ? "status.json" : "stats") < 0)
        return usage_error("status", "mount point path is too long");
    struct stats s;
    rc = read_file(path, 64u << 20, &s.text, &s.len);
    if (rc) {
        fprintf(stderr, "imgfsctl status: %s is not an imgfs mount (%s: %s)\n", mountpoint, path, strerror(-rc));
        return 1;
    }
    if (json)
        fwrite(s.text, 1, s.len, stdout);
    else
        print_summary(mountpoint, &s);
    free(s.text);
    return 0;
}
