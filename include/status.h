/* status: one snapshot of a mount's state and counters, rendered three ways.
 *
 * status_snapshot_take() reads every module's counters once into a list of
 * sections. Each section has a kind ("cache", "base", "vm", ...), an optional
 * title ("deb@1") and labels (base="deb", version="1"), and holds fields:
 * counters, gauges and text. The three renderers only walk that list:
 *
 *   .imgfs/stats        [kind title] then "key value" lines, for people and
 *                       for tests (every value is one number or word, or an
 *                       error sentence)
 *   .imgfs/status.json  {"kind": {fields}} for untitled sections and
 *                       {"kind": {"title": {fields}}} for titled ones
 *   .imgfs/metrics      Prometheus text exposition 0.0.4: each numeric field
 *                       is the family imgfs_KIND_KEY (counters end in
 *                       _total) with the section's labels; the info fields of
 *                       a section make one imgfs_KIND_info gauge of value 1
 *
 * Rules for builders: a kind is either always titled or never; a key has
 * one type within a kind (the renderers group by kind and key).
 *
 * So a module that adds a section or a field (status_add_section() and the
 * status_counter/gauge/text calls in status_snapshot_take()) shows up in all
 * three without renderer code.
 *
 * The builders and renderers (src/status_render.c) are pure and part of the
 * core; status_snapshot_take, status_render_file and the xattrs read a
 * mount (fs/status.c).
 *
 * Contract: a snapshot is owned by its caller and used by one thread. Out of
 * memory is remembered in the snapshot and reported by the renderers.
 */
#ifndef IMGFS_STATUS_H
#define IMGFS_STATUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct imgfs;
struct node;

enum status_type {
    STATUS_COUNTER, /* only goes up while the daemon runs */
    STATUS_GAUGE,   /* a current value */
    STATUS_INFO,    /* text that identifies the section: a label of imgfs_KIND_info */
    STATUS_TEXT,    /* text for people (errors): stats and JSON only */
    STATUS_VIEW,    /* a combined form ("3/5") kept for the stats view only */
};

struct status_field {
    char key[40];
    enum status_type type;
    double number;
    int decimals; /* how numbers are printed in stats and JSON */
    char *text;   /* owned; for the text types */
    const char *help; /* static; HELP line of a numeric field */
};

#define STATUS_MAX_LABELS 3

struct status_label {
    char name[16];
    char value[256];
};

struct status_section {
    char kind[24];
    char title[160];
    struct status_label labels[STATUS_MAX_LABELS];
    size_t label_count;
    struct status_field *fields;
    size_t field_count;
    size_t field_cap;
};

struct status_snapshot {
    struct status_section *sections;
    size_t count;
    size_t cap;
    bool failed; /* out of memory somewhere: renderers return -ENOMEM */
};

/* Builders. A NULL section (after out of memory) is accepted and ignored. */
struct status_section *status_add_section(struct status_snapshot *s, const char *kind, const char *title);
void status_add_label(struct status_snapshot *s, struct status_section *sec, const char *name, const char *value);
void status_counter(struct status_snapshot *s, struct status_section *sec, const char *key, const char *help,
                    uint64_t value);
void status_gauge(struct status_snapshot *s, struct status_section *sec, const char *key, const char *help,
                  double value, int decimals);
void status_text(struct status_snapshot *s, struct status_section *sec, enum status_type type, const char *key,
                 const char *fmt, ...) __attribute__((format(printf, 5, 6)));

void status_snapshot_free(struct status_snapshot *s);

/* The snapshot of a mount: daemon, cache, fetch, mirrors, vms, every base
 * version and every VM. */
int status_snapshot_take(struct imgfs *fs, struct status_snapshot *out);

/* Renderers: a malloc'd text and its length, or -ENOMEM. */
int status_render_stats(const struct status_snapshot *s, char **text, size_t *len);
int status_render_json(const struct status_snapshot *s, char **text, size_t *len);
int status_render_metrics(const struct status_snapshot *s, char **text, size_t *len);

/* The status file of inode ino (.imgfs/stats, status.json or metrics),
 * freshly rendered. */
int status_render_file(struct imgfs *fs, uint64_t ino, char **text, size_t *len);

/* user.imgfs.* extended attributes of a node: names as a list of
 * NUL-terminated strings (listxattr), and one value. -ENODATA when the node
 * has no such attribute. */
int status_xattr_list(struct imgfs *fs, const struct node *n, char **names, size_t *len);
int status_xattr_get(struct imgfs *fs, const struct node *n, const char *name, char **value, size_t *len);

#endif
