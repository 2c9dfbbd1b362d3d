/* config: the mount option files, /etc/imgfs/imgfs.conf and imgfs.conf.d/.
 *
 * A config file holds the same options that `imgfs -o` takes, one a line:
 *
 *   # comment
 *   cache=/var/cache/imgfs
 *   cache_size=50G
 *   allow_other
 *
 * Blank lines and lines starting with '#' are skipped; spaces around a line
 * and around '=' are dropped. A value cannot contain ',' (the -o separator).
 * The main file is read first, then PATH.d/ *.conf in name order (C locale),
 * so later files override earlier ones; the command line overrides them all.
 * Which keys exist is not known here: every line is handed to the option
 * parser as if it had been given with -o, so any mount option works in a file.
 *
 * Which file: -o config=PATH, else $IMGFS_CONFIG, else /etc/imgfs/imgfs.conf.
 * "none" reads no file. A missing default file (and a missing .d directory)
 * is not an error; a missing file that was named is.
 *
 * Contract: config_read() fills out (owned by the caller, freed with
 * config_free()) or returns a negative errno with one sentence in err that
 * names the file and line.
 */
#ifndef IMGFS_CONFIG_H
#define IMGFS_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#define IMGFS_DEFAULT_CONFIG "/etc/imgfs/imgfs.conf"
#define IMGFS_CONFIG_ENV "IMGFS_CONFIG"

struct config_option {
    char *text;       /* malloc'd "key" or "key=value" */
    const char *file; /* points into config.files */
    unsigned line;
};

struct config {
    struct config_option *options; /* in the order read */
    size_t count;
    char **files; /* malloc'd paths of the files read */
    size_t file_count;
};

/* The file to read when no config= option is given: $IMGFS_CONFIG or the
 * default. *named is set when it was named (then it must exist). */
const char *config_default_path(bool *named);

/* Reads path (or nothing for "none") and then path.d/ *.conf. */
int config_read(const char *path, bool must_exist, struct config *out, char *err, size_t errlen);

/* The value of the last "key=value" line, or NULL. A bare "key" gives "". */
const char *config_lookup(const struct config *cfg, const char *key);
/* The last line that set key, or NULL: for errors that name file and line. */
const struct config_option *config_find(const struct config *cfg, const char *key);

void config_free(struct config *cfg);

#endif
