#!/usr/bin/env bash
# Installs the Debian packages the project needs on a fresh machine (run as root; a no-op when
# everything is present). The guest-image scripts install their own build dependencies too.
set -euo pipefail

pkgs=(
	qemu-system-x86      # the tcg engine
	busybox-static       # the initramfs userland
	linux-source-6.1     # the guest kernel source
	bc bison flex libelf-dev libssl-dev dwarves cpio xz-utils zstd kmod rsync
	gcc make git python3 iproute2 # iproute2 also gives the SoftRoCE VM `ip` and `rdma`
	python3-ply python3-git # checkpatch's SPDX check (guest-kernel-patches/check.sh)
	cmake pkg-config libibverbs-dev libnl-3-dev libnl-route-3-dev libclang-dev # rdma-bridge's verbs feature
	libibverbs1 ibverbs-providers # the SoftRoCE VM: libibverbs and its rxe provider (images/rxe/)
	mmdebstrap e2fsprogs libc6-dev # the Debian root filesystem image (images/rootfs/, as root)
	redis-tools # redis-benchmark and redis-cli: the load generator runs outside the guest
	postgresql binutils # the auction service's database tier (tests start their own cluster); strip
	python3-matplotlib # the figures (scripts/plot_failover.py, scripts/plot_experiments.py)
	tmux # the terminal bdmon top is tested in (tests/tests/bdmon.rs)
	etcd-server # the fleet coordination store (fleet/: guests and monitors meet in etcd; its tests run /usr/bin/etcd)
	etcd-client # etcdctl, to look at the fleet keys by hand
	protobuf-compiler # protoc: the etcd-client crate (fleet/) generates its gRPC code at build time
)
# cargo-nextest runs the test suite (one process per test, per-test retries: .config/nextest.toml).
if ! cargo nextest --version >/dev/null 2>&1; then
	echo "install-deps: installing cargo-nextest" >&2
	cargo install cargo-nextest --locked >&2
fi
missing=()
for p in "${pkgs[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "install-deps: missing Debian packages: ${missing[*]}; run as root or install them" >&2
	exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
