/* rtspin: hang the guest from user space, the way a runaway real-time task
 * does. It disables the kernel's real-time throttling
 * (/proc/sys/kernel/sched_rt_runtime_us = -1), makes itself SCHED_FIFO at the
 * highest priority on every CPU it may run on, and spins. On a 1-vCPU guest
 * nothing else runs any more: no shell, no kernel worker of normal priority,
 * no context switch; the timer interrupt still ticks. The vCPU stays busy, so
 * from outside the guest looks alive: only the progress sensors show it hung.
 *
 * --seconds N spins for N seconds and then exits (bounded for tests that
 * want the guest back); without it, it spins forever.
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <fcntl.h>
#include <sched.h>

static void usage(void)
{
	printf("Usage: rtspin [--seconds N]\n"
	       "\n"
	       "Disables RT throttling, becomes SCHED_FIFO 99 and spins (forever, or\n"
	       "for N seconds). Prints RTSPIN start pid=<pid> before it spins.\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "seconds", required_argument, NULL, 's' },
		BD_COMMON_OPTIONS,
	};
	uint64_t seconds = 0, deadline = 0;
	struct sched_param sp = { .sched_priority = 99 };
	int c, fd;

	while ((c = bd_next_option(argc, argv, opts, usage)) != -1) {
		switch (c) {
		case 's':
			seconds = bd_parse_u64("--seconds", optarg, 1, 3600);
			break;
		}
	}
	fd = open("/proc/sys/kernel/sched_rt_runtime_us", O_WRONLY);
	if (fd < 0 || write(fd, "-1\n", 3) != 3)
		bd_die_errno("cannot disable RT throttling");
	close(fd);
	if (sched_setscheduler(0, SCHED_FIFO, &sp) != 0)
		bd_die_errno("sched_setscheduler(SCHED_FIFO, 99)");
	if (seconds)
		deadline = bd_deadline_ns(seconds);
	bd_emit("RTSPIN start pid=%d seconds=%" PRIu64, (int)getpid(), seconds);
	for (;;) {
		for (volatile unsigned int i = 0; i < (1u << 20); i++)
			;
		if (deadline && bd_deadline_passed(deadline))
			break;
	}
	bd_emit("RTSPIN done pid=%d", (int)getpid());
	return BD_EXIT_OK;
}
