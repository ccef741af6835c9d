/* bdbench: guest-side microbenchmarks of the kernel paths the Sensor Box
 * hooks touch, to measure what the kernel option costs.
 *
 *   fork   fork(), the child _exit(0)s, the parent waitpid()s it: one op
 *   pipe   two processes bounce one byte over two pipes: one round trip
 *          (two context switches) is one op
 *   fault  mmap N anonymous pages (no huge pages), write one byte to each:
 *          one page fault per op; only the writes are timed, the mmap and
 *          munmap around them are not
 *
 * Each benchmark runs one warm-up round (not counted), then R rounds of N
 * ops, each round timed with CLOCK_MONOTONIC. The per-op time of a round is
 * its time / N; the line reports the median, p99 (nearest rank) and minimum
 * of those R per-op times. Nothing is pinned to a CPU.
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>

#define DEFAULT_ROUNDS 15
#define MAX_ROUNDS 10000
#define MAX_ITERATIONS 100000000ull

struct bench {
	const char *name;
	uint64_t default_ops;
	/* Runs `ops` ops and returns the elapsed ns; exits on failure. */
	uint64_t (*run)(uint64_t ops);
	/* Optional set-up before the warm-up round and tear-down after the
	 * last round. */
	void (*setup)(void);
	void (*teardown)(void);
};

static void usage(void)
{
	printf("Usage: bdbench <fork|pipe|fault|all> [--iterations N] [--rounds R] [--log FILE]\n"
	       "\n"
	       "Microbenchmarks of kernel paths, for comparing kernels and options:\n"
	       "  fork   fork() + child _exit(0) + waitpid() per op (default N=500)\n"
	       "  pipe   one-byte ping-pong between two processes over two pipes,\n"
	       "         one round trip per op (default N=10000)\n"
	       "  fault  write one byte to each page of a fresh anonymous mapping of\n"
	       "         N pages, one page fault per op (default N=16384)\n"
	       "  all    fork, pipe and fault in this order\n"
	       "  --iterations N  ops per round for every chosen benchmark (1..%llu)\n"
	       "  --rounds R      timed rounds (1..%d, default %d); one extra warm-up\n"
	       "                  round runs first and is not counted\n"
	       "  --log FILE      also append the output lines to FILE\n"
	       "  --help          show this help\n"
	       "\n"
	       "Output (stdout), one line per benchmark, times per op over the rounds:\n"
	       "  BDBENCH <name> ops=<N> rounds=<R> median_ns=<ns> p99_ns=<ns> min_ns=<ns>\n",
	       MAX_ITERATIONS, MAX_ROUNDS, DEFAULT_ROUNDS);
}

/* ---- fork ---------------------------------------------------------------- */

static uint64_t run_fork(uint64_t ops)
{
	uint64_t t0 = bd_now_ns();
	for (uint64_t i = 0; i < ops; i++) {
		pid_t pid = fork();
		if (pid < 0)
			bd_die_errno("fork");
		if (pid == 0)
			_exit(0);
		int status;
		while (waitpid(pid, &status, 0) < 0) {
			if (errno != EINTR)
				bd_die_errno("waitpid");
		}
	}
	return bd_now_ns() - t0;
}

/* ---- pipe ---------------------------------------------------------------- */

static int ping_wr = -1, pong_rd = -1; /* parent's ends */
static pid_t echo_pid = -1;

static void read_byte(int fd, const char *what)
{
	char b;
	for (;;) {
		ssize_t n = read(fd, &b, 1);
		if (n == 1)
			return;
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0) {
			fprintf(stderr, "bdbench: %s: unexpected end of file\n", what);
			exit(BD_EXIT_FAIL);
		}
		bd_die_errno("read %s", what);
	}
}

static void write_byte(int fd, const char *what)
{
	const char b = 'x';
	for (;;) {
		ssize_t n = write(fd, &b, 1);
		if (n == 1)
			return;
		if (n < 0 && errno == EINTR)
			continue;
		bd_die_errno("write %s", what);
	}
}

static void setup_pipe(void)
{
	int ping[2], pong[2];
	if (pipe2(ping, O_CLOEXEC) != 0 || pipe2(pong, O_CLOEXEC) != 0)
		bd_die_errno("pipe2");
	echo_pid = fork();
	if (echo_pid < 0)
		bd_die_errno("fork");
	if (echo_pid == 0) {
		/* The echo side: read a byte, send it back, until EOF. */
		close(ping[1]);
		close(pong[0]);
		char b;
		for (;;) {
			ssize_t n = read(ping[0], &b, 1);
			if (n == 0)
				_exit(0);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				_exit(1);
			}
			if (write(pong[1], &b, 1) != 1)
				_exit(1);
		}
	}
	close(ping[0]);
	close(pong[1]);
	ping_wr = ping[1];
	pong_rd = pong[0];
}

