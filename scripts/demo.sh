#!/usr/bin/env bash
# make demo: remote healing as it happens.
#
# A guest under bdvmm (tcg engine here; kvm where the CPU has vmx/svm) runs `useful` as user2;
# after three iterations a CPU-bound fork bomb starts as user1. rdma-bridge serves the guest's
# memory and pause lock over mutual TLS; bdmon, attached through it, samples the Sensor Box every
# 10 ms, detects the bomb, takes the lock, finds the culprit, posts SIGKILL through the repair
# hooks and lets the guest run on. Watch the USEFUL lines (guest) and the bdmon lines (monitor):
# iteration times jump when the bomb starts and are back at their baseline right after the repair.
#
# The bomb is bounded (DEMO_SECONDS, default 30) so that the demo ends even if healing failed.
set -euo pipefail
cd "$(dirname "$0")/.."
env_file=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}/images.env
[ -f "$env_file" ] || { echo "demo: $env_file missing; run images/build.sh" >&2; exit 1; }
# shellcheck source=/dev/null
. "$env_file"
bin=target/release
for b in bdvmm rdma-bridge bdmon; do
	[ -x "$bin/$b" ] || { echo "demo: $bin/$b missing; run make release" >&2; exit 1; }
done
seconds=${DEMO_SECONDS:-30}
work=$(mktemp -d /tmp/backdoors-demo.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

say() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }

say "booting the patched kernel under bdvmm (engine: ${DEMO_ENGINE:-auto})"
"$bin/bdvmm" run --kernel "$BD_KERNEL_BZIMAGE" --initrd "$BD_INITRAMFS" --mem 512 --vcpus 1 \
	--engine "${DEMO_ENGINE:-auto}" --api "$work/vm.sock" \
	--cmdline "console=ttyS0 reboot=k panic=-1 quiet bd.halt=wait bd.scenario=forkbomb bd.seconds=${seconds} bd.iterations=40" \
	>"$work/console.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/vm.sock" ] && break; sleep 0.1; done

say "keys for the bridge and one monitor (mutual TLS)"
"$bin/rdma-bridge" pki init --dir "$work/pki" >/dev/null
"$bin/rdma-bridge" pki issue --dir "$work/pki" --name mon1 >/dev/null
cat >"$work/bridge.toml" <<EOF
listen = "127.0.0.1:0"
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
EOF
"$bin/rdma-bridge" serve --config "$work/bridge.toml" --api "$work/vm.sock" >"$work/bridge.log" 2>&1 &
pids+=($!)
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
tail -n +1 -f "$work/console.log" | grep --line-buffered -E '^(USEFUL|SCENARIO|FORKBOMB)' |
	sed -u 's/^/  guest | /' &
pids+=($!)
tail -n +1 -f "$work/events.jsonl" | python3 -u -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    keep = {k: v for k, v in e.items() if k not in ("ts_ms", "guest", "event")}
    print("  bdmon | %-10s %s" % (e["event"], json.dumps(keep, separators=(",", ":"))), flush=True)
' &
pids+=($!)

for _ in $(seq $((seconds * 10 + 600))); do
	grep -q "useful finished" "$work/console.log" && break
	sleep 0.1
done
sleep 1
say "bdmon status:"
"$bin/bdmon" status --config "$work/bdmon.toml" || true
if grep -q '"event":"healed"' "$work/events.jsonl"; then
	say "healed: $(grep -c '"event":"repair"' "$work/events.jsonl") repair(s); useful finished at its baseline pace"
else
	say "no healing seen; the bomb ended by its own ${seconds}s bound"
fi
