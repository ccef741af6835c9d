#!/bin/sh
# Scenario forkstorm: user1 creates BD_COUNT (default 300) sleeping
# processes as fast as it can (drives NPROCS and MAXPROC_RATE_PERUID), then
# the scenario holds for BD_SECONDS seconds, or forever, and kills them.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
log=/tmp/forkstorm.log
rm -f "$log"
echo "SCENARIO forkstorm: base processes=$(bd_nprocs)"
bd_as_bg "$BD_USER1" spawn --count "${BD_COUNT:-300}" --log "$log"
# shellcheck disable=SC2154 # bd_pid is set by bd_as_bg
spawn_pid=$bd_pid
if ! bd_wait_lines "$log" '^SPAWN done' 1 3600; then
	echo "SCENARIO forkstorm: spawn did not report done"
	exit 1
fi
echo "SCENARIO forkstorm: spawned processes=$(bd_nprocs) user1=$(bd_nprocs_uid "$BD_USER1")"
bd_hold
bd_kill_uid "$BD_USER1" || echo "SCENARIO forkstorm: user1 processes survived"
wait "$spawn_pid"
echo "SCENARIO forkstorm: over processes=$(bd_nprocs)"
