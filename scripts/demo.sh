#!/usr/bin/env bash
# make demo: remote healing as it happens.
#
# Twice, the same guest and the same bomb: first without bdmon (the guest crawls until the bomb's
# own bound, DEMO_WITHOUT_SECONDS, default 15; 0 skips this part), then with it. A guest under
# bdvmm (tcg engine here; kvm where the CPU has vmx/svm) runs `useful` as user2; after three
# iterations a CPU-bound fork bomb starts as user1. rdma-bridge serves the guest's
# memory and pause lock over mutual TLS; bdmon, attached through it, samples the Sensor Box every
# 10 ms, detects the bomb, takes the lock, finds the culprit, posts SIGKILL through the repair
# hooks and lets the guest run on. Watch the USEFUL lines (guest) and the bdmon lines (monitor):
# iteration times jump when the bomb starts and are back at their baseline right after the repair.
#
# The bomb is bounded (DEMO_SECONDS, default 30) so that the demo ends even if healing failed.
# The demo ends with a summary table of both runs and exits 0 when bdmon healed the guest, 1 when
# it did not. IMAGES_ENV names the images' env file (default: the cache's images.env), DEMO_BIN_DIR
# the release binaries (default: target/release).
#
# DEMO_ENGINE (make demo ENGINE=...): auto (default), tcg or kvm. With kvm on a host whose CPU has
# no vmx/svm (this project's development machines: nested PVM), the demo first boots a kvm host
# (bd-kvmhost: a QEMU-TCG VM with emulated AMD-V) and runs bdvmm and rdma-bridge inside it; bdmon
# stays here, outside, and reaches the bridge over a tap device, as a remote monitor would.
set -euo pipefail
cd "$(dirname "$0")/.."
env_file=${IMAGES_ENV:-${BACKDOORS_CACHE:-$HOME/.cache/backdoors}/images.env}
[ -f "$env_file" ] || { echo "demo: $env_file missing; run images/build.sh" >&2; exit 1; }
# shellcheck source=/dev/null
. "$env_file"
bin=${DEMO_BIN_DIR:-target/release}
engine=${DEMO_ENGINE:-auto}
case "$engine" in
auto | tcg | kvm) ;;
*) echo "demo: DEMO_ENGINE (ENGINE) must be auto, tcg or kvm, not '$engine'" >&2; exit 2 ;;
esac
kvm_host=no
if [ "$engine" = kvm ] && ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
	kvm_host=yes
fi
need=(bdvmm rdma-bridge bdmon)
[ "$kvm_host" = yes ] && need+=(bd-kvmhost)
for b in "${need[@]}"; do
	[ -x "$bin/$b" ] || { echo "demo: $bin/$b missing; run make release" >&2; exit 1; }
done
seconds=${DEMO_SECONDS:-30}
work=$(mktemp -d /tmp/backdoors-demo.XXXXXX)
pids=()
# Follows of log files end when this sleeper does (tail --pid), so cleanup never waits on them.
sleep infinity &
watch_pid=$!
kvmhost_pid=
cleanup() {
	kill "$watch_pid" 2>/dev/null || true
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	# The kvm host goes last, once nothing runs in it any more.
	if [ -n "$kvmhost_pid" ]; then
		kill "$kvmhost_pid" 2>/dev/null || true
	fi
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

say() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }

# inside CMD...: run CMD where bdvmm runs (here, or in the kvm host).
inside() {
	if [ "$kvm_host" = yes ]; then
		"$bin/bd-kvmhost" exec --agent "$agent" -- "$@"
	else
		"$@"
	fi
}

# inside_bg LOG CMD...: the same in the background, output to LOG; its pid joins $pids (it is the
# command itself, or the bd-kvmhost exec that ends the command inside when it is killed).
inside_bg() {
	local log=$1
	shift
	if [ "$kvm_host" = yes ]; then
		"$bin/bd-kvmhost" exec --agent "$agent" -- "$@" >"$log" 2>&1 &
	else
		"$@" >"$log" 2>&1 &
	fi
	pids+=($!)
}

