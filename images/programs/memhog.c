/* memhog: a memory hog that defends itself.
 *
 * A controller keeps N children alive. Each child maps M MiB of anonymous
 * memory and writes to every page of it in a loop forever, so the memory is
 * resident and stays dirty. The controller waits for its children and
 * respawns any child that dies, for whatever reason (exit, OOM kill, SIGKILL).
 * Killing one child is therefore useless: a healer must kill the controller
 * and all children (e.g. every process of the user).
 *
 * With --seconds S every child exits once the deadline passes and the
 * controller stops respawning, kills what is left and exits.
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>

#define RESPAWN_PRINTS_PER_SEC 5
#define FORK_RETRY_MS 100

static volatile sig_atomic_t alarm_fired;

static void usage(void)
{
	printf("Usage: memhog --children N --mb M [--seconds S] [--interval-ms T] [--log FILE]\n"
	       "\n"
	       "Keeps N children alive; each maps M MiB and writes every page in a loop.\n"
	       "Any child that dies is respawned by the controller.\n"
	       "  --children N     number of children to keep alive (1..100000)\n"
	       "  --mb M           MiB each child allocates and touches (1..1048576)\n"
	       "  --seconds S      stop everything after S seconds (default: never)\n"
	       "  --interval-ms T  pause T ms between passes over the memory (default 0)\n"
	       "  --log FILE       also append the output lines to FILE\n"
	       "  --help           show this help\n"
	       "\n"
	       "Output (stdout):\n"
	       "  MEMHOG start children=<N> mb=<M> pid=<pid> uid=<uid>\n"
	       "  MEMHOG respawn pid=<new> old=<old> status=<exit:N|signal:N> respawns=<total> suppressed=<n>\n"
	       "      (at most %d respawn lines per second; suppressed counts skipped lines)\n"
	       "  MEMHOG done respawns=<total>   (only with --seconds)\n",
	       RESPAWN_PRINTS_PER_SEC);
}

static void on_alarm(int sig)
{
	(void)sig;
	alarm_fired = 1;
}

static void child_main(size_t bytes, uint64_t deadline, uint64_t interval_ms)
{
	/* The controller's SIGALRM handler is for the controller only. */
	signal(SIGALRM, SIG_DFL);
	unsigned char *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		/* Let the controller respawn us later rather than spin here. */
		bd_sleep_ms(FORK_RETRY_MS);
		_exit(3);
	}
	const size_t page = (size_t)sysconf(_SC_PAGESIZE);
	volatile unsigned char *vmem = mem;
	unsigned char v = 0;
	for (;;) {
		v++;
		for (size_t off = 0; off < bytes; off += page)
			vmem[off] = v;
		if (bd_deadline_passed(deadline))
			_exit(0);
		if (interval_ms)
			bd_sleep_ms(interval_ms);
	}
}

static pid_t spawn_child(size_t bytes, uint64_t deadline, uint64_t interval_ms)
{
	pid_t pid = fork();
	if (pid == 0)
		child_main(bytes, deadline, interval_ms);
	return pid; /* -1 on failure */
}

static void describe_status(int status, char *buf, size_t len)
{
	if (WIFSIGNALED(status))
		snprintf(buf, len, "signal:%d", WTERMSIG(status));
	else if (WIFEXITED(status))
		snprintf(buf, len, "exit:%d", WEXITSTATUS(status));
	else
		snprintf(buf, len, "other:%d", status);
}

