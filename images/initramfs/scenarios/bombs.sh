#!/bin/sh
# Scenario bombs: BD_ROUNDS (default 5) fork bombs in a row, each of at most
# BD_MAX (default 100) processes (forkbomb --max, BD_MODE cpu|io), as user1.
# Each round waits until something outside the guest (bdmon) has killed every
# process of user1, then pauses 1 s. For benchmarks of detection and repair.
# BD_IDLE seconds of quiet come first (default 0), so that a host can read the
# guest's baseline before any bomb exists.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
echo "SCENARIO bombs: idle ${BD_IDLE:-0}s"
sleep "${BD_IDLE:-0}"
i=1
while [ "$i" -le "${BD_ROUNDS:-5}" ]; do
	echo "SCENARIO bombs: round $i starts max=${BD_MAX:-100}"
	bd_as_bg "$BD_USER1" forkbomb --mode "${BD_MODE:-cpu}" --max "${BD_MAX:-100}"
	# shellcheck disable=SC2154 # bd_pid is set by bd_as_bg
	wait "$bd_pid"
	while [ "$(bd_nprocs_uid "$BD_USER1")" -gt 0 ]; do
		sleep 0.2
	done
	echo "SCENARIO bombs: round $i over"
	sleep 1
	i=$((i + 1))
done
