/* Unit tests for util.c: size and number parsing, name validation, size
 * formatting, atomic file writes, read_file limits and mkdir_p. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "test_files.h"
#include "util.h"

/* parse_size() must accept text and produce exactly want. */
static int size_is(const char *text, uint64_t want)
{
    uint64_t v = 0xdeadbeef;
    int rc = parse_size(text, &v);
    if (rc != 0 || v != want) {
        fprintf(stderr, "parse_size(\"%s\") = %d, %llu; want %llu\n", text, rc, (unsigned long long)v,
                (unsigned long long)want);
        return 0;
    }
    return 1;
}

/* parse_size() must reject text with -EINVAL and leave the output alone. */
static int size_rejected(const char *text)
{
    uint64_t v = 0xdeadbeef;
    int rc = parse_size(text, &v);
    if (rc != -EINVAL || v != 0xdeadbeef) {
        fprintf(stderr, "parse_size(\"%s\") = %d, %llu; want -EINVAL\n", text, rc, (unsigned long long)v);
        return 0;
    }
    return 1;
}

static void test_parse_size(void)
{
    CHECK(size_is("4096", 4096));
    CHECK(size_is("0", 0));
    CHECK(size_is("64K", 64 * 1024));
    CHECK(size_is("64k", 64 * 1024));
    CHECK(size_is("20G", 20ull << 30));
    CHECK(size_is("20g", 20ull << 30));
    CHECK(size_is("1.5M", 1536 * 1024));
    CHECK(size_is("0.5K", 512));
    CHECK(size_is("1KiB", 1024));
    CHECK(size_is("1kib", 1024));
    CHECK(size_is("2MB", 2ull << 20));
    CHECK(size_is("2mb", 2ull << 20));
    CHECK(size_is("3T", 3ull << 40));
    CHECK(size_is("1P", 1ull << 50));
    CHECK(size_is("1PiB", 1ull << 50));
    CHECK(size_is("512B", 512));
    CHECK(size_is("16383P", 16383ull << 50)); /* the largest whole P that fits */

    CHECK(size_rejected(""));
    CHECK(size_rejected("-1"));
    CHECK(size_rejected("-1K"));
    CHECK(size_rejected("+1"));
    CHECK(size_rejected(" 1"));
    CHECK(size_rejected("1 "));
    CHECK(size_rejected("abc"));
    CHECK(size_rejected("K"));
    CHECK(size_rejected("1X"));
    CHECK(size_rejected("1KK"));
    CHECK(size_rejected("1KiBx"));
    CHECK(size_rejected("1iB"));
    CHECK(size_rejected("1BB"));
    CHECK(size_rejected("1.5"));   /* 1.5 bytes is not a whole number */
    CHECK(size_rejected("0.3K"));  /* 307.2 bytes */
    CHECK(size_rejected("."));
    CHECK(size_rejected("nan"));
    CHECK(size_rejected("inf"));
    CHECK(size_rejected("99999999999P"));
    CHECK(size_rejected("16384P")); /* exactly 2^64 */
    CHECK(size_rejected("99999999999999999999999"));
    CHECK(size_rejected("1e999"));
    CHECK(parse_size(NULL, &(uint64_t){0}) == -EINVAL);

    /* No C float syntax, and large integers are exact. */
    CHECK(size_rejected("0x10"));
    CHECK(size_rejected("1e3"));
    CHECK(size_rejected("0x1p4K"));
    CHECK(size_is("9007199254740993", 9007199254740993ull));
}

static void test_parse_u64(void)
{
    uint64_t v = 7;
    CHECK(parse_u64("0", &v) == 0 && v == 0);
    CHECK(parse_u64("42", &v) == 0 && v == 42);
    CHECK(parse_u64("18446744073709551615", &v) == 0 && v == UINT64_MAX);
    v = 7;
    CHECK(parse_u64("18446744073709551616", &v) == -EINVAL && v == 7);
    CHECK(parse_u64("", &v) == -EINVAL);
    CHECK(parse_u64("-1", &v) == -EINVAL);
    CHECK(parse_u64("+1", &v) == -EINVAL);
    CHECK(parse_u64(" 1", &v) == -EINVAL);
    CHECK(parse_u64("1 ", &v) == -EINVAL);
    CHECK(parse_u64("1a", &v) == -EINVAL);
    CHECK(parse_u64("1K", &v) == -EINVAL);
    CHECK(parse_u64("1.0", &v) == -EINVAL);
    CHECK(parse_u64("abc", &v) == -EINVAL);
    CHECK(parse_u64(NULL, &v) == -EINVAL);
    CHECK(v == 7);
}

