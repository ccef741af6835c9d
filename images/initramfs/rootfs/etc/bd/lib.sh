# shellcheck shell=sh
# /etc/bd/lib.sh: helpers for scenario scripts. Source it:  . /etc/bd/lib.sh
#
# Scenarios run as root under busybox sh, with every bd.KEY=VALUE from the
# kernel command line in the environment as BD_KEY=VALUE.
# Users: root (0), user1 (1000, runs the faults), user2 (1001, runs the
# useful work), nobody (65534).

BD_USER1=1000
BD_USER2=1001

# The scenario shell must survive the faults it starts: a fork bomb can run
# the guest out of memory, and the OOM killer likes busybox sh. Sourcing this
# file exempts the shell (and what it starts directly) from the OOM killer;
# bd_as gives the programs it starts the normal score again.
echo -1000 >/proc/$$/oom_score_adj 2>/dev/null || true

# bd_exec_as [--nproc N] UID CMD ARGS...: replace the current (sub)shell
# with CMD running as user UID (group UID), OOM-killable; with --nproc,
# RLIMIT_NPROC (soft and hard) is N, so once user UID has N processes its
# forks fail with EAGAIN. Only call it in a subshell: it never returns.
bd_exec_as() {
	bd_nproc=""
	if [ "$1" = --nproc ]; then
		bd_nproc=$2
		shift 2
	fi
	bd_uid=$1
	shift
	echo 0 >/proc/self/oom_score_adj 2>/dev/null
	# shellcheck disable=SC2086 # optional single-word arguments
	exec runas ${bd_nproc:+--nproc "$bd_nproc"} "$bd_uid" "$bd_uid" "$@"
}

# bd_as [--nproc N] UID CMD ARGS...: run CMD as user UID (group UID),
# OOM-killable (see bd_exec_as for --nproc); returns CMD's exit status.
bd_as() {
	(bd_exec_as "$@")
}

# bd_as_bg [--nproc N] UID CMD ARGS...: bd_as in the background; sets bd_pid
# to the pid of CMD itself (the subshell execs runas, which execs CMD: one
# pid throughout, no shell in between), so `wait "$bd_pid"` gives CMD's
# exit status.
bd_as_bg() {
	(bd_exec_as "$@") &
	# shellcheck disable=SC2034 # read by the calling scenario
	bd_pid=$!
}

# bd_field LINE KEY: print the value of KEY=value in LINE (a program's
# output line); prints nothing and returns 1 if LINE has no such field.
bd_field() {
	bd_val=$(echo " $1" | sed -n "s/.*[[:space:]]$2=\([^[:space:]]*\).*/\1/p")
	[ -n "$bd_val" ] || return 1
	echo "$bd_val"
}

# bd_alive PID: true while process PID exists and is not a zombie.
bd_alive() {
	bd_stat=""
	[ -r "/proc/$1/stat" ] || return 1
	read -r bd_stat 2>/dev/null <"/proc/$1/stat" || return 1
	bd_stat=${bd_stat##*) } # "pid (comm) S ...": the state follows the comm
	[ -n "$bd_stat" ] && [ "${bd_stat%% *}" != Z ]
}

# bd_nprocs: number of processes (threads groups) in the guest.
bd_nprocs() {
	n=0
	for d in /proc/[0-9]*; do
		[ -d "$d" ] && n=$((n + 1))
	done
	echo "$n"
}

# bd_nprocs_uid UID: number of processes whose real uid is UID.
bd_nprocs_uid() {
	n=0
	for s in /proc/[0-9]*/status; do
		while read -r k v _; do
			if [ "$k" = "Uid:" ]; then
				[ "$v" = "$1" ] && n=$((n + 1))
				break
			fi
		done <"$s" 2>/dev/null
	done
	echo "$n"
}

# bd_wait_lines FILE PATTERN COUNT TIMEOUT_S: wait until FILE has at least
# COUNT lines matching the grep PATTERN. Returns 1 on timeout.
bd_wait_lines() {
	bd_polls=$(($4 * 5))
	while [ "$bd_polls" -gt 0 ]; do
		if [ -f "$1" ] && [ "$(grep -c -- "$2" "$1" 2>/dev/null)" -ge "$3" ]; then
			return 0
		fi
		sleep 0.2
		bd_polls=$((bd_polls - 1))
	done
	return 1
}

# bd_hold: keep the scenario alive for BD_SECONDS seconds, or forever.
bd_hold() {
	if [ -n "${BD_SECONDS:-}" ]; then
		sleep "$BD_SECONDS"
	else
		while :; do sleep 3600; done
	fi
}

# bd_kill_uid UID: SIGKILL every process of user UID, repeating until none
# is left (a fork bomb keeps forking while it is being killed). Runs
# `kill -9 -1` as that user, which signals exactly that user's processes.
bd_kill_uid() {
	bd_tries=50
	while [ "$bd_tries" -gt 0 ] && [ "$(bd_nprocs_uid "$1")" -gt 0 ]; do
		runas "$1" "$1" kill -9 -1 2>/dev/null
		sleep 0.1
		bd_tries=$((bd_tries - 1))
	done
	[ "$(bd_nprocs_uid "$1")" -eq 0 ]
}

# bd_fault_scenario NAME FAULT-CMD ARGS...
# The shape of the fault scenarios: `useful` runs as user2 for
# BD_ITERATIONS (default 20) iterations; after BD_BASELINE (default 3)
# iterations the fault command starts as user1; the scenario ends when
# useful ends. With BD_SECONDS set (the fault command must then stop by
# itself), it also waits for the fault command and removes what is left of
# user1's processes. With BD_NPROC set, the fault runs under RLIMIT_NPROC =
# BD_NPROC (the per-user process limit an operator would set instead of a
# healer). Returns useful's exit status.
bd_fault_scenario() {
	bd_name=$1
	shift
	bd_log=/tmp/useful.log
	rm -f "$bd_log"
	# shellcheck disable=SC2086 # BD_WORK is one number or empty
	bd_as "$BD_USER2" useful --iterations "${BD_ITERATIONS:-20}" \
		${BD_WORK:+--work "$BD_WORK"} --log "$bd_log" &
	bd_useful_pid=$!
	if ! bd_wait_lines "$bd_log" '^USEFUL iter=' "${BD_BASELINE:-3}" 3600; then
		echo "SCENARIO $bd_name: no baseline from useful; starting the fault anyway"
	fi
	echo "SCENARIO $bd_name: fault starts processes=$(bd_nprocs)"
	# shellcheck disable=SC2086 # optional single-word arguments
	bd_as ${BD_NPROC:+--nproc "$BD_NPROC"} "$BD_USER1" "$@" &
	bd_fault_pid=$!
	wait "$bd_useful_pid"
	bd_rc=$?
	echo "SCENARIO $bd_name: useful finished rc=$bd_rc"
	if [ -n "${BD_SECONDS:-}" ]; then
		wait "$bd_fault_pid"
		bd_kill_uid "$BD_USER1" || echo "SCENARIO $bd_name: user1 processes survived"
		echo "SCENARIO $bd_name: fault over processes=$(bd_nprocs)"
	fi
	return "$bd_rc"
}
