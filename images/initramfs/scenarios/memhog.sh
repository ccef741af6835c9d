#!/bin/sh
# Scenario memhog: useful as user2 for a baseline, then a self-respawning
# memory hog as user1 (BD_CHILDREN children x BD_MB MiB, default 30 x 8;
# BD_SECONDS bounds it; BD_INTERVAL_MS pauses between passes).
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
# shellcheck disable=SC2086 # optional single-word arguments
bd_fault_scenario memhog memhog --children "${BD_CHILDREN:-30}" --mb "${BD_MB:-8}" \
	${BD_SECONDS:+--seconds "$BD_SECONDS"} ${BD_INTERVAL_MS:+--interval-ms "$BD_INTERVAL_MS"}