static void test_name_is_valid(void)
{
    CHECK(name_is_valid("debian12"));
    CHECK(name_is_valid("a.b_c-d"));
    CHECK(name_is_valid("a"));
    CHECK(name_is_valid("A9"));
    CHECK(name_is_valid("a..b"));
    CHECK(name_is_valid("vm-01.raw"));

    CHECK(!name_is_valid(""));
    CHECK(!name_is_valid("."));
    CHECK(!name_is_valid(".."));
    CHECK(!name_is_valid("../x"));
    CHECK(!name_is_valid("x/.."));
    CHECK(!name_is_valid("a/b"));
    CHECK(!name_is_valid("/abs"));
    CHECK(!name_is_valid("a b"));
    CHECK(!name_is_valid(" a"));
    CHECK(!name_is_valid("a "));
    CHECK(!name_is_valid("a\tb"));
    CHECK(!name_is_valid("a\nb"));
    CHECK(!name_is_valid("-rf"));
    CHECK(!name_is_valid(".hidden"));
    CHECK(!name_is_valid("a:b"));
    CHECK(!name_is_valid("a\\b"));
    CHECK(!name_is_valid("a*"));
    CHECK(!name_is_valid("caf\xc3\xa9")); /* UTF-8 */
    CHECK(!name_is_valid("\xff"));

    char name[80];
    memset(name, 'a', sizeof(name));
    name[64] = '\0';
    CHECK(name_is_valid(name)); /* 64 chars: the maximum */
    name[64] = 'a';
    name[65] = '\0';
    CHECK(!name_is_valid(name)); /* 65 chars */
    name[70] = '\0';
    CHECK(!name_is_valid(name));
}

static int formats_as(uint64_t bytes, const char *want)
{
    char buf[64];
    memset(buf, 'x', sizeof(buf));
    const char *got = format_size(bytes, buf, sizeof(buf));
    if (got != buf || strcmp(buf, want) != 0) {
        fprintf(stderr, "format_size(%llu) = \"%s\", want \"%s\"\n", (unsigned long long)bytes, buf, want);
        return 0;
    }
    return 1;
}

static void test_format_size(void)
{
    CHECK(formats_as(0, "0 B"));
    CHECK(formats_as(1, "1 B"));
    CHECK(formats_as(1023, "1023 B"));
    CHECK(formats_as(1024, "1.0 KiB"));
    CHECK(formats_as(1536, "1.5 KiB"));
    CHECK(formats_as(64 * 1024, "64.0 KiB"));
    CHECK(formats_as(1536 * 1024, "1.5 MiB"));
    CHECK(formats_as(20ull << 30, "20.0 GiB"));
    CHECK(formats_as(3ull << 40, "3.0 TiB"));
    CHECK(formats_as(1ull << 50, "1.0 PiB"));
    CHECK(formats_as(UINT64_MAX, "16384.0 PiB"));
    /* The unit is chosen after rounding. */
    CHECK(formats_as((1ull << 30) - 1, "1.0 GiB"));

    /* A short buffer is truncated, NUL-terminated and not overrun. */
    char small[6];
    memset(small, 'x', sizeof(small));
    CHECK(format_size(20ull << 30, small, 5) == small);
    CHECK(strlen(small) == 4 && small[5] == 'x');
}

