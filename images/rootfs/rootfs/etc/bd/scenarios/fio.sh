#!/bin/sh
# Scenario fio (root filesystem image only): a fixed fio benchmark on a spare disk, for the
# device benchmarks (tests/benches/devices.rs). Every job uses O_DIRECT and libaio on the whole
# disk, runs bd.fio_seconds seconds (default 5) and prints one line, from fio's JSON report
# parsed with jq:
#   FIO <job> MBps=<MB/s> iops=<n> lat_p50_us=<µs> lat_p99_us=<µs>
# (MB = 10^6 bytes; the latencies are fio's total latencies, lat: submission plus completion,
# because a VMM may do the whole I/O while the guest's submission traps, and then the completion
# latency alone would show only the interrupt). The jobs, in order:
#   seqread    sequential read,   1 MiB blocks, 8 in flight
#   seqwrite   sequential write,  1 MiB blocks, 8 in flight
#   randread   random read,       4 KiB blocks, 32 in flight
#   randread1  random read,       4 KiB blocks, 1 in flight (latency)
# then "FIO done jobs=4". Any failure prints "FIO error: <why>" and ends the scenario.
# The disk is bd.fio_disk (default vdb); its contents are overwritten, so a disk that holds
# the root file system or is mounted is refused.
disk=${BD_FIO_DISK:-vdb}
secs=${BD_FIO_SECONDS:-5}
dev=/dev/$disk

fail() {
	echo "FIO error: $*"
	exit 1
}

case "$disk" in
"" | *[!a-z0-9]*) fail "bad bd.fio_disk=$disk (a disk name such as vdb)" ;;
esac
case "$secs" in
"" | *[!0-9]* | 0) fail "bad bd.fio_seconds=$secs (whole seconds, at least 1)" ;;
esac
[ -b "$dev" ] || fail "no block device $dev (have: $(cd /sys/block && echo *))"
command -v fio >/dev/null || fail "no fio in the image"
command -v jq >/dev/null || fail "no jq in the image"
# The root file system's device (MAJ:MIN) and every mounted one, from mountinfo.
majmin=$(cat "/sys/block/$disk/dev")
if awk -v d="$majmin" '$3 == d { found = 1 } END { exit !found }' /proc/self/mountinfo; then
	fail "$dev ($majmin) is mounted (the root file system?); give a spare disk with bd.fio_disk="
fi

run_job() { # name rw bs iodepth section(read|write)
	if ! out=$(fio --name="$1" --filename="$dev" --direct=1 --ioengine=libaio \
		--rw="$2" --bs="$3" --iodepth="$4" --time_based --runtime="$secs" \
		--lat_percentiles=1 --output-format=json 2>&1); then
		fail "fio $1 failed: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
	fi
	line=$(echo "$out" | jq -r --arg s "$5" '
		.jobs[0] as $j
		| if $j.error != 0 then "error=\($j.error)" else
			$j[$s] | "MBps=\((.bw_bytes / 10000 | round) / 100) iops=\(.iops | round)"
			+ " lat_p50_us=\((.lat_ns.percentile["50.000000"] // 0) / 1000 | round)"
			+ " lat_p99_us=\((.lat_ns.percentile["99.000000"] // 0) / 1000 | round)"
		end' 2>&1) || fail "cannot parse fio's report of $1: $line"
	case "$line" in
	MBps=*) echo "FIO $1 $line" ;;
	*) fail "fio $1: $line" ;;
	esac
}

echo "FIO start disk=$disk size=$(cat "/sys/block/$disk/size") seconds=$secs"
run_job seqread read 1M 8 read
run_job seqwrite write 1M 8 write
run_job randread randread 4k 32 read
run_job randread1 randread 4k 1 read
echo "FIO done jobs=4"
