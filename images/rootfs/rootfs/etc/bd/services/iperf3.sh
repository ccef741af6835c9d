# shellcheck shell=sh disable=SC2034 # variables read by /sbin/init
# /etc/bd/services/iperf3.sh: an iperf3 server (TCP and UDP port 5201) for the device
# benchmarks (tests/benches/devices.rs), started by /sbin/init as the user iperf3 (created by
# the Debian package) only when the kernel command line says bd.iperf3=yes: other guests of
# this image do not need it. The readiness check is a 1 KiB transfer over loopback.
SERVICE_USER=iperf3
SERVICE_EXEC="/usr/bin/iperf3 --server --port 5201"
SERVICE_READY="/usr/bin/iperf3 --client 127.0.0.1 --port 5201 --bytes 1K"
SERVICE_READY_SECONDS=30
if [ "${BD_IPERF3:-}" != yes ]; then
	SERVICE_DISABLED=yes
fi
