#!/bin/sh
# Scenario cpufair: two users share the CPU fairly — BD_CHILDREN (default 4)
# CPU-bound processes each (spawn --spin), next to useful as user2 — for
# BD_SECONDS (default 20) seconds; then both users' processes are removed.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
echo "SCENARIO cpufair: starts"
bd_as_bg "$BD_USER1" spawn --count "${BD_CHILDREN:-4}" --spin
bd_as_bg "$BD_USER2" spawn --count "${BD_CHILDREN:-4}" --spin
sleep "${BD_SECONDS:-20}"
bd_kill_uid "$BD_USER1" || echo "SCENARIO cpufair: user1 processes survived"
bd_kill_uid "$BD_USER2" || echo "SCENARIO cpufair: user2 processes survived"
echo "SCENARIO cpufair: over"