int main(int argc, char **argv)
{
	uint64_t children = 0, mb = 0, seconds = 0, interval_ms = 0;

	static const struct option opts[] = {
		{ "children", required_argument, NULL, 'c' },
		{ "mb", required_argument, NULL, 'm' },
		{ "seconds", required_argument, NULL, 's' },
		{ "interval-ms", required_argument, NULL, 'i' },
		BD_COMMON_OPTIONS,
	};
	int c;
	while ((c = bd_next_option(argc, argv, opts, usage)) != -1) {
		switch (c) {
		case 'c':
			children = bd_parse_u64("--children", optarg, 1, 100000);
			break;
		case 'm':
			mb = bd_parse_u64("--mb", optarg, 1, 1048576);
			break;
		case 's':
			seconds = bd_parse_u64("--seconds", optarg, 1, 31536000);
			break;
		case 'i':
			interval_ms = bd_parse_u64("--interval-ms", optarg, 0, 3600000);
			break;
		}
	}
	bd_no_operands(argc, argv);
	if (children == 0)
		bd_usage_error("--children N is required");
	if (mb == 0)
		bd_usage_error("--mb M is required");

	const size_t bytes = (size_t)mb << 20;
	const uint64_t deadline = bd_deadline_ns(seconds);
	pid_t *kids = calloc((size_t)children, sizeof(pid_t));
	if (kids == NULL)
		bd_die_errno("calloc");

	/* SIGALRM (no SA_RESTART) interrupts waitpid() at the deadline. */
	if (seconds) {
		struct sigaction sa = { .sa_handler = on_alarm };
		sigemptyset(&sa.sa_mask);
		sigaction(SIGALRM, &sa, NULL);
		alarm((unsigned)seconds);
	}

	bd_emit("MEMHOG start children=%" PRIu64 " mb=%" PRIu64 " pid=%d uid=%u",
		children, mb, (int)getpid(), (unsigned)getuid());

	uint64_t respawns = 0, suppressed = 0, window_prints = 0;
	uint64_t window_start = bd_now_ns();
	uint64_t alive = 0;
	/* Per slot: the pid that died there (0 = none yet) and how it died. */
	pid_t *old_pid = calloc((size_t)children, sizeof(pid_t));
	int *old_status = calloc((size_t)children, sizeof(int));
	if (old_pid == NULL || old_status == NULL)
		bd_die_errno("calloc");

	for (;;) {
		if (alarm_fired || bd_deadline_passed(deadline))
			break;

		/* Fill every empty slot: at start, after a death, after a
		 * failed fork. */
		uint64_t missing = 0;
		for (uint64_t i = 0; i < children; i++) {
			if (kids[i] > 0)
				continue;
			pid_t pid = spawn_child(bytes, deadline, interval_ms);
			if (pid < 0) {
				missing++;
				continue;
			}
			kids[i] = pid;
			alive++;
			if (old_pid[i] == 0)
				continue; /* first start of this slot */
			respawns++;
			uint64_t now = bd_now_ns();
			if (now - window_start >= 1000000000ull) {
				window_start = now;
				window_prints = 0;
			}
			if (window_prints < RESPAWN_PRINTS_PER_SEC) {
				char why[32];
				describe_status(old_status[i], why, sizeof(why));
				bd_emit("MEMHOG respawn pid=%d old=%d status=%s respawns=%" PRIu64
					" suppressed=%" PRIu64,
					(int)pid, (int)old_pid[i], why, respawns, suppressed);
				window_prints++;
				suppressed = 0;
			} else {
				suppressed++;
			}
			old_pid[i] = 0;
		}

		/* Block for the next death, unless a slot still needs a fork:
		 * then poll, so the retry comes soon. */
		int status = 0;
		pid_t dead = waitpid(-1, &status, missing ? WNOHANG : 0);
		if (dead < 0) {
			if (errno == EINTR)
				continue;
			if (errno != ECHILD)
				bd_die_errno("waitpid");
			dead = 0;
		}
		if (dead == 0) {
			bd_sleep_ms(FORK_RETRY_MS);
			continue;
		}
		for (uint64_t i = 0; i < children; i++) {
			if (kids[i] == dead) {
				kids[i] = 0;
				old_pid[i] = dead;
				old_status[i] = status;
				alive--;
				break;
			}
		}
	}

	/* Deadline: stop every child and reap them. */
	for (uint64_t i = 0; i < children; i++)
		if (kids[i] > 0)
			kill(kids[i], SIGKILL);
	while (alive > 0) {
		pid_t dead = waitpid(-1, NULL, 0);
		if (dead < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		alive--;
	}
	bd_emit("MEMHOG done respawns=%" PRIu64, respawns);
	return BD_EXIT_OK;
}
