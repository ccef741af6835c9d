#!/bin/sh
# Scenario hang: after BD_AFTER seconds (default 0), a SCHED_FIFO 99 spinner
# (rtspin, as root) takes the only vCPU: the guest is hung although its vCPU
# runs. BD_SECONDS bounds the spin; without it the guest never recovers.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
sleep "${BD_AFTER:-0}"
echo "SCENARIO hang: spinning"
# shellcheck disable=SC2086 # optional single-word arguments
rtspin ${BD_SECONDS:+--seconds "$BD_SECONDS"}
echo "SCENARIO hang: over rc=$?"