static uint64_t run_pipe(uint64_t ops)
{
	uint64_t t0 = bd_now_ns();
	for (uint64_t i = 0; i < ops; i++) {
		write_byte(ping_wr, "ping pipe");
		read_byte(pong_rd, "pong pipe");
	}
	return bd_now_ns() - t0;
}

static void teardown_pipe(void)
{
	close(ping_wr); /* EOF: the echo side exits */
	close(pong_rd);
	while (waitpid(echo_pid, NULL, 0) < 0 && errno == EINTR)
		;
	ping_wr = pong_rd = -1;
	echo_pid = -1;
}

/* ---- fault --------------------------------------------------------------- */

static uint64_t run_fault(uint64_t ops)
{
	const size_t page = (size_t)sysconf(_SC_PAGESIZE);
	const size_t bytes = (size_t)ops * page;
	unsigned char *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		bd_die_errno("mmap of %" PRIu64 " pages", ops);
	/* One fault per 4 KiB page, not one per 2 MiB huge page. */
	(void)madvise(mem, bytes, MADV_NOHUGEPAGE);
	volatile unsigned char *vmem = mem;
	uint64_t t0 = bd_now_ns();
	for (size_t off = 0; off < bytes; off += page)
		vmem[off] = 1;
	uint64_t ns = bd_now_ns() - t0;
	if (munmap(mem, bytes) != 0)
		bd_die_errno("munmap");
	return ns;
}

/* ---- driver -------------------------------------------------------------- */

static const struct bench benches[] = {
	{ "fork", 500, run_fork, NULL, NULL },
	{ "pipe", 10000, run_pipe, setup_pipe, teardown_pipe },
	{ "fault", 16384, run_fault, NULL, NULL },
};
#define NBENCHES (sizeof(benches) / sizeof(benches[0]))

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

static void run_bench(const struct bench *b, uint64_t ops, uint64_t rounds,
		      uint64_t *per_op)
{
	if (b->setup)
		b->setup();
	(void)b->run(ops); /* warm-up */
	for (uint64_t r = 0; r < rounds; r++) {
		uint64_t ns = b->run(ops);
		per_op[r] = (ns + ops / 2) / ops;
	}
	if (b->teardown)
		b->teardown();

	qsort(per_op, (size_t)rounds, sizeof(uint64_t), cmp_u64);
	uint64_t median = rounds % 2
		? per_op[rounds / 2]
		: (per_op[rounds / 2 - 1] + per_op[rounds / 2]) / 2;
	/* Nearest rank: the smallest value with >= 99% of rounds at or below. */
	uint64_t rank = (rounds * 99 + 99) / 100;
	uint64_t p99 = per_op[rank - 1];
	bd_emit("BDBENCH %s ops=%" PRIu64 " rounds=%" PRIu64 " median_ns=%" PRIu64
		" p99_ns=%" PRIu64 " min_ns=%" PRIu64,
		b->name, ops, rounds, median, p99, per_op[0]);
}

int main(int argc, char **argv)
{
	uint64_t iterations = 0, rounds = DEFAULT_ROUNDS;

	static const struct option opts[] = {
		{ "iterations", required_argument, NULL, 'n' },
		{ "rounds", required_argument, NULL, 'r' },
		BD_COMMON_OPTIONS,
	};
	int c;
	while ((c = bd_next_option(argc, argv, opts, usage)) != -1) {
		switch (c) {
		case 'n':
			iterations = bd_parse_u64("--iterations", optarg, 1, MAX_ITERATIONS);
			break;
		case 'r':
			rounds = bd_parse_u64("--rounds", optarg, 1, MAX_ROUNDS);
			break;
		}
	}
	if (optind >= argc)
		bd_usage_error("needs a benchmark: fork, pipe, fault or all");
	if (optind + 1 < argc)
		bd_usage_error("unexpected argument '%s'", argv[optind + 1]);
	const char *which = argv[optind];
	int all = strcmp(which, "all") == 0;
	int found = all;
	for (size_t i = 0; i < NBENCHES; i++)
		found |= strcmp(which, benches[i].name) == 0;
	if (!found)
		bd_usage_error("unknown benchmark '%s' (fork, pipe, fault or all)", which);

	uint64_t *per_op = calloc((size_t)rounds, sizeof(uint64_t));
	if (per_op == NULL)
		bd_die_errno("calloc");
	/* A dying echo child must not kill us with SIGPIPE; write() reports it. */
	signal(SIGPIPE, SIG_IGN);

	for (size_t i = 0; i < NBENCHES; i++) {
		if (!all && strcmp(which, benches[i].name) != 0)
			continue;
		run_bench(&benches[i], iterations ? iterations : benches[i].default_ops,
			  rounds, per_op);
	}
	return BD_EXIT_OK;
}
