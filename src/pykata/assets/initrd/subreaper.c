/*
 * pykata's guest helper: make the agent the child subreaper, then run it.
 *
 * The agent is not PID 1 (/init is, and ends the VM when the agent is gone,
 * however it went), yet every orphan of the guest must become the agent's
 * child: containers that crun started, whose exit status the host waits for.
 * Python has no prctl() without ctypes, which the initrd leaves out; the
 * attribute survives execve(), so this sets it and execs the agent.
 */
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs("usage: subreaper PROGRAM [ARG...]\n", stderr);
        return 2;
    }
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) {
        perror("subreaper: prctl(PR_SET_CHILD_SUBREAPER)");
        return 1;
    }
    execv(argv[1], argv + 1);
    perror("subreaper: execv");
    return 127;
}
