#!/bin/sh
# Scenario repair: targets for the repair hooks. user1 runs a CPU-busy
# process (`counter`) and one sleeping interruptibly (`sleep 100000`); the
# scenario prints their pids, waits until each ends (a host kills them
# through the repair-hook mailbox) and reports how, then holds for
# BD_SECONDS seconds, or forever. With BD_TIMEOUT it stops waiting after
# that many seconds and kills the survivors itself (reported as a timeout).
# With BD_SLEEPER=naps the sleeper is a shell that sleeps one second at a
# time, forever (it wakes up now and then, which is when a signal posted
# without the guest's help, on a stock kernel, gets noticed).
# Lines:
#   REPAIR busy pid=<p>                  the counter process itself
#   REPAIR sleeper pid=<q>               the sleep process itself
#   REPAIR exited pid=<p> status=<n>     as the shell reports it: 137 = SIGKILL
#   SCENARIO repair: all exited
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
log=/tmp/repair.log
rm -f "$log"

bd_as_bg "$BD_USER1" counter --log "$log"
# shellcheck disable=SC2154 # bd_pid is set by bd_as_bg
busy=$bd_pid
if [ "${BD_SLEEPER:-}" = naps ]; then
	bd_as_bg "$BD_USER1" sh -c 'while :; do sleep 1; done'
	sleeper_comm="sh"
else
	bd_as_bg "$BD_USER1" sleep 100000
	sleeper_comm="sleep"
fi
sleeper=$bd_pid
# Print the pids only once they are the real programs (runas has exec'd).
if ! bd_wait_lines "$log" "^COUNTER ready pid=$busy " 1 60; then
	echo "SCENARIO repair: counter did not start"
fi
tries=300
while [ "$tries" -gt 0 ] && [ "$(cat "/proc/$sleeper/comm" 2>/dev/null)" != "$sleeper_comm" ]; do
	sleep 0.2
	tries=$((tries - 1))
done
echo "REPAIR busy pid=$busy"
echo "REPAIR sleeper pid=$sleeper"

# Poll (rather than `wait PID` in turn) so that each exit is reported when
# it happens, whatever the order. The shell keeps the status of a child it
# has already reaped, so `wait` still returns it.
pending="$busy $sleeper"
polls=$((${BD_TIMEOUT:-0} * 5))
while [ -n "$pending" ]; do
	still=""
	for pid in $pending; do
		if bd_alive "$pid"; then
			still="$still $pid"
		else
			wait "$pid"
			echo "REPAIR exited pid=$pid status=$?"
		fi
	done
	pending=${still# }
	[ -n "$pending" ] || break
	if [ -n "${BD_TIMEOUT:-}" ]; then
		polls=$((polls - 1))
		if [ "$polls" -lt 0 ]; then
			echo "SCENARIO repair: timeout after ${BD_TIMEOUT}s, killing $pending"
			# shellcheck disable=SC2086 # a list of pids
			kill -9 $pending 2>/dev/null
			BD_TIMEOUT=""
		fi
	fi
	sleep 0.2
done
echo "SCENARIO repair: all exited"
bd_hold
