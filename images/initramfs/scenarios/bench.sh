#!/bin/sh
# Scenario bench: `bdbench` (fork, pipe and page-fault microbenchmarks) as
# root, its lines between markers. BD_BENCH picks one (fork|pipe|fault|all,
# default all); BD_ITERATIONS and BD_ROUNDS override bdbench's defaults.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
echo "BACKDOORS: bench begin"
# shellcheck disable=SC2086 # optional single-word arguments
bdbench "${BD_BENCH:-all}" ${BD_ITERATIONS:+--iterations "$BD_ITERATIONS"} \
	${BD_ROUNDS:+--rounds "$BD_ROUNDS"}
rc=$?
echo "BACKDOORS: bench end"
[ "$rc" -eq 0 ] || echo "SCENARIO bench: bdbench failed rc=$rc"
exit "$rc"
