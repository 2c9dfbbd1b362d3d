#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

static enum log_level current_level = LOG_LEVEL_INFO;
static bool use_syslog;

void log_set_level(enum log_level level) { current_level = level; }

void log_to_syslog(const char *ident)
{
    openlog(ident, LOG_PID, LOG_DAEMON);
    use_syslog = true;
}

void log_msg(enum log_level level, const char *fmt, ...)
{
    static const int syslog_priority[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};
    static const char *prefix[] = {"error", "warning", "info", "debug"};
    if (level > current_level)
        return;
    va_list ap;
    va_start(ap, fmt);
    if (use_syslog) {
        vsyslog(syslog_priority[level], fmt, ap);
    } else {
        char line[1024];
        vsnprintf(line, sizeof(line), fmt, ap);
        fprintf(stderr, "imgfs: %s: %s\n", prefix[level], line);
    }
    va_end(ap);
}

int parse_u64(const char *text, uint64_t *out)
{
    if (!text || !isdigit((unsigned char)text[0]))
        return -EINVAL;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || *end)
        return -EINVAL;
    *out = v;
    return 0;
}

int parse_size(const char *text, uint64_t *out)
{
    /* DIGITS[.DIGITS][K|M|G|T|P][i][B], parsed with integers only so that
     * no float syntax (hex, exponents) sneaks in and nothing is rounded. */
    const char *p = text;
    uint64_t whole = 0, frac = 0, frac_scale = 1;
    if (!p || !isdigit((unsigned char)*p))
        return -EINVAL;
    for (; isdigit((unsigned char)*p); p++) {
        if (whole > (UINT64_MAX - 9) / 10)
            return -EINVAL;
        whole = whole * 10 + (uint64_t)(*p - '0');
    }
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p))
            return -EINVAL;
        for (; isdigit((unsigned char)*p); p++) {
            if (frac_scale >= 1000000000ull)
                return -EINVAL;
            frac = frac * 10 + (uint64_t)(*p - '0');
            frac_scale *= 10;
        }
    }
    unsigned shift = 0;
    const char *units = "KMGTP";
    const char *u = *p ? strchr(units, toupper((unsigned char)*p)) : NULL;
    if (u) {
        shift = 10 * (unsigned)(u - units + 1);
        p++;
        if (*p == 'i')
            p++;
    }
    if (*p == 'B' || *p == 'b')
        p++;
    if (*p)
        return -EINVAL;
    if (shift && whole > (UINT64_MAX >> shift))
        return -EINVAL;
    uint64_t bytes = whole << shift;
    if (frac) {
        /* The fraction must come to a whole number of bytes. */
        uint64_t scaled = frac << shift;
        if (scaled % frac_scale)
            return -EINVAL;
        if (bytes > UINT64_MAX - scaled / frac_scale)
            return -EINVAL;
        bytes += scaled / frac_scale;
    }
    *out = bytes;
    return 0;
}

const char *format_size(uint64_t bytes, char *buf, size_t len)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double v = (double)bytes;
    unsigned u = 0;
    /* Compare against 1023.95 so that rounding never prints "1024.0 MiB". */
    while (v >= 1023.95 && u + 1 < ARRAY_LEN(units)) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%" PRIu64 " B", bytes);
    else
        snprintf(buf, len, "%.1f %s", v, units[u]);
    return buf;
}

