/* spawn: fill the process table with N long-lived sleeping processes.
 *
 * The parent forks N children that sleep forever, prints one line when all
 * exist, then waits forever (reaping children that get killed, never
 * replacing them). Used to test process-table introspection with 500+
 * processes, and, under a low RLIMIT_NPROC, to make forks fail: a fork that
 * fails is retried a few times, then that child is counted as failed and
 * the next one is tried, so spawn always reports and never spins.
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>

#define FORK_RETRY_MS 10
#define FORK_TRIES 4 /* per child: 1 try + 3 retries, 30 ms, then give up */
#define FAIL_STREAK 100 /* after this many lost children in a row: 1 try each */

static void usage(void)
{
	printf("Usage: spawn --count N [--sleep | --spin] [--log FILE]\n"
	       "\n"
	       "Creates N long-lived children, then waits forever.\n"
	       "  --count N   number of children (1..1000000)\n"
	       "  --sleep     children wake once a second (nanosleep loop) instead of\n"
	       "              sleeping in pause() until a signal comes\n"
	       "  --spin      children spin on the CPU forever (a fixed set of CPU\n"
	       "              hogs: no forking, little memory; they start together,\n"
	       "              once all exist)\n"
	       "  --log FILE  also append the output lines to FILE\n"
	       "  --help      show this help\n"
	       "\n"
	       "Output (stdout):\n"
	       "  SPAWN done count=<created> requested=<N> failed=<children not created>\n"
	       "      fork_errors=<failed fork() calls> errno=<last fork errno> pid=<pid> uid=<uid>\n"
	       "  (one line; a child whose fork fails %d times in a row, %d ms apart,\n"
	       "  is counted in failed and skipped: created + failed = N; after %d\n"
	       "  children in a row were lost, the rest get one try each)\n",
	       FORK_TRIES, FORK_RETRY_MS, FAIL_STREAK);
}

/* With --spin, children wait on this pipe until the parent has created all of
 * them (it closes the write end), so the hogs start together, as a fixed set. */
static int start_pipe[2] = { -1, -1 };

static void child_main(int periodic)
{
	volatile uint64_t spins = 0;
	char c;

	if (start_pipe[0] >= 0) {
		close(start_pipe[1]);
		while (read(start_pipe[0], &c, 1) < 0 && errno == EINTR)
			;
		close(start_pipe[0]);
	}
	for (;;) {
		if (periodic == 2)
			spins++;
		else if (periodic)
			bd_sleep_ms(1000);
		else
			pause();
	}
}

int main(int argc, char **argv)
{
	uint64_t count = 0;
	int periodic = 0;

	static const struct option opts[] = {
		{ "count", required_argument, NULL, 'c' },
		{ "sleep", no_argument, NULL, 's' },
		{ "spin", no_argument, NULL, 'p' },
		BD_COMMON_OPTIONS,
	};
	int c;
	while ((c = bd_next_option(argc, argv, opts, usage)) != -1) {
		switch (c) {
		case 'c':
			count = bd_parse_u64("--count", optarg, 1, 1000000);
			break;
		case 's':
			periodic = 1;
			break;
		case 'p':
			periodic = 2;
			break;
		}
	}
	bd_no_operands(argc, argv);
	if (count == 0)
		bd_usage_error("--count N is required");

	if (periodic == 2 && pipe(start_pipe) != 0)
		bd_die_errno("pipe");
	uint64_t created = 0, failed = 0, fork_errors = 0, streak = 0;
	int last_errno = 0;
	for (uint64_t i = 0; i < count; i++) {
		pid_t pid = -1;
		const int tries = streak >= FAIL_STREAK ? 1 : FORK_TRIES;
		for (int attempt = 0; attempt < tries; attempt++) {
			if (attempt > 0)
				bd_sleep_ms(FORK_RETRY_MS);
			pid = fork();
			if (pid >= 0)
				break;
			fork_errors++;
			last_errno = errno;
		}
		if (pid == 0)
			child_main(periodic);
		if (pid < 0) {
			failed++;
			streak++;
			continue;
		}
		created++;
		streak = 0;
	}
	if (start_pipe[1] >= 0) {
		close(start_pipe[1]); /* EOF: every child starts spinning */
		close(start_pipe[0]);
	}
	if (failed)
		fprintf(stderr, "spawn: %" PRIu64 " of %" PRIu64 " children not created: fork: %s\n",
			failed, count, strerror(last_errno));
	bd_emit("SPAWN done count=%" PRIu64 " requested=%" PRIu64 " failed=%" PRIu64
		" fork_errors=%" PRIu64 " errno=%d pid=%d uid=%u",
		created, count, failed, fork_errors, last_errno, (int)getpid(),
		(unsigned)getuid());

	for (;;) {
		pid_t dead = waitpid(-1, NULL, 0);
		if (dead < 0 && errno == ECHILD)
			pause(); /* all children gone: keep existing until killed */
	}
}
