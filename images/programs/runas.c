/* runas: run a command as another user.
 *
 *   runas [--nproc N] UID GID cmd args...
 *
 * Optionally sets RLIMIT_NPROC (soft and hard) to N while still root, then
 * drops all supplementary groups except GID, sets the real, effective and
 * saved gid and uid, checks that root cannot be regained, then executes cmd
 * (a name without '/' is looked up in PATH).
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <grp.h>
#include <sys/resource.h>
#include <sys/types.h>

static void usage(void)
{
	printf("Usage: runas [--nproc N] [--] UID GID cmd [args...]\n"
	       "\n"
	       "Sets the supplementary groups to {GID}, then gid GID and uid UID,\n"
	       "then executes cmd with args (searched in PATH when it has no '/').\n"
	       "  --nproc N  first set RLIMIT_NPROC, soft and hard, to N (0..4194304):\n"
	       "             the user's fork() fails with EAGAIN once it has N\n"
	       "             processes (counted over all of that uid's processes)\n"
	       "  --help     show this help\n"
	       "Needs to run as root. Exit status: that of cmd; 126 if cmd cannot be\n"
	       "executed, 127 if not found, 1 if the ids or the limit cannot be set,\n"
	       "2 on usage errors.\n");
}

int main(int argc, char **argv)
{
	int first = 1;
	int set_nproc = 0;
	rlim_t nproc = 0;
	/* Options come before UID; "--" ends them. */
	while (first < argc && strncmp(argv[first], "--", 2) == 0) {
		const char *opt = argv[first];
		if (strcmp(opt, "--") == 0) {
			first++;
			break;
		}
		if (strcmp(opt, "--help") == 0) {
			usage();
			return BD_EXIT_OK;
		}
		if (strcmp(opt, "--nproc") == 0) {
			if (first + 1 >= argc)
				bd_usage_error("--nproc needs a number");
			nproc = (rlim_t)bd_parse_u64("--nproc", argv[first + 1], 0, 4194304);
			set_nproc = 1;
			first += 2;
		} else if (strncmp(opt, "--nproc=", 8) == 0) {
			nproc = (rlim_t)bd_parse_u64("--nproc", opt + 8, 0, 4194304);
			set_nproc = 1;
			first++;
		} else {
			bd_usage_error("unknown option '%s'", opt);
		}
	}
	if (argc - first < 3)
		bd_usage_error("needs UID GID and a command");

	uid_t uid = (uid_t)bd_parse_u64("UID", argv[first], 0, 4294967294ull);
	gid_t gid = (gid_t)bd_parse_u64("GID", argv[first + 1], 0, 4294967294ull);
	char **cmd = &argv[first + 2];

	if (set_nproc) {
		struct rlimit rl = { .rlim_cur = nproc, .rlim_max = nproc };
		if (setrlimit(RLIMIT_NPROC, &rl) != 0)
			bd_die_errno("setrlimit(RLIMIT_NPROC, %llu)", (unsigned long long)nproc);
	}
	if (setgroups(1, &gid) != 0)
		bd_die_errno("setgroups(%u)", (unsigned)gid);
	if (setresgid(gid, gid, gid) != 0)
		bd_die_errno("setresgid(%u)", (unsigned)gid);
	if (setresuid(uid, uid, uid) != 0)
		bd_die_errno("setresuid(%u)", (unsigned)uid);
	if (uid != 0 && (setuid(0) == 0 || geteuid() == 0)) {
		fprintf(stderr, "runas: could still regain root after dropping to uid %u\n",
			(unsigned)uid);
		return BD_EXIT_FAIL;
	}

	execvp(cmd[0], cmd);
	int err = errno;
	fprintf(stderr, "runas: cannot execute '%s': %s\n", cmd[0], strerror(err));
	return err == ENOENT ? 127 : 126;
}
