/* Unit tests for userfile.c: a new file gets exactly its mode whatever the
 * umask and appears only when committed; an aborted one leaves nothing; a
 * symlink at the path is replaced, not written through; a FIFO is written
 * into, and one without a reader, or whose reader never reads, fails at
 * its deadline with one sentence; a directory is refused. A file to read
 * (vm import) opens with its size and blocking reads; a FIFO (even one
 * without a writer, whose plain open would wait), a directory and a device
 * are refused at once with one sentence. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "userfile.h"

static char dir[64];

static int entries(void)
{
    int n = 0;
    DIR *d = opendir(dir);
    for (struct dirent *e; d && (e = readdir(d)) != NULL;)
        n += e->d_name[0] != '.';
    if (d)
        closedir(d);
    return n;
}

static char *path_of(const char *name)
{
    static char p[128];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    return p;
}

int main(void)
{
    char err[512], path[128], buf[16] = "";
    struct userfile uf;
    struct stat st;
    snprintf(dir, sizeof(dir), "/tmp/imgfs-userfile.XXXXXX");
    if (!mkdtemp(dir))
        return 1;
    umask(077);

    /* A new file: invisible until committed, then exactly mode 0644. */
    snprintf(path, sizeof(path), "%s", path_of("list"));
    CHECK(userfile_open(&uf, path, 0644, 1, err, sizeof(err)) == 0);
    CHECK(userfile_write(&uf, "hello", 5, err, sizeof(err)) == 0);
    CHECK(access(path, F_OK) != 0);
    CHECK(userfile_commit(&uf, err, sizeof(err)) == 0);
    userfile_abort(&uf);
    CHECK(stat(path, &st) == 0 && (st.st_mode & 07777) == 0644 && st.st_size == 5);
    CHECK(entries() == 1);

    /* Aborted: the old file stays, no temp file is left. */
    CHECK(userfile_open(&uf, path, 0600, 1, err, sizeof(err)) == 0);
    CHECK(userfile_write(&uf, "other", 5, err, sizeof(err)) == 0);
    userfile_abort(&uf);
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0 && read(fd, buf, sizeof(buf)) == 5 && memcmp(buf, "hello", 5) == 0);
    close(fd);
    CHECK(entries() == 1);

    /* A symlink at the path is replaced; its target is untouched. */
    char victim[128], link_path[128];
    snprintf(victim, sizeof(victim), "%s", path_of("victim"));
    snprintf(link_path, sizeof(link_path), "%s", path_of("link"));
    fd = open(victim, O_WRONLY | O_CREAT, 0600);
    CHECK(fd >= 0 && write(fd, "keep", 4) == 4);
    close(fd);
    CHECK(symlink(victim, link_path) == 0);
    CHECK(userfile_open(&uf, link_path, 0600, 1, err, sizeof(err)) == 0);
    CHECK(userfile_write(&uf, "new", 3, err, sizeof(err)) == 0);
    CHECK(userfile_commit(&uf, err, sizeof(err)) == 0);
    CHECK(lstat(link_path, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 07777) == 0600);
    CHECK(stat(victim, &st) == 0 && st.st_size == 4);

    /* A directory is refused with a sentence. */
    CHECK(userfile_open(&uf, dir, 0600, 1, err, sizeof(err)) == -EINVAL && strstr(err, "directory"));
    userfile_abort(&uf);

    /* A FIFO with no reader: fails at its deadline, and stays a FIFO. */
    char fifo[128];
    snprintf(fifo, sizeof(fifo), "%s", path_of("fifo"));
    CHECK(mkfifo(fifo, 0600) == 0);
    CHECK(userfile_open(&uf, fifo, 0600, 0.2, err, sizeof(err)) == -ETIMEDOUT && strstr(err, "no reader"));
    userfile_abort(&uf);
    CHECK(lstat(fifo, &st) == 0 && S_ISFIFO(st.st_mode));

    /* A reader that never reads: writing more than the pipe holds fails at
     * the deadline; the same reader then sees what went in. */
    int reader = open(fifo, O_RDONLY | O_NONBLOCK);
    CHECK(reader >= 0);
    CHECK(userfile_open(&uf, fifo, 0600, 0.2, err, sizeof(err)) == 0 && uf.stream && !uf.tmp[0]);
    static char big[1 << 20];
    CHECK(userfile_write(&uf, big, sizeof(big), err, sizeof(err)) == -ETIMEDOUT && strstr(err, "took no data"));
    userfile_abort(&uf);
    CHECK(read(reader, buf, sizeof(buf)) == (ssize_t)sizeof(buf));
    close(reader);

    /* A reader that reads: the stream gets every byte, committed without a rename. */
    reader = open(fifo, O_RDONLY | O_NONBLOCK);
    CHECK(userfile_open(&uf, fifo, 0600, 1, err, sizeof(err)) == 0);
    CHECK(userfile_write(&uf, "abc", 3, err, sizeof(err)) == 0);
    CHECK(userfile_commit(&uf, err, sizeof(err)) == 0);
    CHECK(read(reader, buf, sizeof(buf)) == 3 && memcmp(buf, "abc", 3) == 0);
    close(reader);
    CHECK(lstat(fifo, &st) == 0 && S_ISFIFO(st.st_mode));

    /* Reading: a regular file has its size, and reads block again. */
    uint64_t size = 0;
    fd = userfile_open_source(path, &size, err, sizeof(err));
    CHECK(fd >= 0 && size == 5 && !(fcntl(fd, F_GETFL) & O_NONBLOCK));
    CHECK(read(fd, buf, sizeof(buf)) == 5);
    close(fd);
    CHECK(userfile_open_source(fifo, &size, err, sizeof(err)) == -EINVAL && strstr(err, "is a FIFO, not a regular file"));
    CHECK(userfile_open_source(dir, &size, err, sizeof(err)) == -EINVAL && strstr(err, "is a directory"));
    CHECK(userfile_open_source("/dev/null", &size, err, sizeof(err)) == -EINVAL && strstr(err, "character device"));
    CHECK(userfile_open_source(path_of("nosuch"), &size, err, sizeof(err)) == -ENOENT && strstr(err, "cannot open"));

    unlink(fifo);
    unlink(link_path);
    unlink(victim);
    unlink(path);
    rmdir(dir);
    return check_summary();
}