static void test_files(const char *tmp)
{
    char path[PATH_MAX], sub[PATH_MAX];
    CHECK(path_join(path, sizeof(path), "%s/file.txt", tmp) == 0);

    /* Roundtrip. */
    const char text[] = "hello, imgfs\n";
    CHECK(write_file_atomic(path, text, strlen(text)) == 0);
    char *data = NULL;
    size_t len = 0;
    CHECK(read_file(path, 1024, &data, &len) == 0);
    CHECK(data && len == strlen(text) && memcmp(data, text, len) == 0 && data[len] == '\0');
    free(data);

    /* Replacement by a shorter file; no temp file is left behind. */
    CHECK(write_file_atomic(path, "ab", 2) == 0);
    data = NULL;
    CHECK(read_file(path, 1024, &data, &len) == 0);
    CHECK(data && len == 2 && memcmp(data, "ab", 3) == 0);
    free(data);
    CHECK(count_entries(tmp) == 1);
    struct stat st;
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0644);

    /* Binary data with NULs. */
    unsigned char bin[4096];
    for (size_t i = 0; i < sizeof(bin); i++)
        bin[i] = (unsigned char)(i * 7);
    CHECK(write_file_atomic(path, bin, sizeof(bin)) == 0);
    data = NULL;
    CHECK(read_file(path, sizeof(bin), &data, &len) == 0); /* max_len == size is fine */
    CHECK(data && len == sizeof(bin) && memcmp(data, bin, len) == 0 && data[len] == '\0');
    free(data);

    /* max_len smaller than the file: -EFBIG, output untouched. */
    data = (char *)"untouched";
    CHECK(read_file(path, sizeof(bin) - 1, &data, &len) == -EFBIG);
    CHECK(strcmp(data, "untouched") == 0);
    CHECK(read_file(path, 0, &data, &len) == -EFBIG);

    /* Empty file. */
    CHECK(write_file_atomic(path, "", 0) == 0);
    data = NULL;
    len = 99;
    CHECK(read_file(path, 0, &data, &len) == 0);
    CHECK(data && len == 0 && data[0] == '\0');
    free(data);

    /* Errors. */
    CHECK(path_join(sub, sizeof(sub), "%s/missing", tmp) == 0);
    CHECK(read_file(sub, 1024, &data, &len) == -ENOENT);
    CHECK(read_file(tmp, 1024, &data, &len) == -EINVAL); /* a directory */
    CHECK(path_join(sub, sizeof(sub), "%s/no/such/dir/file", tmp) == 0);
    CHECK(write_file_atomic(sub, "x", 1) == -ENOENT);
    CHECK(count_entries(tmp) == 1);

    /* mkdir_p */
    CHECK(path_join(sub, sizeof(sub), "%s/a/b/c", tmp) == 0);
    CHECK(mkdir_p(sub) == 0);
    CHECK(stat(sub, &st) == 0 && S_ISDIR(st.st_mode));
    CHECK(mkdir_p(sub) == 0); /* existing is fine */
    CHECK(path_join(sub, sizeof(sub), "%s/a/b", tmp) == 0);
    CHECK(mkdir_p(sub) == 0);
    CHECK(path_join(sub, sizeof(sub), "%s/x/y/", tmp) == 0); /* trailing slash */
    CHECK(mkdir_p(sub) == 0);
    CHECK(path_join(sub, sizeof(sub), "%s/x/y", tmp) == 0);
    CHECK(stat(sub, &st) == 0 && S_ISDIR(st.st_mode));
    CHECK(mkdir_p(path) == -ENOTDIR); /* a regular file */
    CHECK(path_join(sub, sizeof(sub), "%s/file.txt/sub", tmp) == 0);
    CHECK(mkdir_p(sub) == -ENOTDIR); /* under a regular file */

    /* path_join reports truncation. */
    char tiny[8];
    CHECK(path_join(tiny, sizeof(tiny), "%s", "1234567") == 0);
    CHECK(path_join(tiny, sizeof(tiny), "%s", "12345678") == -ENAMETOOLONG);

    /* read_full_at: short file gives -ENODATA. */
    int fd = open(path, O_RDWR);
    CHECK(fd >= 0);
    if (fd >= 0) {
        CHECK(write_full_at(fd, "abcdef", 6, 0) == 0);
        char buf[8] = {0};
        CHECK(read_full_at(fd, buf, 6, 0) == 0 && memcmp(buf, "abcdef", 6) == 0);
        CHECK(read_full_at(fd, buf, 4, 4) == -ENODATA);
        close(fd);
    }
}

int main(void)
{
    test_parse_size();
    test_parse_u64();
    test_name_is_valid();
    test_format_size();

    char tmp[] = "/tmp/imgfs-test-util-XXXXXX";
    CHECK(mkdtemp(tmp) != NULL);
    test_files(tmp);
    remove_tree(tmp);
    return check_summary();
}
