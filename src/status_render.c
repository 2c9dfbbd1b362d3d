/* status: building a snapshot and rendering it (status.h). Pure: the
 * mount's figures are gathered by fs/status.c. */
#include "status.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a growable text buffer ------------------------------------------------------ */

struct text {
    char *data;
    size_t len;
    size_t cap;
    bool failed;
};

/* Room for n more bytes and a NUL; false (and failed) when out of memory. */
static bool text_reserve(struct text *t, size_t n)
{
    if (t->failed)
        return false;
    if (t->data && t->len + n < t->cap)
        return true;
    size_t cap = t->cap ? t->cap * 2 : 4096;
    while (cap < t->len + n + 1)
        cap *= 2;
    char *grown = realloc(t->data, cap);
    if (!grown) {
        t->failed = true;
        return false;
    }
    t->data = grown;
    t->cap = cap;
    return true;
}

/* The renderers put their fixed words, keys and whole numbers with these,
 * not one printf a piece: a status file at thousands of VMs is a hundred
 * thousand pieces, and printf's setup cost more than the bytes. */
static void text_put(struct text *t, const char *s, size_t n)
{
    if (!text_reserve(t, n))
        return;
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
}

static void text_str(struct text *t, const char *s) { text_put(t, s, strlen(s)); }

/* s, then spaces up to width (printf's "%-WIDTHs"). */
static void text_padded(struct text *t, const char *s, size_t width)
{
    static const char spaces[] = "                                ";
    size_t n = strlen(s);
    text_put(t, s, n);
    for (size_t pad = n < width ? width - n : 0; pad > 0;) {
        size_t k = pad < sizeof(spaces) - 1 ? pad : sizeof(spaces) - 1;
        text_put(t, spaces, k);
        pad -= k;
    }
}

/* "%" PRId64 of v. */
static void text_int(struct text *t, int64_t v)
{
    char buf[24];
    char *p = buf + sizeof(buf);
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    do
        *--p = (char)('0' + u % 10);
    while ((u /= 10) != 0);
    if (v < 0)
        *--p = '-';
    text_put(t, p, (size_t)(buf + sizeof(buf) - p));
}

