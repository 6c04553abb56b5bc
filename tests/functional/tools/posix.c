/*
 * POSIX file operations a container expects of its filesystem, each checked
 * end to end (built statically by tests/functional/test_posix.py, so the same
 * binary runs under runc and in pykata's guest). Each prints "ok" or
 * "fail: why" and exits 0 or 1.
 *
 *   posix unlinked DIR        a file unlinked while open: write, read, resize,
 *                             and reopen it through /proc/self/fd/N
 *   posix mmap DIR            MAP_SHARED writes seen by another process (read()
 *                             and its own mapping), and its writes seen back
 *   posix rename DIR          rename over a file that is open: the open file
 *                             keeps its content, the name gets the new one
 *   posix hardlink DIR        two names, one inode; the second outlives the first
 *   posix xattr DIR           set, get and list a user.* extended attribute
 *   posix fsync DIR           fsync and fdatasync of 1 MiB written succeed
 *   posix flock-hold FILE S   take flock(LOCK_EX), write FILE.held, hold S seconds
 *   posix flock-try FILE      wait for FILE.held, then LOCK_EX|LOCK_NB must fail
 *   posix fcntl-hold FILE S   the same with an fcntl (POSIX) write lock
 *   posix fcntl-try FILE      F_SETLK must fail, F_GETLK must name a holder
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

static char path[4096];

static int fail(const char *what)
{
    printf("fail: %s: %s\n", what, strerror(errno));
    return 1;
}

static int failx(const char *what)
{
    printf("fail: %s\n", what);
    return 1;
}

static const char *in(const char *dir, const char *name)
{
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return path;
}

static int read_is(int fd, off_t at, const char *want)
{
    char buf[64] = {0};
    size_t n = strlen(want);
    return pread(fd, buf, n, at) == (ssize_t)n && memcmp(buf, want, n) == 0;
}

static int unlinked(const char *dir)
{
    char proc[64];
    int fd = open(in(dir, "unlinked"), O_RDWR | O_CREAT | O_TRUNC, 0600), again;
    if (fd < 0)
        return fail("create");
    if (unlink(path) != 0)
        return fail("unlink");
    if (write(fd, "kept", 4) != 4)
        return fail("write after unlink");
    if (!read_is(fd, 0, "kept"))
        return fail("read after unlink");
    if (ftruncate(fd, 1 << 20) != 0)
        return fail("ftruncate after unlink");
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    again = open(proc, O_RDWR);
    if (again < 0)
        return fail("reopen through /proc/self/fd");
    if (!read_is(again, 0, "kept"))
        return fail("read of the reopened file");
    return printf("ok\n"), 0;
}

static int mapped(const char *dir)
{
    int fd = open(in(dir, "mapped"), O_RDWR | O_CREAT | O_TRUNC, 0600), status;
    char *map;
    pid_t child;
    if (fd < 0 || ftruncate(fd, 4096) != 0)
        return fail("create");
    map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return fail("mmap");
    memcpy(map, "hello", 5);
    child = fork();
    if (child == 0) {
        int other = open(path, O_RDWR);
        char *theirs;
        if (other < 0 || !read_is(other, 0, "hello"))
            _exit(2);
        theirs = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, other, 0);
        if (theirs == MAP_FAILED || memcmp(theirs, "hello", 5) != 0)
            _exit(3);
        memcpy(theirs + 100, "world", 5);
        _exit(msync(theirs, 4096, MS_SYNC) == 0 ? 0 : 4);
    }
    if (child < 0 || waitpid(child, &status, 0) != child)
        return fail("fork");
    if (!WIFEXITED(status) || WEXITSTATUS(status) == 2)
        return failx("another process's read() did not see the mapping's write");
    if (WEXITSTATUS(status) == 3)
        return failx("another process's mapping did not see the write");
    if (WEXITSTATUS(status) != 0)
        return failx("another process's msync failed");
    if (memcmp(map + 100, "world", 5) != 0)
        return failx("the other process's write did not reach this mapping");
    return printf("ok\n"), 0;
}

static int write_file(const char *name, const char *text)
{
    int fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        return -1;
    return close(fd);
}

static int renamed(const char *dir)
{
    char target[4096];
    int fd, now;
    snprintf(target, sizeof target, "%s", in(dir, "target"));
    if (write_file(target, "old") != 0 || write_file(in(dir, "source"), "new") != 0)
        return fail("create");
    fd = open(target, O_RDONLY);
    if (fd < 0)
        return fail("open");
    if (rename(path, target) != 0)
        return fail("rename over an open file");
    if (!read_is(fd, 0, "old"))
        return failx("the open file lost its content");
    now = open(target, O_RDONLY);
    if (now < 0 || !read_is(now, 0, "new"))
        return failx("the name does not give the new file");
    return printf("ok\n"), 0;
}

static int hardlink(const char *dir)
{
    char first[4096];
    struct stat a, b;
    int fd;
    snprintf(first, sizeof first, "%s", in(dir, "first"));
    unlink(in(dir, "second"));
    if (write_file(first, "one") != 0)
        return fail("create");
    if (link(first, path) != 0)
        return fail("link");
    if (stat(first, &a) != 0 || stat(path, &b) != 0)
        return fail("stat");
    if (a.st_ino != b.st_ino || a.st_nlink != 2)
        return failx("the two names are not one inode with two links");
    if (write_file(path, "two") != 0)
        return fail("write through the second name");
    fd = open(first, O_RDONLY);
    if (fd < 0 || !read_is(fd, 0, "two"))
        return failx("the first name does not see the write");
    if (unlink(first) != 0 || stat(path, &b) != 0 || b.st_nlink != 1)
        return failx("the second name does not outlive the first");
    return printf("ok\n"), 0;
}

static int xattrs(const char *dir)
{
    char value[16] = {0}, names[256] = {0};
    ssize_t n;
    if (write_file(in(dir, "attributed"), "x") != 0)
        return fail("create");
    if (setxattr(path, "user.pykata", "v1", 2, 0) != 0)
        return fail("setxattr");
    if (getxattr(path, "user.pykata", value, sizeof value) != 2 || strcmp(value, "v1") != 0)
        return fail("getxattr");
    n = listxattr(path, names, sizeof names);
    if (n <= 0 || !memmem(names, n, "user.pykata", 12))
        return fail("listxattr");
    return printf("ok\n"), 0;
}

static int synced(const char *dir)
{
    static char block[1 << 20];
    int fd = open(in(dir, "synced"), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    memset(block, 'x', sizeof block);
    if (fd < 0 || write(fd, block, sizeof block) != (ssize_t)sizeof block)
        return fail("write");
    if (fsync(fd) != 0)
        return fail("fsync");
    if (fdatasync(fd) != 0)
        return fail("fdatasync");
    return printf("ok\n"), 0;
}

static int lock(const char *file, int posix, int hold)
{
    int fd = open(file, O_RDWR | O_CREAT, 0666);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    char marker[4096];
    if (fd < 0)
        return fail("open");
    if (hold) {
        if ((posix ? fcntl(fd, F_SETLK, &fl) : flock(fd, LOCK_EX | LOCK_NB)) != 0)
            return fail("take the lock");
        snprintf(marker, sizeof marker, "%s.held", file);
        if (write_file(marker, "held") != 0)
            return fail("write the marker");
        sleep((unsigned)hold);
        return printf("ok\n"), 0;
    }
    snprintf(marker, sizeof marker, "%s.held", file);
    for (int i = 0; access(marker, F_OK) != 0; i++) {
        if (i > 600)
            return failx("the holder never took its lock");
        usleep(100000);
    }
    if (posix) {
        if (fcntl(fd, F_SETLK, &fl) == 0)
            return failx("F_SETLK succeeded while another container holds the lock");
        fl.l_type = F_WRLCK;
        if (fcntl(fd, F_GETLK, &fl) != 0 || fl.l_type == F_UNLCK)
            return failx("F_GETLK does not show the holder");
    } else if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
        return failx("flock succeeded while another container holds the lock");
    }
    return printf("ok\n"), 0;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return failx("usage: posix OPERATION DIR|FILE [SECONDS]");
    const char *op = argv[1], *where = argv[2];
    int hold = argc > 3 ? atoi(argv[3]) : 0;
    if (!strcmp(op, "unlinked")) return unlinked(where);
    if (!strcmp(op, "mmap")) return mapped(where);
    if (!strcmp(op, "rename")) return renamed(where);
    if (!strcmp(op, "hardlink")) return hardlink(where);
    if (!strcmp(op, "xattr")) return xattrs(where);
    if (!strcmp(op, "fsync")) return synced(where);
    if (!strcmp(op, "flock-hold")) return lock(where, 0, hold);
    if (!strcmp(op, "flock-try")) return lock(where, 0, 0);
    if (!strcmp(op, "fcntl-hold")) return lock(where, 1, hold);
    if (!strcmp(op, "fcntl-try")) return lock(where, 1, 0);
    return failx("unknown operation");
}
