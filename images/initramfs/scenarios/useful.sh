#!/bin/sh
# Scenario useful: BD_ITERATIONS (default 20) timed iterations of CPU work as
# user2 (BD_WORK overrides the work per iteration).
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
# shellcheck disable=SC2086 # BD_WORK is one number or empty
bd_as "$BD_USER2" useful --iterations "${BD_ITERATIONS:-20}" ${BD_WORK:+--work "$BD_WORK"}