static void text_printf(struct text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
__attribute__((format(printf, 2, 0))) static void text_vprintf(struct text *t, const char *fmt, va_list ap)
{
    for (;;) {
        if (t->failed)
            return;
        va_list copy;
        va_copy(copy, ap);
        int n = vsnprintf(t->data ? t->data + t->len : NULL, t->data ? t->cap - t->len : 0, fmt, copy);
        va_end(copy);
        if (n < 0) {
            t->failed = true;
            return;
        }
        if (t->data && t->len + (size_t)n < t->cap) {
            t->len += (size_t)n;
            return;
        }
        text_reserve(t, (size_t)n);
    }
}

static void text_printf(struct text *t, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    text_vprintf(t, fmt, ap);
    va_end(ap);
}

/* Hands the text to the caller (or frees it on failure). */
static int text_finish(struct text *t, bool failed, char **out, size_t *len)
{
    if (t->failed || failed || !t->data) {
        free(t->data);
        return -ENOMEM;
    }
    *out = t->data;
    *len = t->len;
    return 0;
}

/* ---- building a snapshot ----------------------------------------------------------- */

/* src into dst[cap], cut to fit (snprintf's "%s" without its setup: a
 * snapshot at thousands of VMs names tens of thousands of fields). */
static void copy_cut(char *dst, size_t cap, const char *src)
{
    size_t n = strnlen(src, cap - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

struct status_section *status_add_section(struct status_snapshot *s, const char *kind, const char *title)
{
    if (s->count == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 16;
        struct status_section *grown = realloc(s->sections, cap * sizeof(*grown));
        if (!grown) {
            s->failed = true;
            return NULL;
        }
        s->sections = grown;
        s->cap = cap;
    }
    struct status_section *sec = &s->sections[s->count++];
    memset(sec, 0, sizeof(*sec));
    copy_cut(sec->kind, sizeof(sec->kind), kind);
    copy_cut(sec->title, sizeof(sec->title), title ? title : "");
    return sec;
}

void status_add_label(struct status_snapshot *s, struct status_section *sec, const char *name, const char *value)
{
    if (!sec)
        return;
    if (sec->label_count == STATUS_MAX_LABELS) {
        s->failed = true;
        return;
    }
    struct status_label *l = &sec->labels[sec->label_count++];
    copy_cut(l->name, sizeof(l->name), name);
    copy_cut(l->value, sizeof(l->value), value); /* a longer value is cut */
}

static struct status_field *add_field(struct status_snapshot *s, struct status_section *sec, const char *key,
                                      enum status_type type)
{
    if (!sec)
        return NULL;
    if (sec->field_count == sec->field_cap) {
        size_t cap = sec->field_cap ? sec->field_cap * 2 : 16;
        struct status_field *grown = realloc(sec->fields, cap * sizeof(*grown));
        if (!grown) {
            s->failed = true;
            return NULL;
        }
        sec->fields = grown;
        sec->field_cap = cap;
    }
    struct status_field *f = &sec->fields[sec->field_count++];
    memset(f, 0, sizeof(*f));
    copy_cut(f->key, sizeof(f->key), key);
    f->type = type;
    return f;
}

void status_counter(struct status_snapshot *s, struct status_section *sec, const char *key, const char *help,
                    uint64_t value)
{
    struct status_field *f = add_field(s, sec, key, STATUS_COUNTER);
    if (f) {
        f->number = (double)value;
        f->help = help;
    }
}

void status_gauge(struct status_snapshot *s, struct status_section *sec, const char *key, const char *help,
                  double value, int decimals)
{
    struct status_field *f = add_field(s, sec, key, STATUS_GAUGE);
    if (f) {
        f->number = value;
        f->decimals = decimals;
        f->help = help;
    }
}

void status_text(struct status_snapshot *s, struct status_section *sec, enum status_type type, const char *key,
                 const char *fmt, ...)
{
    struct status_field *f = add_field(s, sec, key, type);
    if (!f)
        return;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&f->text, fmt, ap) < 0) {
        f->text = NULL;
        s->failed = true;
    }
    va_end(ap);
}

void status_snapshot_free(struct status_snapshot *s)
{
    for (size_t i = 0; i < s->count; i++) {
        for (size_t j = 0; j < s->sections[i].field_count; j++)
            free(s->sections[i].fields[j].text);
        free(s->sections[i].fields);
    }
    free(s->sections);
    memset(s, 0, sizeof(*s));
}

static bool is_numeric(const struct status_field *f) { return f->type == STATUS_COUNTER || f->type == STATUS_GAUGE; }

/* ---- rendering ------------------------------------------------------------------------ */

/* "%.*f" of v. A whole number (most of a status file: tens of thousands on
 * a host with thousands of VMs, durations of 0 among them) is the same text
 * printed as an integer and, with decimals, a point and that many zeros,
 * without %f's multiprecision arithmetic; within 2^53 every such double is
 * exactly its int64_t. -0 keeps its sign. */
static void text_number(struct text *t, int decimals, double v)
{
    static const char zeros[] = ".0000000000000000";
    if (decimals >= 0 && (size_t)decimals < sizeof(zeros) - 1 && fabs(v) <= 9007199254740992.0 &&
        v == (double)(int64_t)v && !(v == 0 && signbit(v))) {
        text_int(t, (int64_t)v);
        if (decimals)
            text_put(t, zeros, (size_t)decimals + 1);
    } else {
        text_printf(t, "%.*f", decimals, v);
    }
}

static void print_number(struct text *t, const struct status_field *f) { text_number(t, f->decimals, f->number); }

int status_render_stats(const struct status_snapshot *s, char **out, size_t *len)
{
    struct text t = {0};
    text_printf(&t, "# imgfs %s status; sizes in bytes\n", IMGFS_VERSION);
    for (size_t i = 0; i < s->count; i++) {
        const struct status_section *sec = &s->sections[i];
        text_str(&t, i ? "\n[" : "[");
        text_str(&t, sec->kind);
        if (sec->title[0]) {
            text_put(&t, " ", 1);
            text_str(&t, sec->title);
        }
        text_put(&t, "]\n", 2);
        for (size_t j = 0; j < sec->field_count; j++) {
            const struct status_field *f = &sec->fields[j];
            text_padded(&t, f->key, 17);
            text_put(&t, " ", 1);
            if (is_numeric(f))
                print_number(&t, f);
            else
                text_str(&t, f->text ? f->text : "");
            text_put(&t, "\n", 1);
        }
    }
    return text_finish(&t, s->failed, out, len);
}

static void json_string(struct text *t, const char *str)
{
    text_put(t, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)str; *p; p++) {
        size_t plain = 0; /* a run that needs no escape: one copy, not one a byte */
        while (p[plain] && p[plain] != '"' && p[plain] != '\\' && p[plain] >= 0x20)
            plain++;
        if (plain) {
            text_put(t, (const char *)p, plain);
            p += plain - 1;
        } else if (*p == '"' || *p == '\\') {
            char escaped[2] = {'\\', (char)*p};
            text_put(t, escaped, 2);
        } else {
            text_printf(t, "\\u%04x", *p);
        }
    }
    text_put(t, "\"", 1);
}

