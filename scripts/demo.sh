#!/usr/bin/env bash
# make demo: a guest under bdvmm (tcg engine here; kvm where the CPU has vmx/svm) runs `useful`
# as user2 while a CPU-bound fork bomb, started as user1, cripples it for a bounded time.
# Watch the USEFUL lines: iteration times jump while the bomb runs, then recover when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
env_file=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}/images.env
[ -f "$env_file" ] || { echo "demo: $env_file missing; run images/build.sh" >&2; exit 1; }
# shellcheck source=/dev/null
. "$env_file"
seconds=${DEMO_SECONDS:-8}
echo "demo: booting the patched kernel; fork bomb for ${seconds}s (engine: ${DEMO_ENGINE:-auto})" >&2
exec target/release/bdvmm run \
	--kernel "$BD_KERNEL_BZIMAGE" --initrd "$BD_INITRAMFS" --mem 512 --vcpus 1 \
	--engine "${DEMO_ENGINE:-auto}" \
	--cmdline "console=ttyS0 reboot=k panic=-1 quiet bd.scenario=forkbomb bd.seconds=${seconds} bd.iterations=30"
