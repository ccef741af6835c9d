#!/bin/sh
# Scenario forkbomb: useful as user2 for a baseline, then a fork bomb as user1
# (BD_MODE cpu|io, default cpu; BD_SECONDS bounds it; BD_MAX caps processes).
# Without BD_SECONDS the bomb runs until something heals the guest.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
# shellcheck disable=SC2086 # optional single-word arguments
bd_fault_scenario forkbomb forkbomb --mode "${BD_MODE:-cpu}" \
	${BD_SECONDS:+--seconds "$BD_SECONDS"} ${BD_MAX:+--max "$BD_MAX"}
