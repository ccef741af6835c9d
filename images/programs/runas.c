/* runas: run a command as another user.
 *
 *   runas UID GID cmd args...
 *
 * Drops all supplementary groups except GID, sets the real, effective and
 * saved gid and uid, checks that root cannot be regained, then executes cmd
 * (a name without '/' is looked up in PATH).
 */
#define _GNU_SOURCE
#include "bdprog.h"

#include <grp.h>
#include <sys/types.h>

static void usage(void)
{
	printf("Usage: runas UID GID cmd [args...]\n"
	       "\n"
	       "Sets the supplementary groups to {GID}, then gid GID and uid UID,\n"
	       "then executes cmd with args (searched in PATH when it has no '/').\n"
	       "Needs to run as root. Exit status: that of cmd; 126 if cmd cannot be\n"
	       "executed, 127 if not found, 1 if the ids cannot be set, 2 on usage errors.\n");
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "--help") == 0) {
		usage();
		return BD_EXIT_OK;
	}
	int first = 1;
	if (argc >= 2 && strcmp(argv[1], "--") == 0)
		first = 2;
	if (argc - first < 3)
		bd_usage_error("needs UID GID and a command");

	uid_t uid = (uid_t)bd_parse_u64("UID", argv[first], 0, 4294967294ull);
	gid_t gid = (gid_t)bd_parse_u64("GID", argv[first + 1], 0, 4294967294ull);
	char **cmd = &argv[first + 2];

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