bool name_is_valid(const char *name)
{
    size_t len = strnlen(name, 65);
    if (len == 0 || len > 64 || name[0] == '.' || name[0] == '-')
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (!(isalnum(c) || c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

int read_full_at(int fd, void *buf, size_t len, off_t off)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = pread(fd, p, len, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -ENODATA;
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

int write_full_at_by(ssize_t (*write_at)(int fd, const void *buf, size_t len, off_t off), int fd, const void *buf,
                     size_t len, off_t off)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write_at(fd, p, len, off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -EIO;
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

int write_full_at(int fd, const void *buf, size_t len, off_t off)
{
    return write_full_at_by(pwrite, fd, buf, len, off);
}

int write_full(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int read_file(const char *path, size_t max_len, char **data, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return -EINVAL;
    }
    if ((uint64_t)st.st_size > max_len) {
        close(fd);
        return -EFBIG;
    }
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size + 1);
    if (!buf) {
        close(fd);
        return -ENOMEM;
    }
    int err = size ? read_full_at(fd, buf, size, 0) : 0;
    close(fd);
    if (err) {
        free(buf);
        return err == -ENODATA ? -EIO : err;
    }
    buf[size] = '\0';
    *data = buf;
    *len = size;
    return 0;
}

int check_marker_file(const char *path, const char *expected)
{
    char *data = NULL;
    size_t len = 0;
    int rc = read_file(path, 256, &data, &len);
    if (rc)
        return rc == -EFBIG ? -EBADMSG : rc;
    bool same = len == strlen(expected) && memcmp(data, expected, len) == 0;
    free(data);
    return same ? 0 : -EBADMSG;
}

int fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int err = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return err;
}

int fsync_dir_of(const char *path)
{
    char dir[PATH_MAX];
    if (snprintf(dir, sizeof(dir), "%s", path) >= (int)sizeof(dir))
        return -ENAMETOOLONG;
    char *slash = strrchr(dir, '/');
    if (!slash)
        return fsync_dir(".");
    if (slash == dir)
        slash[1] = '\0';
    else
        *slash = '\0';
    return fsync_dir(dir);
}

int create_temp_file(const char *path, mode_t mode, char *tmp)
{
    for (int attempt = 0; attempt < 16; attempt++) {
        uint64_t r = now_ns() ^ ((uint64_t)gettid() << 32) ^ ((uint64_t)attempt * 0x9e3779b97f4a7c15ull);
        int err = path_join(tmp, PATH_MAX, "%s.tmp.%ld.%016llx", path, (long)gettid(),
                            (unsigned long long)(r * 0xff51afd7ed558ccdull));
        if (err)
            return err;
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
        if (fd >= 0) {
            if (fchmod(fd, mode) < 0) {
                err = -errno;
                close(fd);
                unlink(tmp);
                return err;
            }
            return fd;
        }
        if (errno != EEXIST)
            return -errno;
    }
    return -EEXIST;
}

int write_file_atomic(const char *path, const void *data, size_t len)
{
    return write_file_atomic_mode(path, data, len, 0644);
}

int write_file_atomic_mode(const char *path, const void *data, size_t len, mode_t mode)
{
    char tmp[PATH_MAX];
    int fd = create_temp_file(path, mode, tmp);
    if (fd < 0)
        return fd;
    int err = write_full(fd, data, len);
    if (!err && fsync(fd) < 0)
        err = -errno;
    if (close(fd) < 0 && !err)
        err = -errno;
    if (!err && rename(tmp, path) < 0)
        err = -errno;
    if (err) {
        unlink(tmp);
        return err;
    }
    return fsync_dir_of(path);
}

int mkdir_p(const char *path)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
        return -ENAMETOOLONG;
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(buf, 0755) < 0 && errno != EEXIST)
        return -errno;
    struct stat st;
    if (stat(buf, &st) < 0)
        return -errno;
    return S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
}

uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double now_seconds(void) { return (double)now_ns() / 1e9; }

void cond_init_monotonic(pthread_cond_t *cond)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(cond, &attr);
    pthread_condattr_destroy(&attr);
}

int cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *lock, uint64_t deadline_ns)
{
    struct timespec ts = {(time_t)(deadline_ns / 1000000000ull), (long)(deadline_ns % 1000000000ull)};
    return pthread_cond_timedwait(cond, lock, &ts);
}

__attribute__((format(printf, 3, 0))) static bool vformat_fits(char *out, size_t len, const char *fmt, va_list ap)
{
    int n = vsnprintf(out, len, fmt, ap);
    return n >= 0 && (size_t)n < len;
}

int path_join(char *out, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    bool fits = vformat_fits(out, len, fmt, ap);
    va_end(ap);
    return fits ? 0 : -ENAMETOOLONG;
}

bool format_cut(char *out, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    bool fits = vformat_fits(out, len, fmt, ap);
    va_end(ap);
    return !fits;
}
