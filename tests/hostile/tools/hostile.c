/*
 * What a hostile container runs to test the host boundary (built statically
 * by the tests, so it runs in the guest's busybox image and on the host).
 *
 *   hostile euid         prints the effective uid ("euid=N"): run on the host
 *                        by an unprivileged user, a setuid-root copy would
 *                        print euid=0
 *   hostile fcap PATH    gives PATH the file capability CAP_SETUID
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "euid") == 0) {
        printf("euid=%d\n", (int)geteuid());
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "fcap") == 0) {
        /* struct vfs_cap_data, revision 2, effective: CAP_SETUID (7) permitted. */
        unsigned int data[5] = {0x02000001u, 1u << 7, 0, 0, 0};
        if (setxattr(argv[2], "security.capability", data, sizeof data, 0) != 0) {
            printf("fcap=%s\n", strerror(errno));
            return 1;
        }
        printf("fcap=ok\n");
        return 0;
    }
    fputs("usage: hostile euid | hostile fcap PATH\n", stderr);
    return 2;
}
