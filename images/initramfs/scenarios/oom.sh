#!/bin/sh
# Scenario oom: user1 runs memhog with BD_CHILDREN (default 6) children of
# BD_MB (default 160) MiB each, more than the guest's RAM, for BD_SECONDS
# (default 20) seconds, so the OOM killer runs again and again (drives
# OOM_KILLER_RUNNING and OOM_KILLS). The scenario shell is exempt.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
oom_kills() {
	awk '$1 == "oom_kill" { print $2 }' /proc/vmstat
}
echo "SCENARIO oom: started children=${BD_CHILDREN:-6} mb=${BD_MB:-160} seconds=${BD_SECONDS:-20} oom_kill=$(oom_kills)"
bd_as "$BD_USER1" memhog --children "${BD_CHILDREN:-6}" --mb "${BD_MB:-160}" \
	--seconds "${BD_SECONDS:-20}"
rc=$?
bd_kill_uid "$BD_USER1" || echo "SCENARIO oom: user1 processes survived"
echo "SCENARIO oom: over rc=$rc oom_kill=$(oom_kills) processes=$(bd_nprocs)"
