#!/bin/sh
# Scenario hello: prove the guest boots; print kernel release and process count.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
echo "HELLO from $(uname -r) processes=$(bd_nprocs)"
echo "HELLO cpus=$(nproc) mem_total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo) uid=$(id -u)"
# Where the kernel image sits in guest-physical memory (KASLR moves it), so a host can find
# kernel symbols in RAM: "HELLO iomem <start>-<end> Kernel code".
grep -E 'Kernel (code|data|bss)' /proc/iomem | while read -r range _ kind what; do
	echo "HELLO iomem $range $kind $what"
done
