/* Unit tests for status_render.c: one snapshot with hostile text (quotes,
 * backslashes, newlines, control bytes) rendered as stats, JSON and
 * Prometheus text, checked line by line: families grouped with one HELP and
 * TYPE, counters named _total, labels escaped, JSON escaped, titled sections
 * keyed by title, and view-only fields kept out of JSON and metrics. Then
 * a snapshot shaped like a large host (many sections of a kind, kinds
 * interleaved, keys repeated in a section, one key with two types) whose
 * JSON, metrics and stats must be byte for byte what the renderer wrote
 * before it grouped sections by kind in one pass and printed whole numbers
 * as integers (figures taken from it; the edge numbers came after the
 * first of those changes, whose output on the rest was that of the one
 * before). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "hash.h"
#include "status.h"

static int count(const char *text, const char *needle)
{
    int n = 0;
    for (const char *p = text; (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    return n;
}

static void build(struct status_snapshot *s)
{
    memset(s, 0, sizeof(*s));
    struct status_section *sec = status_add_section(s, "fetch", NULL);
    status_counter(s, sec, "requests", "Chunk requests.", 42);
    status_gauge(s, sec, "latency_ms", "Latency.", 1.25, 2);
    status_text(s, sec, STATUS_TEXT, "last_error", "bad \"quote\" \\ and\nnewline\x01");
    for (int i = 1; i <= 2; i++) {
        char title[32], version[8];
        snprintf(title, sizeof(title), "deb@%d", i);
        snprintf(version, sizeof(version), "%d", i);
        sec = status_add_section(s, "base", title);
        status_add_label(s, sec, "base", "deb");
        status_add_label(s, sec, "version", version);
        status_text(s, sec, STATUS_INFO, "manifest", "id\"%d\\", i);
        status_counter(s, sec, "cache_hits", "Hits.", (uint64_t)(10 * i));
        status_text(s, sec, STATUS_VIEW, "chunks_resident", "%d/5", i);
        status_gauge(s, sec, "size", "Size.", 4096.0 * i, 0);
    }
}

/* Many sections; kinds interleaved (vm, base, vm, ...) and uneven fields. */
static void build_large(struct status_snapshot *s)
{
    memset(s, 0, sizeof(*s));
    struct status_section *sec = status_add_section(s, "daemon", NULL);
    status_text(s, sec, STATUS_INFO, "version", "1");
    status_gauge(s, sec, "uptime_seconds", "Uptime.", 5, 0);
    for (int i = 0; i < 300; i++) {
        char title[32];
        snprintf(title, sizeof(title), "%s%d", i % 3 == 1 ? "os@" : "vm", i);
        sec = status_add_section(s, i % 3 == 1 ? "base" : "vm", title);
        status_add_label(s, sec, i % 3 == 1 ? "base" : "vm", title);
        status_text(s, sec, STATUS_INFO, "file", "f/%d", i);
        if (i % 7 == 0)
            status_gauge(s, sec, "late", "Only some sections have it.", i, 0);
        status_gauge(s, sec, "size", "Size.", 1000.0 * i, 0);
        status_counter(s, sec, "reads", "Reads.", (uint64_t)i * 3);
        if (i % 5 == 0)
            status_counter(s, sec, "size", "A counter of the gauge's name.", (uint64_t)i);
        status_gauge(s, sec, "ratio", "Ratio.", i / 7.0, 3);
        status_text(s, sec, STATUS_VIEW, "view", "%d/9", i);
        if (i % 11 == 0)
            status_gauge(s, sec, "reads", "The same key again.", i + 0.5, 1);
    }
    sec = status_add_section(s, "cache", NULL);
    status_gauge(s, sec, "chunks", "Chunks.", 7, 0);
    /* Numbers whose printing a faster path must keep: negative, -0, huge,
     * halves (rounded to even), beyond 2^53 and 2^64, and fractions. */
    static const double edge[] = {-1, -0.0, 0.5, 1.5, 2.5, -2.5, 9007199254740993.0, 18446744073709551616.0,
                                  1e300, -1e19, 123456789.25, 1e-7};
    for (size_t i = 0; i < sizeof(edge) / sizeof(edge[0]); i++) {
        char key[16];
        snprintf(key, sizeof(key), "edge%zu", i);
        status_gauge(s, sec, key, "An edge.", edge[i], 0);
        snprintf(key, sizeof(key), "edge%zu_2", i);
        status_gauge(s, sec, key, "An edge, two decimals.", edge[i], 2);
    }
    status_counter(s, sec, "big_total", "A large counter.", UINT64_MAX);
}

