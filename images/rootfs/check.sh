#!/usr/bin/env bash
# Boot a root filesystem image of images/rootfs/build.sh under QEMU (TCG),
# from a virtio disk (virtio-blk-pci, root=/dev/vda rw), with a virtio NIC
# (virtio-net-pci) on QEMU's user network, and check that its services come
# up and that redis answers PING from this machine through a forwarded port.
#
# --kernel stock (default): the stock Debian kernel with its boot initramfs
# (images/bootinitrd/build.sh), which loads the virtio modules, mounts
# root= and switch_roots to the image's /sbin/init.
# --kernel patched: the patched guest kernel (images/kernel/build.sh), which
# has virtio-pci, virtio-blk, virtio-net and ext4 built in: no initramfs.
# The disk is opened with snapshot=on: the cached image is never written.
#
# Prints the console on stderr; exit 0 when "BACKDOORS: service up" came and
# redis answered +PONG, 1 otherwise. Not part of `make test`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
timeout_s=240
image=""
append=""
kernel=stock

log() { printf 'rootfs-check: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: images/rootfs/check.sh [--kernel stock|patched] [--image FILE] [--timeout SECONDS]
                              [--append 'KERNEL PARAMS']

Boots FILE (default: the image of images/rootfs/build.sh) from a virtio disk
under qemu-system-x86_64 -M pc -accel tcg, with the stock kernel and its boot
initramfs (default) or the patched kernel without an initramfs, and checks
that the services come up and redis answers on port 6379 (forwarded to a
local port).
EOF
}

while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--kernel)
		[ $# -ge 2 ] || die "--kernel needs stock or patched"
		case "$2" in
		stock | patched) kernel=$2 ;;
		*) die "bad --kernel '$2' (want stock or patched)" ;;
		esac
		shift 2
		;;
	--image)
		[ $# -ge 2 ] || die "--image needs a file"
		image=$2
		shift 2
		;;
	--timeout)
		[ $# -ge 2 ] || die "--timeout needs a number"
		case "$2" in
		"" | *[!0-9]*) die "bad --timeout '$2'" ;;
		esac
		timeout_s=$2
		shift 2
		;;
	--append)
		[ $# -ge 2 ] || die "--append needs a value"
		append=$2
		shift 2
		;;
	*)
		usage >&2
		exit 2
		;;
	esac
done

command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
if [ -z "$image" ]; then
	out=$(bash "$here/build.sh") || die "images/rootfs/build.sh failed"
	image=${out##*$'\n'}/rootfs.ext4
fi
[ -s "$image" ] || die "no image $image"
# last_line OUTPUT: the path a build script printed last.
last_line() { printf '%s\n' "${1##*$'\n'}"; }
initrd_args=()
if [ "$kernel" = stock ]; then
	out=$(bash "$here/../stock/fetch.sh") || die "images/stock/fetch.sh failed"
	kernel_file=$(last_line "$out")/vmlinuz
	out=$(bash "$here/../bootinitrd/build.sh") || die "images/bootinitrd/build.sh failed"
	initrd=$(last_line "$out")/initramfs.cpio.gz
	[ -s "$initrd" ] || die "no boot initramfs $initrd"
	initrd_args=(-initrd "$initrd")
else
	out=$(bash "$here/../kernel/build.sh") || die "images/kernel/build.sh failed"
	kernel_file=$(last_line "$out")/bzImage
fi
[ -s "$kernel_file" ] || die "no kernel $kernel_file"

tmp=$(mktemp -d)
qpid=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
	if [ -n "$qpid" ]; then
		kill "$qpid" 2>/dev/null || true
		wait "$qpid" 2>/dev/null || true
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT

port=$((20000 + $$ % 20000))
log "booting $image with the $kernel kernel (redis forwarded to 127.0.0.1:$port)"
qemu-system-x86_64 -M pc -accel tcg -cpu max -m 512M -smp 2 \
	-nodefaults -no-user-config -display none -serial stdio -monitor none -no-reboot \
	-kernel "$kernel_file" "${initrd_args[@]}" \
	-drive "file=$image,format=raw,if=none,id=d0,snapshot=on" -device virtio-blk-pci,drive=d0 \
	-netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:6379" -device virtio-net-pci,netdev=n0 \
	-append "console=ttyS0 panic=-1 quiet root=/dev/vda rw ip=10.0.2.15::10.0.2.2:255.255.255.0:bdguest:eth0:off $append" \
	</dev/null >"$tmp/console" 2>&1 &
qpid=$!

start=$SECONDS
result=""
while [ $((SECONDS - start)) -lt "$timeout_s" ]; do
	if grep -aq '^BACKDOORS: service up' "$tmp/console"; then
		result=up
		break
	fi
	if grep -aq -e '^BACKDOORS: service down' -e '^BOOTINITRD: error' -e 'Kernel panic' "$tmp/console"; then
		result=down
		break
	fi
	kill -0 "$qpid" 2>/dev/null || break
	sleep 1
done
up_after=$((SECONDS - start))
rc=1
if [ "$result" = up ]; then
	log "services up after ${up_after} s"
	reply=""
	if exec 3<>"/dev/tcp/127.0.0.1/$port"; then
		printf 'PING\r\n' >&3
		read -r -t 10 reply <&3 || true
		exec 3>&-
	fi
	if [ "${reply%$'\r'}" = "+PONG" ]; then
		log "redis on 127.0.0.1:$port answered +PONG"
		rc=0
	else
		log "redis did not answer PING (got '${reply%$'\r'}')"
	fi
else
	log "no 'BACKDOORS: service up' (${result:-timeout or QEMU exited} after ${up_after} s)"
fi
sleep 1
tr -d '\r' <"$tmp/console" | grep -av '^$' >&2 || true
exit "$rc"