static void json_fields(struct text *t, const struct status_section *sec, const char *indent)
{
    bool first = true;
    for (size_t k = 0; k < sec->label_count; k++) {
        text_str(t, first ? "\n" : ",\n");
        text_str(t, indent);
        json_string(t, sec->labels[k].name);
        text_str(t, ": ");
        json_string(t, sec->labels[k].value);
        first = false;
    }
    for (size_t j = 0; j < sec->field_count; j++) {
        const struct status_field *f = &sec->fields[j];
        if (f->type == STATUS_VIEW)
            continue;
        bool duplicate = false; /* a label of the same name said it already */
        for (size_t k = 0; k < sec->label_count; k++)
            duplicate |= strcmp(sec->labels[k].name, f->key) == 0;
        if (duplicate)
            continue;
        text_str(t, first ? "\n" : ",\n");
        text_str(t, indent);
        json_string(t, f->key);
        text_str(t, ": ");
        if (is_numeric(f) && isfinite(f->number))
            print_number(t, f);
        else if (is_numeric(f))
            text_str(t, "null");
        else
            json_string(t, f->text ? f->text : "");
        first = false;
    }
}

/* The sections grouped by kind: of each section, the index of the first
 * section of its kind and of the next one (s->count after the last). A
 * renderer that groups by kind walks these instead of comparing every
 * earlier section, which cost sections^2 on a host with thousands of VMs. */
struct kind_links {
    size_t *first;
    size_t *next;
};

static void kind_links_free(struct kind_links *k)
{
    free(k->first);
    free(k->next);
}

static int kind_links_build(const struct status_snapshot *s, struct kind_links *k)
{
    size_t n = s->count + 1; /* never malloc(0) */
    k->first = malloc(n * sizeof(size_t));
    k->next = malloc(n * sizeof(size_t));
    size_t *kinds = malloc(n * sizeof(size_t)); /* the first section of each kind met (there are few) */
    size_t *last = malloc(n * sizeof(size_t));  /* the last section so far of each of those */
    if (!k->first || !k->next || !kinds || !last) {
        kind_links_free(k);
        free(kinds);
        free(last);
        return -ENOMEM;
    }
    size_t nkinds = 0;
    for (size_t i = 0; i < s->count; i++) {
        size_t d = 0;
        while (d < nkinds && strcmp(s->sections[kinds[d]].kind, s->sections[i].kind) != 0)
            d++;
        if (d == nkinds)
            kinds[nkinds++] = i;
        else
            k->next[last[d]] = i;
        k->first[i] = kinds[d];
        k->next[i] = s->count;
        last[d] = i;
    }
    free(kinds);
    free(last);
    return 0;
}

/* Untitled sections are objects under their kind; titled ones are objects
 * under their title inside one object per kind, in order of appearance. */
int status_render_json(const struct status_snapshot *s, char **out, size_t *len)
{
    struct kind_links kinds;
    if (kind_links_build(s, &kinds) != 0)
        return -ENOMEM;
    struct text t = {0};
    text_str(&t, "{\n  \"imgfs_version\": ");
    json_string(&t, IMGFS_VERSION);
    for (size_t i = 0; i < s->count; i++) {
        const struct status_section *sec = &s->sections[i];
        if (kinds.first[i] < i)
            continue; /* its kind's object is written */
        text_str(&t, ",\n  ");
        json_string(&t, sec->kind);
        text_str(&t, ": {");
        if (!sec->title[0]) {
            json_fields(&t, sec, "    ");
            text_str(&t, "\n  }");
            continue;
        }
        bool first = true;
        for (size_t j = i; j < s->count; j = kinds.next[j]) {
            const struct status_section *same = &s->sections[j];
            text_str(&t, first ? "\n    " : ",\n    ");
            json_string(&t, same->title);
            text_str(&t, ": {");
            json_fields(&t, same, "      ");
            text_str(&t, "\n    }");
            first = false;
        }
        text_str(&t, "\n  }");
    }
    text_str(&t, "\n}\n");
    kind_links_free(&kinds);
    return text_finish(&t, s->failed, out, len);
}

