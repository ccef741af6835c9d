/* spawn: fill the process table with N long-lived sleeping processes.
 *
 * The parent forks N children that sleep forever, prints one line when all
 * exist, then waits forever (reaping children that get killed, never
 * replacing them). Used to test process-table introspection with 500+
 * processes.
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <getopt.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>

#define FORK_RETRY_MS 10
#define FORK_RETRIES 500 /* per child: about 5 s of retrying */

static void usage(void)
{
	printf("Usage: spawn --count N [--sleep] [--log FILE]\n"
	       "\n"
	       "Creates N long-lived children, then waits forever.\n"
	       "  --count N   number of children (1..1000000)\n"
	       "  --sleep     children wake once a second (nanosleep loop) instead of\n"
	       "              sleeping in pause() until a signal comes\n"
	       "  --log FILE  also append the output lines to FILE\n"
	       "  --help      show this help\n"
	       "\n"
	       "Output (stdout):\n"
	       "  SPAWN done count=<created> requested=<N> pid=<pid> uid=<uid>\n"
	       "  (created < N only if fork kept failing for ~5 s)\n");
}

static void child_main(int periodic)
{
	for (;;) {
		if (periodic)
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
		{ "log", required_argument, NULL, 'l' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			count = bd_parse_u64("--count", optarg, 1, 1000000);
			break;
		case 's':
			periodic = 1;
			break;
		case 'l':
			bd_open_log(optarg);
			break;
		case 'h':
			usage();
			return BD_EXIT_OK;
		default:
			bd_usage_error("unknown or incomplete option '%s'", argv[optind - 1]);
		}
	}
	if (optind < argc)
		bd_usage_error("unexpected argument '%s'", argv[optind]);
	if (count == 0)
		bd_usage_error("--count N is required");

	uint64_t created = 0;
	for (uint64_t i = 0; i < count; i++) {
		pid_t pid = -1;
		for (int attempt = 0; attempt < FORK_RETRIES; attempt++) {
			pid = fork();
			if (pid >= 0)
				break;
			bd_sleep_ms(FORK_RETRY_MS);
		}
		if (pid == 0)
			child_main(periodic);
		if (pid < 0) {
			fprintf(stderr, "spawn: fork failed after %d tries: %s\n",
				FORK_RETRIES, strerror(errno));
			break;
		}
		created++;
	}
	bd_emit("SPAWN done count=%" PRIu64 " requested=%" PRIu64 " pid=%d uid=%u",
		created, count, (int)getpid(), (unsigned)getuid());

	for (;;) {
		pid_t dead = waitpid(-1, NULL, 0);
		if (dead < 0 && errno == ECHILD)
			pause(); /* all children gone: keep existing until killed */
	}
}
