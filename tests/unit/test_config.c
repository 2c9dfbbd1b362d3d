/* Unit tests for config.c: the main file, then FILE.d/ *.conf in name order,
 * comments and spacing, the last setting winning, errors that name the file
 * and line, and which missing files are errors. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "check.h"
#include "config.h"
#include "test_files.h"

static void write_text(const char *dir, const char *name, const char *text)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
}

int main(void)
{
    char dir[] = "/tmp/imgfs-test-config-XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    char main_file[PATH_MAX], d[PATH_MAX + 8], err[PATH_MAX + 256];
    snprintf(main_file, sizeof(main_file), "%s/imgfs.conf", dir);
    snprintf(d, sizeof(d), "%s.d", main_file);
    mkdir(d, 0755);
    write_text(dir, "imgfs.conf",
               "# defaults\n"
               "\n"
               "  cache = /var/cache/imgfs  \n"
               "timeout=30\n"
               "allow_other\n"
               "mirror=http://a.example/repo\n");
    write_text(d, "20-site.conf", "timeout=60\n");
    write_text(d, "10-host.conf", "timeout=45\ncache_size=50G\n");
    write_text(d, "README", "not=read\n");
    write_text(d, "30-off.conf.disabled", "timeout=1\n");

    struct config cfg;
    CHECK(config_read(main_file, true, &cfg, err, sizeof(err)) == 0);
    CHECK(cfg.count == 7);
    CHECK(cfg.count == 7 && strcmp(cfg.options[0].text, "cache=/var/cache/imgfs") == 0);
    CHECK(cfg.count == 7 && strcmp(cfg.options[2].text, "allow_other") == 0);
    CHECK(cfg.count == 7 && strcmp(cfg.options[4].text, "timeout=45") == 0); /* 10- before 20- */
    CHECK(cfg.count == 7 && cfg.options[0].line == 3 && strcmp(cfg.options[0].file, main_file) == 0);
    const char *timeout = config_lookup(&cfg, "timeout");
    CHECK(timeout && strcmp(timeout, "60") == 0);
    const char *flag = config_lookup(&cfg, "allow_other");
    CHECK(flag && strcmp(flag, "") == 0);
    CHECK(config_lookup(&cfg, "cache_size") && strcmp(config_lookup(&cfg, "cache_size"), "50G") == 0);
    CHECK(config_lookup(&cfg, "cach") == NULL);
    CHECK(config_lookup(&cfg, "not") == NULL);
    const struct config_option *o = config_find(&cfg, "timeout");
    CHECK(o && o->line == 1 && strstr(o->file, "20-site.conf"));
    config_free(&cfg);

    /* Errors name the file and the line. */
    write_text(d, "40-bad.conf", "\n# x\nmirror=http://a,b\n");
    CHECK(config_read(main_file, true, &cfg, err, sizeof(err)) == -EINVAL);
    CHECK(strstr(err, "40-bad.conf:3:") != NULL && strstr(err, "','"));
    write_text(d, "40-bad.conf", "cache dir=/x\n");
    CHECK(config_read(main_file, true, &cfg, err, sizeof(err)) == -EINVAL);
    CHECK(strstr(err, "40-bad.conf:1:") != NULL);
    write_text(d, "40-bad.conf", "config=/etc/other\n");
    CHECK(config_read(main_file, true, &cfg, err, sizeof(err)) == -EINVAL);
    write_text(d, "40-bad.conf", "=5\n");
    CHECK(config_read(main_file, true, &cfg, err, sizeof(err)) == -EINVAL);

    /* A missing file: fine when it is the default, an error when named. */
    char missing[PATH_MAX + 16];
    snprintf(missing, sizeof(missing), "%s/nothing.conf", dir);
    CHECK(config_read(missing, false, &cfg, err, sizeof(err)) == 0 && cfg.count == 0);
    config_free(&cfg);
    CHECK(config_read(missing, true, &cfg, err, sizeof(err)) == -ENOENT);
    CHECK(strstr(err, "nothing.conf") != NULL);
    CHECK(config_read("none", true, &cfg, err, sizeof(err)) == 0 && cfg.count == 0);

    /* $IMGFS_CONFIG names the file; empty means the default. */
    bool named;
    setenv(IMGFS_CONFIG_ENV, main_file, 1);
    CHECK(strcmp(config_default_path(&named), main_file) == 0 && named);
    setenv(IMGFS_CONFIG_ENV, "", 1);
    CHECK(strcmp(config_default_path(&named), IMGFS_DEFAULT_CONFIG) == 0 && !named);
    remove_tree(dir);
    return check_summary();
}
