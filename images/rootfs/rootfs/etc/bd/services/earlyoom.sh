# shellcheck shell=sh disable=SC2034 # variables read by /sbin/init
# /etc/bd/services/earlyoom.sh: Debian's earlyoom, the userspace OOM killer users run today, as a
# baseline of the evaluation (make experiments, tests/benches/experiments.rs). Started by
# /sbin/init as root with Debian's defaults (it acts when available memory and free swap are both
# below 10 %; this guest has no swap) only when the kernel command line says bd.earlyoom=yes.
SERVICE_USER=root
SERVICE_EXEC="/usr/bin/earlyoom -r 0"
if [ "${BD_EARLYOOM:-}" != yes ]; then
	SERVICE_DISABLED=yes
fi
