#!/bin/sh
# Scenario spawn: BD_COUNT (default 500) sleeping processes of user1, then the
# process table between markers; then hold for BD_SECONDS seconds, or forever.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
log=/tmp/spawn.log
rm -f "$log"
bd_as_bg "$BD_USER1" spawn --count "${BD_COUNT:-500}" --log "$log"
# shellcheck disable=SC2154 # bd_pid is set by bd_as_bg
spawn_pid=$bd_pid
if ! bd_wait_lines "$log" '^SPAWN done' 1 3600; then
	echo "SCENARIO spawn: spawn did not report done"
	exit 1
fi
echo "BACKDOORS: ps begin"
ps -o pid,ppid,user,stat,rss,args
echo "BACKDOORS: ps end"
echo "SCENARIO spawn: processes=$(bd_nprocs) user1=$(bd_nprocs_uid "$BD_USER1")"
# The same table straight from /proc, with shell builtins only, as the last thing before waiting,
# so that the guest does not change under a host that reads its task list now:
# "PROC <pid> <ppid> <real uid> <comm>".
echo "BACKDOORS: procs begin"
for st in /proc/[0-9]*/status; do
	name='' ppid='' uid='' pid=''
	while read -r k v _; do
		case "$k" in
		Name:) name=$v ;;
		Pid:) pid=$v ;;
		PPid:) ppid=$v ;;
		Uid:)
			uid=$v
			break
			;;
		esac
	done <"$st" 2>/dev/null
	[ -n "$uid" ] && echo "PROC $pid $ppid $uid $name"
done
echo "BACKDOORS: procs end"
if [ -n "${BD_SECONDS:-}" ]; then
	bd_hold
else
	# Forever, without starting a process (bd_hold would run sleep).
	wait "$spawn_pid"
fi
bd_kill_uid "$BD_USER1"
rc=$?
wait "$spawn_pid" # reap it (it was killed)
exit "$rc"
