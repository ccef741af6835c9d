#!/bin/sh
# Scenario attack (root filesystem image only): an intruder (user1) attacks on request. A client
# outside asks through the guest's own redis: it sets the key bd:attack to "<n>:<kind>" (a new
# <n> each time; kind cpu or io = a fork bomb of that mode, mem = a self-respawning memory hog of
# BD_CHILDREN x BD_MB MiB, default 30 x 8). The fault runs as user1 for at most BD_SECONDS
# (default 40) seconds or until something kills it; then whatever is left of user1 is removed
# and the scenario waits for the next request. Kind warm is no attack: user2 runs 300
# processes for a moment, then touches 60 % of the guest's RAM once and frees it
# (BD_WARM_SECONDS each, default 3), so that a baseline measured afterwards sees the kernel and
# the memory as they will be after an attack. Console lines:
#   ATTACK waiting
#   ATTACK <n> <kind> starts processes=<p>
#   ATTACK <n> <kind> over processes=<p>
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
last=""
while :; do
	echo "ATTACK waiting"
	while :; do
		req=$(redis-cli -h 127.0.0.1 get bd:attack 2>/dev/null)
		if [ -n "$req" ] && [ "$req" != "$last" ]; then
			break
		fi
		sleep 0.2
	done
	last=$req
	n=${req%%:*}
	kind=${req#*:}
	case "$kind" in
	cpu | io) set -- forkbomb --mode "$kind" ;;
	mem) set -- memhog --children "${BD_CHILDREN:-30}" --mb "${BD_MB:-8}" ;;
	warm)
		warm_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 6 / 10 / 1024 / 4))
		echo "ATTACK $n warm starts processes=$(bd_nprocs)"
		bd_as "$BD_USER2" forkbomb --mode cpu --max 300 --seconds "${BD_WARM_SECONDS:-3}"
		bd_kill_uid "$BD_USER2" || echo "ATTACK $n: user2 processes survived"
		bd_as "$BD_USER2" memhog --children 4 --mb "$warm_mb" --seconds "${BD_WARM_SECONDS:-3}"
		echo "ATTACK $n warm over processes=$(bd_nprocs)"
		continue
		;;
	*)
		echo "ATTACK $n $kind unknown"
		continue
		;;
	esac
	echo "ATTACK $n $kind starts processes=$(bd_nprocs)"
	bd_as "$BD_USER1" "$@" --seconds "${BD_SECONDS:-40}"
	bd_kill_uid "$BD_USER1" || echo "ATTACK $n: user1 processes survived"
	echo "ATTACK $n $kind over processes=$(bd_nprocs)"
done
