/* useful: the "useful work" whose slowdown shows how crippled a guest is.
 *
 * Each iteration runs a fixed amount of CPU work (W million rounds of a
 * multiply/xor hash chain, each round depending on the previous one, so the
 * compiler cannot shortcut it) and reports its wall-clock time measured with
 * CLOCK_MONOTONIC. On a healthy guest the times are flat; under a fork bomb
 * or a memory hog they grow; after healing they return to the baseline.
 */
#define _GNU_SOURCE
#include "bdprog.h"


/* A round is a chain of xor, multiply, shift-xor: about 6 cycles. 36 M
 * rounds take about 50 ms on a modern x86-64 core at 4+ GHz (measured 60 ms
 * on a 2-core cloud VM). */
#define DEFAULT_WORK 36
#define DEFAULT_ITERATIONS 20
#define MAX_ITERATIONS 10000000ull

static volatile uint64_t sink;

static void usage(void)
{
	printf("Usage: useful [--iterations N] [--work W] [--log FILE]\n"
	       "\n"
	       "Runs N iterations of a fixed CPU workload and times each one.\n"
	       "  --iterations N  number of iterations (default %d, max %llu)\n"
	       "  --work W        million hash rounds per iteration (default %d,\n"
	       "                  about 50 ms natively)\n"
	       "  --log FILE      also append the output lines to FILE\n"
	       "  --help          show this help\n"
	       "\n"
	       "Output (stdout), iterations numbered from 1:\n"
	       "  USEFUL start iterations=<N> work=<W> pid=<pid> uid=<uid>\n"
	       "  USEFUL iter=<i> wall_us=<microseconds> pid=<pid> uid=<uid>\n"
	       "  USEFUL done iterations=<N> median_us=<microseconds>\n",
	       DEFAULT_ITERATIONS, MAX_ITERATIONS, DEFAULT_WORK);
}

static uint64_t hash_rounds(uint64_t rounds, uint64_t h)
{
	for (uint64_t i = 0; i < rounds; i++) {
		h ^= i;
		h *= 0x100000001b3ull;
		h ^= h >> 29;
	}
	return h;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	uint64_t iterations = DEFAULT_ITERATIONS, work = DEFAULT_WORK;

	static const struct option opts[] = {
		{ "iterations", required_argument, NULL, 'n' },
		{ "work", required_argument, NULL, 'w' },
		BD_COMMON_OPTIONS,
	};
	int c;
	while ((c = bd_next_option(argc, argv, opts, usage)) != -1) {
		switch (c) {
		case 'n':
			iterations = bd_parse_u64("--iterations", optarg, 1, MAX_ITERATIONS);
			break;
		case 'w':
			work = bd_parse_u64("--work", optarg, 1, 1000000);
			break;
		}
	}
	bd_no_operands(argc, argv);

	uint64_t *wall_us = calloc((size_t)iterations, sizeof(uint64_t));
	if (wall_us == NULL)
		bd_die_errno("calloc");

	const int pid = (int)getpid();
	const unsigned uid = (unsigned)getuid();
	const uint64_t rounds = work * 1000000ull;
	uint64_t h = 0xcbf29ce484222325ull;

	bd_emit("USEFUL start iterations=%" PRIu64 " work=%" PRIu64 " pid=%d uid=%u",
		iterations, work, pid, uid);
	for (uint64_t i = 0; i < iterations; i++) {
		uint64_t t0 = bd_now_ns();
		h = hash_rounds(rounds, h);
		sink = h;
		uint64_t us = (bd_now_ns() - t0) / 1000;
		wall_us[i] = us;
		bd_emit("USEFUL iter=%" PRIu64 " wall_us=%" PRIu64 " pid=%d uid=%u",
			i + 1, us, pid, uid);
	}

	qsort(wall_us, (size_t)iterations, sizeof(uint64_t), cmp_u64);
	uint64_t median = iterations % 2
		? wall_us[iterations / 2]
		: (wall_us[iterations / 2 - 1] + wall_us[iterations / 2]) / 2;
	bd_emit("USEFUL done iterations=%" PRIu64 " median_us=%" PRIu64,
		iterations, median);
	return BD_EXIT_OK;
}
