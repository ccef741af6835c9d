#!/bin/sh
# Scenario forkfail: user1, limited to BD_NPROC (default 30) processes by
# RLIMIT_NPROC, tries to create BD_COUNT (default 100) sleeping processes,
# so most of its forks fail with EAGAIN (drives FORK_FAILED); then the
# scenario holds for BD_SECONDS seconds, or forever, and kills them.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
log=/tmp/forkfail.log
rm -f "$log"
nproc=${BD_NPROC:-30}
echo "SCENARIO forkfail: start nproc=$nproc count=${BD_COUNT:-100}"
bd_as_bg --nproc "$nproc" "$BD_USER1" spawn --count "${BD_COUNT:-100}" --log "$log"
# shellcheck disable=SC2154 # bd_pid is set by bd_as_bg
spawn_pid=$bd_pid
if ! bd_wait_lines "$log" '^SPAWN done' 1 3600; then
	echo "SCENARIO forkfail: spawn did not report done"
	exit 1
fi
line=$(grep -m 1 '^SPAWN done' "$log")
echo "SCENARIO forkfail: spawned count=$(bd_field "$line" count) failed=$(bd_field "$line" failed) fork_errors=$(bd_field "$line" fork_errors) errno=$(bd_field "$line" errno)"
bd_hold
bd_kill_uid "$BD_USER1" || echo "SCENARIO forkfail: user1 processes survived"
wait "$spawn_pid"
echo "SCENARIO forkfail: over processes=$(bd_nprocs)"