if [ "$kvm_host" = yes ]; then
	say "this CPU has no vmx/svm: booting a kvm host (QEMU TCG, emulated AMD-V) for the kvm engine"
	"$bin/bd-kvmhost" up >"$work/kvmhost.out" 2>"$work/kvmhost.log" &
	kvmhost_pid=$!
	for _ in $(seq 1800); do
		grep -q '^bd-kvmhost: ready' "$work/kvmhost.out" && break
		kill -0 "$kvmhost_pid" 2>/dev/null || break
		sleep 0.1
	done
	line=$(grep '^bd-kvmhost: ready' "$work/kvmhost.out") || {
		cat "$work/kvmhost.log" >&2
		exit 1
	}
	agent=${line##*agent=}
	target_ip=${line#*ip=}
	target_ip=${target_ip%% *}
	say "kvm host up at $target_ip; bdvmm (kvm engine) and rdma-bridge run there, bdmon here"
	run_dir=/tmp/demo
	kernel=/opt/bd/images/bzImage
	initrd=/opt/bd/images/initramfs.cpio.gz
	vm_bin=/opt/bd/bin
else
	target_ip=127.0.0.1
	run_dir=$work
	kernel=$BD_KERNEL_BZIMAGE
	initrd=$BD_INITRAMFS
	vm_bin=$bin
fi

# boot_guest NAME BOMB_SECONDS: boot the patched kernel under bdvmm with the demo's scenario
# (useful as user2, then the fork bomb as user1, bounded to BOMB_SECONDS); its console goes to
# $work/NAME.console, its API socket is $run_dir/NAME.sock; sets vm_pid.
boot_guest() {
	local name=$1 bomb_seconds=$2
	inside_bg "$work/$name.console" "$vm_bin/bdvmm" run --kernel "$kernel" --initrd "$initrd" \
		--mem 512 --vcpus 1 --engine "$engine" --api "$run_dir/$name.sock" \
		--cmdline "console=ttyS0 reboot=k panic=-1 quiet bd.halt=wait bd.scenario=forkbomb bd.seconds=${bomb_seconds} bd.iterations=${iterations}"
	vm_pid=${pids[-1]}
	for _ in $(seq 100); do inside test -S "$run_dir/$name.sock" && break; sleep 0.1; done
	inside test -S "$run_dir/$name.sock" || {
		cat "$work/$name.console" >&2
		exit 1
	}
}

# follow_guest NAME: print the guest's USEFUL/SCENARIO/FORKBOMB lines as they come, until the
# demo ends.
follow_guest() {
	tail --pid="$watch_pid" -n +1 -f "$work/$1.console" |
		grep --line-buffered -E '^(USEFUL|SCENARIO|FORKBOMB)' | sed -u 's/^/  guest | /' &
	pids+=($!)
}

# wait_useful NAME SECONDS: wait (bounded) until useful has finished in guest NAME.
wait_useful() {
	for _ in $(seq $(($2 * 10))); do
		grep -q "useful finished" "$work/$1.console" && return 0
		sleep 0.1
	done
	return 1
}

# summarize NAME: one line of the summary table from guest NAME's console: useful's baseline (the
# median of its iterations before the bomb), its worst iteration after the bomb started, and how
# long its remaining iterations took (the sum of their own times).
summarize() {
	python3 - "$work/$1.console" "$iterations" <<'PY'
import re, statistics, sys
path, total = sys.argv[1], int(sys.argv[2])
before, after, started = [], [], False
for line in open(path, errors="replace"):
    if line.startswith("SCENARIO") and "fault starts" in line:
        started = True
    m = re.match(r"USEFUL iter=\d+ wall_us=(\d+)", line)
    if m:
        (after if started else before).append(int(m.group(1)) / 1e6)
base = statistics.median(before) if before else float("nan")
left = total - len(before)
worst = max(after) if after else float("nan")
if len(after) < left:
    took = "%d of %d iterations" % (len(after), left)
else:
    took = "%.1f s (%.1f at baseline)" % (sum(after), left * base)
print("%8.0f ms %10.0f ms  %-26s" % (base * 1000, worst * 1000, took))
PY
}

inside mkdir -p "$run_dir"
iterations=40
bomb_seconds_without=${DEMO_WITHOUT_SECONDS:-15}
if [ "$bomb_seconds_without" != 0 ]; then
	say "1/2: the fork bomb WITHOUT bdmon (bounded to ${bomb_seconds_without}s by the bomb itself)"
	boot_guest without "$bomb_seconds_without"
	follow_guest without
	# The bomb ends by its own bound; useful then finishes its remaining iterations.
	wait_useful without $((bomb_seconds_without + 300)) || say "useful did not finish; stopping this guest"
	kill "$vm_pid" 2>/dev/null || true
	wait "$vm_pid" 2>/dev/null || true
	say "without bdmon, useful crawled while the bomb ran; now the same guest and bomb with bdmon"
fi

say "2/2: the fork bomb WITH bdmon: booting the patched kernel under bdvmm (engine: $engine)"
boot_guest with "$seconds"
say "keys for the bridge and one monitor (mutual TLS)"
"$bin/rdma-bridge" pki init --dir "$work/pki" >/dev/null
"$bin/rdma-bridge" pki issue --dir "$work/pki" --name mon1 >/dev/null
port=0
[ "$kvm_host" = yes ] && port=7070
cat >"$work/bridge.toml" <<EOF
listen = "$target_ip:$port"
audit_log = "audit.jsonl"
[tls]
ca = "pki/ca.pem"
cert = "pki/bridge.pem"
key = "pki/bridge.key"
[[monitor]]
name = "mon1"
cert = "pki/mon1.pem"
read = ["sb", "ram"]
write = ["hooks"]
lock = true
regs = true
EOF
if [ "$kvm_host" = yes ]; then
	tar -C "$work" -cf - pki bridge.toml |
		"$bin/bd-kvmhost" exec --stdin --agent "$agent" -- sh -c "mkdir -p $run_dir && tar -xf - -C $run_dir"
fi
inside_bg "$work/bridge.log" "$vm_bin/rdma-bridge" serve --config "$run_dir/bridge.toml" \
	--api "$run_dir/with.sock"
addr=
for _ in $(seq 100); do
	addr=$(sed -n 's/^rdma-bridge: listening on //p' "$work/bridge.log")
	[ -n "$addr" ] && break
	sleep 0.1
done
[ -n "$addr" ] || { cat "$work/bridge.log" >&2; exit 1; }
say "bridge listening on $addr"

cat >"$work/bdmon.toml" <<EOF
sample_ms = 10
events = "events.jsonl"
spare_users = [1001]
[[guest]]
name = "demo-vm"
bridge = "$addr"
pki = "pki"
monitor = "mon1"
[guest.thresholds]
NPROCS = 300
EOF
"$bin/bdmon" run --config "$work/bdmon.toml" >"$work/bdmon.log" 2>&1 &
pids+=($!)
touch "$work/events.jsonl"
say "bdmon attached, sampling every 10 ms; guest console and bdmon events follow"

# Interleave the guest's USEFUL/SCENARIO lines and bdmon's events as they happen.
follow_guest with
tail --pid="$watch_pid" -n +1 -f "$work/events.jsonl" | python3 -u -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    keep = {k: v for k, v in e.items() if k not in ("ts_ms", "guest", "event")}
    print("  bdmon | %-10s %s" % (e["event"], json.dumps(keep, separators=(",", ":"))), flush=True)
' &
pids+=($!)

wait_useful with $((seconds + 60)) || true
sleep 1
say "bdmon status:"
"$bin/bdmon" status --config "$work/bdmon.toml" || true
repairs=$(grep -c '"event":"repair"' "$work/events.jsonl" || true)
healed=no
grep -q '"event":"healed"' "$work/events.jsonl" && healed=yes
say "summary: useful (user2) next to a CPU fork bomb (user1), $iterations iterations"
printf '  %-14s %11s %13s  %-26s %s\n' "" baseline "worst iter" "iterations after the bomb" "healing"
if [ "$bomb_seconds_without" != 0 ]; then
	printf '  %-14s %s  %s\n' "without bdmon" "$(summarize without)" "none (the bomb ended by its own ${bomb_seconds_without}s bound)"
fi
if [ "$healed" = yes ]; then
	healing="$repairs repair(s) by bdmon"
else
	healing="none seen (the bomb ended by its own ${seconds}s bound)"
fi
printf '  %-14s %s  %s\n' "with bdmon" "$(summarize with)" "$healing"
say "baseline: useful's median iteration before the bomb; worst iter: its slowest once the bomb started; then the time its remaining iterations took (and would take at baseline)"
if [ "$healed" = yes ]; then
	say "healed: useful finished at its baseline pace"
else
	say "no healing seen"
	exit 1
fi
