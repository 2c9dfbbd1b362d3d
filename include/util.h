/* util: small helpers shared by every module.
 *
 * Contract:
 *  - Functions that can fail return 0 on success and a negative errno value on
 *    failure; they never exit the process.
 *  - Logging goes to stderr until log_to_syslog() is called (daemon mode).
 *  - Nothing here keeps global state except the logging destination, which is
 *    set once at start-up before threads exist.
 */
#ifndef IMGFS_UTIL_H
#define IMGFS_UTIL_H

#include <stdarg.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

enum log_level { LOG_LEVEL_ERROR, LOG_LEVEL_WARN, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG };

void log_set_level(enum log_level level);
void log_to_syslog(const char *ident);
void log_msg(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_error(...) log_msg(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, __VA_ARGS__)

/* Parses "4096", "64K", "20G", "1.5M" (binary units, case-insensitive, optional
 * trailing "B" or "iB"). Rejects negatives, garbage and overflow with -EINVAL. */
int parse_size(const char *text, uint64_t *out);
/* Formats bytes as "1.5 GiB" into buf. Returns buf. */
const char *format_size(uint64_t bytes, char *buf, size_t len);

/* Parses a non-negative decimal integer that fits in uint64_t; -EINVAL otherwise. */
int parse_u64(const char *text, uint64_t *out);

/* A name for a base or VM: 1..64 chars of [A-Za-z0-9._-], not starting with
 * '.' or '-'. Rejects "..", "/", NUL and anything else hostile. */
bool name_is_valid(const char *name);

/* Full read/write loops that retry on EINTR and short transfers. */
int read_full_at(int fd, void *buf, size_t len, off_t off);
int write_full_at(int fd, const void *buf, size_t len, off_t off);
/* write_full_at through write_at (a test's fault-injecting pwrite); a
 * write of 0 bytes is -EIO. */
int write_full_at_by(ssize_t (*write_at)(int fd, const void *buf, size_t len, off_t off), int fd, const void *buf,
                     size_t len, off_t off);
int write_full(int fd, const void *buf, size_t len);

/* Reads a whole (small) file into a malloc'd, NUL-terminated buffer.
 * Refuses files larger than max_len with -EFBIG. */
int read_file(const char *path, size_t max_len, char **data, size_t *len);

/* Writes data to path atomically: a temp file in the same directory, fsync,
 * rename, then fsync of the directory. Readers see the old or the new file.
 * The temp file is created with O_EXCL|O_NOFOLLOW under an unpredictable
 * name, so nothing planted there (a symlink) is ever written through; the
 * file gets mode (whatever the umask); write_file_atomic uses 0644. */
int write_file_atomic(const char *path, const void *data, size_t len);
int write_file_atomic_mode(const char *path, const void *data, size_t len, mode_t mode);
/* Creates a new file for writing with O_CREAT|O_EXCL|O_NOFOLLOW and mode
 * (whatever the umask) under an unpredictable temp name next to path, which
 * is written to tmp (PATH_MAX bytes). Returns the fd or a negative errno. */
int create_temp_file(const char *path, mode_t mode, char *tmp);

/* Compares a small marker file (like "imgfs-cache 1\n") with expected:
 * 0 when equal, -ENOENT when missing, -EBADMSG when different, or another
 * negative errno when it cannot be read. */
int check_marker_file(const char *path, const char *expected);

/* fsync of the directory that contains path (or of path if it is a directory). */
int fsync_dir_of(const char *path);
int fsync_dir(const char *dir);

/* mkdir -p with mode 0755; existing directories are fine. */
int mkdir_p(const char *path);

/* Monotonic time in nanoseconds / seconds. */
uint64_t now_ns(void);
double now_seconds(void);

/* A condition variable timed against the monotonic clock, and a wait on it
 * until deadline_ns (from now_ns()); returns ETIMEDOUT once it has passed. */
void cond_init_monotonic(pthread_cond_t *cond);
int cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *lock, uint64_t deadline_ns);

/* snprintf into a fixed buffer; -ENAMETOOLONG if it did not fit. */
int path_join(char *out, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* snprintf into a fixed buffer, cutting what does not fit: for messages and
 * displays, where a cut text is acceptable (what must stay whole, such as a
 * path, goes through path_join). Returns whether the text was cut. */
bool format_cut(char *out, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
