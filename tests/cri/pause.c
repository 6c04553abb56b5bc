/*
 * The first process of a CRI pod sandbox in pykata's CRI tests (the
 * sandbox_image the harness builds). It holds the pod's namespaces open and
 * does nothing else: it sleeps until SIGTERM or SIGINT, and waits for every
 * child that ends up with it as its parent, so none stays a zombie.
 *
 * Built with `gcc -static -O2`: the image holds this one file.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

static volatile sig_atomic_t stopping;

static void on_stop(int sig)
{
	(void)sig;
	stopping = 1;
}

static void on_child(int sig)
{
	int saved = errno;

	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	errno = saved;
}

static int handle(int sig, void (*handler)(int), int flags)
{
	struct sigaction action;

	memset(&action, 0, sizeof(action));
	action.sa_handler = handler;
	action.sa_flags = flags;
	sigfillset(&action.sa_mask);
	return sigaction(sig, &action, NULL);
}

int main(void)
{
	sigset_t blocked, waiting;

	/* Block the signals while checking the flag, and unblock them only
	 * inside sigsuspend: a signal between the check and the sleep would
	 * otherwise be missed. */
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGTERM);
	sigaddset(&blocked, SIGINT);
	sigaddset(&blocked, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &blocked, &waiting) != 0 ||
	    handle(SIGTERM, on_stop, 0) != 0 ||
	    handle(SIGINT, on_stop, 0) != 0 ||
	    handle(SIGCHLD, on_child, SA_NOCLDSTOP) != 0) {
		perror("pause: signal setup");
		return 1;
	}
	sigdelset(&waiting, SIGTERM);
	sigdelset(&waiting, SIGINT);
	sigdelset(&waiting, SIGCHLD);
	while (!stopping)
		sigsuspend(&waiting);
	return 0;
}
