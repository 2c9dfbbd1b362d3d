#include "config.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

const char *config_default_path(bool *named)
{
    const char *env = getenv(IMGFS_CONFIG_ENV);
    *named = env && *env;
    return *named ? env : IMGFS_DEFAULT_CONFIG;
}

static int add_option(struct config *cfg, const char *text, unsigned line)
{
    struct config_option *grown = realloc(cfg->options, (cfg->count + 1) * sizeof(*grown));
    if (!grown)
        return -ENOMEM;
    cfg->options = grown;
    struct config_option *o = &cfg->options[cfg->count];
    if (!(o->text = strdup(text)))
        return -ENOMEM;
    o->file = cfg->files[cfg->file_count - 1];
    o->line = line;
    cfg->count++;
    return 0;
}

static int add_file(struct config *cfg, const char *path)
{
    char **grown = realloc(cfg->files, (cfg->file_count + 1) * sizeof(*grown));
    if (!grown)
        return -ENOMEM;
    cfg->files = grown;
    if (!(cfg->files[cfg->file_count] = strdup(path)))
        return -ENOMEM;
    cfg->file_count++;
    return 0;
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        *--end = '\0';
    return s;
}

/* One line: "key" or "key = value" becomes "key" or "key=value". */
static int parse_line(struct config *cfg, const char *path, unsigned lineno, char *line, char *err, size_t errlen)
{
    line = trim(line);
    if (!*line || *line == '#')
        return 0;
    char *eq = strchr(line, '=');
    char *key = line, *value = NULL;
    if (eq) {
        *eq = '\0';
        key = trim(line);
        value = trim(eq + 1);
    }
    bool key_ok = *key != '\0';
    for (const char *p = key; *p; p++)
        key_ok = key_ok && (isalnum((unsigned char)*p) || *p == '_' || *p == '-');
    if (!key_ok) {
        snprintf(err, errlen, "%s:%u: '%s' is not an option name", path, lineno, key);
        return -EINVAL;
    }
    if (strcmp(key, "config") == 0) {
        snprintf(err, errlen, "%s:%u: config= cannot be set inside a config file", path, lineno);
        return -EINVAL;
    }
    if (value && strchr(value, ',')) {
        snprintf(err, errlen, "%s:%u: the value of %s contains ',', which separates mount options", path, lineno,
                 key);
        return -EINVAL;
    }
    char option[4200];
    if (path_join(option, sizeof(option), value ? "%s=%s" : "%s", key, value) < 0) {
        snprintf(err, errlen, "%s:%u: the line is too long", path, lineno);
        return -EINVAL;
    }
    int rc = add_option(cfg, option, lineno);
    if (rc)
        snprintf(err, errlen, "out of memory");
    return rc;
}

static int read_one(struct config *cfg, const char *path, bool must_exist, char *err, size_t errlen)
{
    char *text;
    size_t len;
    int rc = read_file(path, 1u << 20, &text, &len);
    if (rc == -ENOENT && !must_exist)
        return 0;
    if (rc) {
        snprintf(err, errlen, "cannot read the config file %s: %s", path, strerror(-rc));
        return rc;
    }
    if ((rc = add_file(cfg, path)) != 0) {
        snprintf(err, errlen, "out of memory");
        free(text);
        return rc;
    }
    if (memchr(text, '\0', len)) {
        snprintf(err, errlen, "the config file %s contains a NUL byte", path);
        free(text);
        return -EINVAL;
    }
    unsigned lineno = 0;
    char *save = NULL;
    /* strtok_r would merge empty lines and miscount them; split by hand. */
    for (char *line = text; line && !rc; line = save) {
        char *nl = strchr(line, '\n');
        save = nl ? nl + 1 : NULL;
        if (nl)
            *nl = '\0';
        rc = parse_line(cfg, path, ++lineno, line, err, errlen);
    }
    free(text);
    return rc;
}

static int is_conf_file(const struct dirent *e)
{
    size_t n = strlen(e->d_name);
    return e->d_name[0] != '.' && n > 5 && strcmp(e->d_name + n - 5, ".conf") == 0;
}

int config_read(const char *path, bool must_exist, struct config *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (strcmp(path, "none") == 0)
        return 0;
    int rc = read_one(out, path, must_exist, err, errlen);
    char dir[PATH_MAX];
    if (!rc && path_join(dir, sizeof(dir), "%s.d", path) < 0) {
        snprintf(err, errlen, "config path %s is too long", path);
        rc = -ENAMETOOLONG;
    }
    struct dirent **entries = NULL;
    int n = rc ? 0 : scandir(dir, &entries, is_conf_file, alphasort);
    if (n < 0 && errno != ENOENT && errno != ENOTDIR) {
        rc = -errno;
        snprintf(err, errlen, "cannot list %s: %s", dir, strerror(errno));
    }
    for (int i = 0; i < n; i++) {
        char file[PATH_MAX];
        if (!rc && path_join(file, sizeof(file), "%s/%s", dir, entries[i]->d_name) < 0) {
            snprintf(err, errlen, "config path %s/%s is too long", dir, entries[i]->d_name);
            rc = -ENAMETOOLONG;
        }
        if (!rc)
            rc = read_one(out, file, true, err, errlen);
        free(entries[i]);
    }
    free(entries);
    if (rc)
        config_free(out);
    return rc;
}

const struct config_option *config_find(const struct config *cfg, const char *key)
{
    size_t klen = strlen(key);
    for (size_t i = cfg->count; i-- > 0;) {
        const char *o = cfg->options[i].text;
        if (strncmp(o, key, klen) == 0 && (o[klen] == '=' || o[klen] == '\0'))
            return &cfg->options[i];
    }
    return NULL;
}

const char *config_lookup(const struct config *cfg, const char *key)
{
    const struct config_option *o = config_find(cfg, key);
    if (!o)
        return NULL;
    const char *eq = strchr(o->text, '=');
    return eq ? eq + 1 : "";
}

void config_free(struct config *cfg)
{
    for (size_t i = 0; i < cfg->count; i++)
        free(cfg->options[i].text);
    for (size_t i = 0; i < cfg->file_count; i++)
        free(cfg->files[i]);
    free(cfg->options);
    free(cfg->files);
    memset(cfg, 0, sizeof(*cfg));
}