static void check_digest(const char *what, const char *text, size_t len, size_t want_len, const char *want_hex)
{
    struct chunk_hash h;
    char hex[CHUNK_HASH_HEX + 1];
    chunk_hash_compute(text, len, &h);
    chunk_hash_to_hex(&h, hex);
    if (len != want_len || strcmp(hex, want_hex) != 0)
        fprintf(stderr, "%s: %zu bytes, digest %s\n", what, len, hex);
    CHECK(len == want_len && strcmp(hex, want_hex) == 0);
}

static void test_large_unchanged(void)
{
    struct status_snapshot s;
    build_large(&s);
    CHECK(!s.failed && s.count == 302);
    char *text;
    size_t len;
    CHECK(status_render_metrics(&s, &text, &len) == 0);
    check_digest("metrics", text, len, 52466, "8d9738f070dc3eafd105e193c304acc0");
    free(text);
    CHECK(status_render_json(&s, &text, &len) == 0);
    check_digest("json", text, len, 42747, "234700c02fbf63aed25bfced74a07c8e");
    free(text);
    CHECK(status_render_stats(&s, &text, &len) == 0);
    check_digest("stats", text, len, 43637, "d4ebdafb9d7ef4c48b2eb1d849c9f75a");
    free(text);
    status_snapshot_free(&s);
}

int main(void)
{
    struct status_snapshot s;
    build(&s);
    CHECK(!s.failed && s.count == 3);
    char *text;
    size_t len;

    CHECK(status_render_stats(&s, &text, &len) == 0);
    CHECK(strlen(text) == len);
    CHECK(strstr(text, "\n[fetch]\n") || strncmp(strchr(text, '\n') + 1, "[fetch]\n", 8) == 0);
    CHECK(strstr(text, "\n[base deb@2]\n") != NULL);
    CHECK(strstr(text, "\nrequests          42\n") != NULL);
    CHECK(strstr(text, "\nlatency_ms        1.25\n") != NULL);
    CHECK(strstr(text, "\nchunks_resident   2/5\n") != NULL);
    free(text);

    CHECK(status_render_json(&s, &text, &len) == 0);
    CHECK(strstr(text, "\"last_error\": \"bad \\\"quote\\\" \\\\ and\\u000anewline\\u0001\"") != NULL);
    CHECK(count(text, "\"base\": {") == 1);         /* one object per kind */
    CHECK(strstr(text, "\"deb@1\": {") && strstr(text, "\"deb@2\": {"));
    CHECK(strstr(text, "\"cache_hits\": 20") != NULL);
    CHECK(strstr(text, "chunks_resident") == NULL); /* view only */
    CHECK(strstr(text, "\"manifest\": \"id\\\"1\\\\\"") != NULL);
    free(text);

    CHECK(status_render_metrics(&s, &text, &len) == 0);
    CHECK(count(text, "# TYPE imgfs_base_cache_hits_total counter\n") == 1);
    CHECK(count(text, "# HELP imgfs_base_cache_hits_total Hits.\n") == 1);
    CHECK(strstr(text, "imgfs_base_cache_hits_total{base=\"deb\",version=\"1\"} 10\n") != NULL);
    CHECK(strstr(text, "imgfs_base_cache_hits_total{base=\"deb\",version=\"2\"} 20\n") != NULL);
    CHECK(strstr(text, "# TYPE imgfs_base_size gauge\n") != NULL);
    CHECK(strstr(text, "imgfs_fetch_requests_total 42\n") != NULL);
    CHECK(strstr(text, "imgfs_fetch_latency_ms 1.25\n") != NULL);
    CHECK(strstr(text, "imgfs_base_info{base=\"deb\",version=\"2\",manifest=\"id\\\"2\\\\\"} 1\n") != NULL);
    CHECK(strstr(text, "last_error") == NULL && strstr(text, "chunks_resident") == NULL);
    /* The two samples of a family follow its TYPE line with nothing between. */
    const char *type = strstr(text, "# TYPE imgfs_base_cache_hits_total counter\n");
    CHECK(type && strncmp(strchr(type, '\n') + 1, "imgfs_base_cache_hits_total{base=\"deb\",version=\"1\"} 10\n"
                                                  "imgfs_base_cache_hits_total{base=\"deb\",version=\"2\"} 20\n",
                          110) == 0);
    free(text);

    status_snapshot_free(&s);
    test_large_unchanged();
    return check_summary();
}
