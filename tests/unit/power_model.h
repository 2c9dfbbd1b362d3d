/* power_model: a simulated power cut for the unit tests of modules whose
 * files must survive one (test_layer_power.c for layer.c,
 * test_cache_power.c for cache.c). The module's table of system calls
 * (layer_syscalls, cache_syscalls) is pointed at the power_* wrappers
 * below, each given the real call; they record every change of the files
 * of one directory since its last sync, and at the cut write what the disk
 * may hold then into another directory.
 *
 * THE MODEL (in the style of SQLite's crash-test VFS and of ALICE's and
 * CrashMonkey's models of a POSIX file system):
 *   - Per file (by inode, so the O_DIRECT descriptor of a log is the same
 *     file), the bytes and size as of its last fdatasync() (durable), and
 *     every change since, in order: a pwrite or an append (buffered or
 *     O_DIRECT alike: O_DIRECT bypasses the page cache, not the device's
 *     volatile cache, and an O_DIRECT write into allocated but unwritten
 *     extents needs the extent conversion that only a sync commits), a
 *     punched hole, a size change (ftruncate, fallocate beyond the end, an
 *     extending write).
 *   - At a cut, each 512-byte sector of each file shows its durable bytes
 *     or its bytes after one of the changes since (one per sector, any
 *     combination across sectors and files: no ordering between unsynced
 *     writes, and a 4 KiB block may tear into old and new sectors); the
 *     size is the durable one or the one after one of the changes, bytes
 *     past an older end read as zeros (ext4 data=ordered never shows stale
 *     blocks, only zeros). Why 512 B and not 4 KiB: 512 B is the smallest
 *     unit a device promises to write atomically (the logical sector of
 *     the virtual disks and 512e drives this runs on); ext4 writes back
 *     4 KiB pages, but a power loss may cut the device inside one, and the
 *     finer model is the stronger test (every 4 KiB tear is one of its
 *     cases). The probability that a change survives is drawn per file per
 *     cut (0, 1/4, 1/2, 3/4, 1), so all-lost and all-kept cuts come often.
 *   - The directory: its entries as of its last fsync, and the creations,
 *     renames and unlinks since, in order; a cut keeps a prefix of them
 *     (ext4 journals directory operations in order; a model that kept any
 *     subset would be stronger than ext4 gives). A file created and not yet
 *     named durably is lost with its name; an unlinked one whose unlink is
 *     lost comes back with its own durable bytes.
 *   - fdatasync and fsync are the same (data and size), and neither makes
 *     the file's directory entry durable (POSIX; ext4 often does, by its
 *     journal commit, which the model does not count on).
 *   - The kernel's writeback, which makes a file's changes durable without
 *     anyone asking (after 30 s on Linux, or a sync(1)), is the test's to
 *     call: power_writeback() of one file, power_writeback_dir() of the
 *     directory.
 * Not simulated: metadata other than size (times, modes), other
 * directories, free space (ENOSPC), ext4 data=journal or data=writeback
 * (writeback may show stale blocks past a lost size: imgfs's directories
 * are taken to be ext4 or XFS with their defaults), a device that lies
 * about flushes, and the bit rot of synced sectors.
 * At each fdatasync the model's bytes of the file are compared with the
 * real file's: a change made behind the model's back (a system call not in
 * the module's table, a write through a mapping) counts in
 * power_errors().
 *
 * The wrappers are thread-safe (one lock); the cut comes before the
 * system call it was set at (counting only calls that change a modelled
 * file or the directory, and their syncs), and after it nothing more is
 * recorded: the real files go on changing, the cut's state does not. */
#ifndef IMGFS_TEST_POWER_MODEL_H
#define IMGFS_TEST_POWER_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Runs iterations of run(seed + k), k = 0, 1, ..., stopping after 3 that
 * fail (each failure prints how to replay it). The seed is env var
 * seed_var (decimal), or a random one; the count is iter_var, or 200.
 * Prints both first, as name's. Returns the number of failed iterations. */
int power_run(const char *name, const char *seed_var, const char *iter_var, bool (*run)(uint64_t seed));

/* realloc, or abort. */
void *power_xrealloc(void *p, size_t n);

/* The tests' random numbers: every choice, the model's too, comes from the seed. */
void power_seed(uint64_t seed);
uint64_t power_rnd(void);
uint64_t power_below(uint64_t n); /* 0 for n == 0 */

/* Starts modelling dir: what it holds now is durable (the state a cut left,
 * or nothing). The cut, if any, comes before system call cut_at from now
 * (0: none inside; power_cut_at_end() then cuts). A cut writes the
 * directory's state into cut_dir, which must be empty. */
void power_arm(const char *dir, const char *cut_dir, uint64_t cut_at);
/* The system calls counted since power_arm(), and a new cut point. */
uint64_t power_calls(void);
void power_set_cut_at(uint64_t cut_at);
bool power_cut_done(void);
/* A cut now, if none came yet; then the model stops recording. */
void power_cut_at_end(void);
/* Forgets everything (after an iteration). */
void power_clear(void);

/* The kernel's writeback: the file named name in the directory (when the
 * model knows it) has its changes durable; the directory its entries. */
void power_writeback(const char *name);
void power_writeback_dir(void);

/* Cuts at a system call, cuts after the workload, and times the model
 * was out of step with the real files (a test fails on any). */
uint64_t power_cuts_inside(void);
uint64_t power_cuts_after(void);
int power_errors(void);

/* Removes the files of a directory that holds no directory. */
void power_empty_dir(const char *path);
/* Power comes back: the cut's state (cut_dir) becomes dir, and cut_dir is
 * made again, empty. */
void power_on(const char *dir, const char *cut_dir);

/* The wrappers: each calls fn (the real call) and records what it changed
 * in a modelled file or the directory. power_write is an append to an
 * O_APPEND descriptor. power_fdatasync and power_fsync_dir do no real sync
 * for a modelled file or the directory (what a cut leaves comes from the
 * model, never from the disk, and tests stay fast). */
ssize_t power_pwrite(ssize_t (*fn)(int, const void *, size_t, off_t), int fd, const void *buf, size_t len, off_t off);
ssize_t power_write(ssize_t (*fn)(int, const void *, size_t), int fd, const void *buf, size_t len);
int power_fdatasync(int (*fn)(int), int fd);
int power_fallocate(int (*fn)(int, int, off_t, off_t), int fd, int mode, off_t off, off_t len);
int power_ftruncate(int (*fn)(int, off_t), int fd, off_t len);
int power_open(int (*fn)(const char *, int, mode_t), const char *path, int flags, mode_t mode);
int power_rename(int (*fn)(const char *, const char *), const char *from, const char *to);
int power_unlink(int (*fn)(const char *), const char *path);
int power_fsync_dir(int (*fn)(const char *), const char *dir);

#endif