/* A metric name from KIND and KEY: [a-zA-Z0-9_] only. */
static void metric_name(char *out, size_t len, const char *kind, const char *key, bool counter)
{
    size_t n = (size_t)snprintf(out, len, "imgfs_%s_%s", kind, key);
    for (char *p = out; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '_')
            *p = '_';
    size_t klen = strlen(key);
    if (counter && !(klen >= 6 && strcmp(key + klen - 6, "_total") == 0) && n + 6 < len)
        strcat(out, "_total");
}

static void label_value(struct text *t, const char *v)
{
    for (const char *p = v; *p; p++) {
        size_t plain = strcspn(p, "\\\"\n"); /* one printf a run, not one a byte */
        if (plain) {
            text_put(t, p, plain);
            p += plain - 1;
        } else if (*p == '\n') {
            text_str(t, "\\n");
        } else {
            text_put(t, "\\", 1);
            text_put(t, p, 1);
        }
    }
}

/* {labels of the section[, extra fields of type info]} */
static void metric_labels(struct text *t, const struct status_section *sec, bool with_info)
{
    bool any = false;
    for (size_t k = 0; k < sec->label_count; k++) {
        text_str(t, any ? "," : "{");
        text_str(t, sec->labels[k].name);
        text_put(t, "=\"", 2);
        label_value(t, sec->labels[k].value);
        text_str(t, "\"");
        any = true;
    }
    for (size_t j = 0; with_info && j < sec->field_count; j++) {
        const struct status_field *f = &sec->fields[j];
        if (f->type != STATUS_INFO)
            continue;
        text_str(t, any ? "," : "{");
        text_str(t, f->key);
        text_put(t, "=\"", 2);
        label_value(t, f->text ? f->text : "");
        text_str(t, "\"");
        any = true;
    }
    if (any)
        text_str(t, "}");
}

static bool section_has_info(const struct status_section *sec)
{
    for (size_t j = 0; j < sec->field_count; j++)
        if (sec->fields[j].type == STATUS_INFO)
            return true;
    return false;
}

/* One family per (kind, key), all its samples together, as the format
 * requires; families in order of first appearance. */
int status_render_metrics(const struct status_snapshot *s, char **out, size_t *len)
{
    struct kind_links kinds;
    if (kind_links_build(s, &kinds) != 0)
        return -ENOMEM;
    struct text t = {0};
    for (size_t i = 0; i < s->count; i++) {
        const struct status_section *sec = &s->sections[i];
        if (kinds.first[i] == i && section_has_info(sec)) {
            text_printf(&t, "# HELP imgfs_%s_info Identity of each %s section (value 1).\n# TYPE imgfs_%s_info gauge\n",
                        sec->kind, sec->kind, sec->kind);
            for (size_t j = i; j < s->count; j = kinds.next[j]) {
                text_str(&t, "imgfs_");
                text_str(&t, sec->kind);
                text_str(&t, "_info");
                metric_labels(&t, &s->sections[j], true);
                text_str(&t, " 1\n");
            }
        }
        for (size_t f = 0; f < sec->field_count; f++) {
            const struct status_field *field = &sec->fields[f];
            if (!is_numeric(field))
                continue;
            /* Skip a family printed already by an earlier section of the kind. */
            bool family_seen = false;
            for (size_t p = kinds.first[i]; p < i && !family_seen; p = kinds.next[p]) {
                for (size_t q = 0; q < s->sections[p].field_count; q++)
                    family_seen |= is_numeric(&s->sections[p].fields[q]) &&
                                   strcmp(s->sections[p].fields[q].key, field->key) == 0;
            }
            if (family_seen)
                continue;
            char name[128];
            bool counter = field->type == STATUS_COUNTER;
            metric_name(name, sizeof(name), sec->kind, field->key, counter);
            text_printf(&t, "# HELP %s %s\n# TYPE %s %s\n", name, field->help ? field->help : field->key, name,
                        counter ? "counter" : "gauge");
            for (size_t j = i; j < s->count; j = kinds.next[j]) {
                const struct status_section *same = &s->sections[j];
                for (size_t q = 0; q < same->field_count; q++) {
                    const struct status_field *v = &same->fields[q];
                    if (v->type != field->type || strcmp(v->key, field->key) != 0)
                        continue;
                    text_str(&t, name);
                    metric_labels(&t, same, false);
                    text_str(&t, " ");
                    if (isfinite(v->number))
                        text_number(&t, v->decimals, v->number);
                    else
                        text_str(&t, "NaN");
                    text_str(&t, "\n");
                }
            }
        }
    }
    kind_links_free(&kinds);
    return text_finish(&t, s->failed, out, len);
}
