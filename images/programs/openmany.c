/* openmany: fill a file table with open descriptors of /dev/null.
 *
 * Raises the soft RLIMIT_NOFILE to the hard limit, then opens /dev/null
 * again and again, keeping every descriptor, until open() fails or --max
 * descriptors are open. Prints how many it opened and why it stopped, then
 * holds them (sleeps) so the table stays full while a host looks at it:
 * ENFILE means the system-wide table (fs.file-max) is full, EMFILE the
 * per-process limit. Root is exempt from fs.file-max, so run it as a user
 * to hit ENFILE.
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <sys/resource.h>

static void usage(void)
{
	printf("Usage: openmany [--max N] [--hold SECONDS] [--log FILE]\n"
	       "\n"
	       "Raises RLIMIT_NOFILE to its hard limit, then opens /dev/null over\n"
	       "and over, keeping every descriptor, until open() fails or N are open;\n"
	       "then holds them.\n"
	       "  --max N         stop after N descriptors (1..100000000; default: until\n"
	       "                  open() fails)\n"
	       "  --hold SECONDS  keep the descriptors open this long, then exit\n"
	       "                  (0..31536000; default: forever)\n"
	       "  --log FILE      also append the output lines to FILE\n"
	       "  --help          show this help\n"
	       "\n"
	       "Output (stdout):\n"
	       "  OPENMANY opened=<n> errno=<e> (<name>) nofile=<soft limit> pid=<pid> uid=<uid>\n"
	       "      e is open()'s errno, e.g. 23 (ENFILE): the system file table is\n"
	       "      full; 24 (EMFILE): the per-process limit; 0 (none): N reached\n");
}

/* "ENFILE" for 23 and so on; "none" for 0. */
static const char *errno_name(int e)
{
	if (e == 0)
		return "none";
	const char *name = strerrorname_np(e);
	return name ? name : "unknown";
}

int main(int argc, char **argv)
{
	uint64_t max = 0, hold = 0;
	int hold_forever = 1;

	static const struct option opts[] = {
		{ "max", required_argument, NULL, 'm' },
		{ "hold", required_argument, NULL, 's' },
		BD_COMMON_OPTIONS,
	};
	int c;
	while ((c = bd_next_option(argc, argv, opts, usage)) != -1) {
		switch (c) {
		case 'm':
			max = bd_parse_u64("--max", optarg, 1, 100000000);
			break;
		case 's':
			hold = bd_parse_u64("--hold", optarg, 0, 31536000);
			hold_forever = 0;
			break;
		}
	}
	bd_no_operands(argc, argv);

	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
		bd_die_errno("getrlimit(RLIMIT_NOFILE)");
	if (rl.rlim_cur != rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
			bd_die_errno("setrlimit(RLIMIT_NOFILE, %llu)",
				     (unsigned long long)rl.rlim_max);
	}

	/* Descriptors are never closed: exit (or a kill) releases them all. */
	uint64_t opened = 0;
	int err = 0;
	while (max == 0 || opened < max) {
		int fd = open("/dev/null", O_RDONLY);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			err = errno;
			break;
		}
		opened++;
	}
	bd_emit("OPENMANY opened=%" PRIu64 " errno=%d (%s) nofile=%llu pid=%d uid=%u",
		opened, err, errno_name(err), (unsigned long long)rl.rlim_cur,
		(int)getpid(), (unsigned)getuid());

	if (hold_forever) {
		for (;;)
			bd_sleep_ms(3600 * 1000);
	}
	bd_sleep_ms(hold * 1000);
	return BD_EXIT_OK;
}
