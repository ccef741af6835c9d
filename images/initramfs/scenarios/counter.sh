#!/bin/sh
# Scenario counter: run `counter` (a magic page with a fast counter that a
# host finds in guest memory) for BD_SECONDS seconds, or forever.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
counter &
counter_pid=$!
bd_hold
kill "$counter_pid" 2>/dev/null
wait "$counter_pid"
echo "SCENARIO counter: stopped pid=$counter_pid"
