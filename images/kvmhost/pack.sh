#!/usr/bin/env bash
# Make the per-run initrd of a kvm host: the cached base image
# (images/kvmhost/build.sh, BD_KVMHOST_INITRD in images.env) followed by an
# uncompressed cpio (newc) archive with
#   /opt/bd/bin/<name>             each BINARY, debug info stripped
#   <the libraries they need>      at the absolute paths ldd names (with the
#                                  dynamic loader), so they run unmodified
#   /opt/bd/images/bzImage         BD_KERNEL_BZIMAGE
#   /opt/bd/images/stock-vmlinuz   BD_STOCK_VMLINUZ
#   /opt/bd/images/stock612-vmlinuz  BD_STOCK612_VMLINUZ
#   /opt/bd/images/initramfs.cpio.gz  BD_INITRAMFS
#   /opt/bd/images/stock-boot-initrd.cpio.gz  BD_STOCK_BOOT_INITRD
#   /opt/bd/images.env             those five keys with the inside paths
# and, with --qemu (the device benchmarks compare bdvmm with QEMU -accel kvm
# inside the kvm host; normal runs stay small without it),
#   /opt/bd/bin/qemu-system-x86_64 this machine's QEMU, with its libraries
#   /opt/bd/share/qemu/<file>      the firmware it needs for -M microvm and
#                                  -M pc (use -L /opt/bd/share/qemu)
# The Debian root filesystem image (BD_ROOTFS_IMAGE, 1 GiB) is not packed: an
# initrd lives in RAM. Give it to the kvm host as a disk instead.
# Linux unpacks concatenated archives, each compressed or not, into one
# rootfs. Not cached: it runs for every test run and takes about a second.
# Progress goes to stderr; the LAST stdout line is the output file.
set -euo pipefail

cache=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}

log() { printf 'kvmhost-pack: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
# shellcheck source=images/lib/stage.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/stage.sh"

usage() {
	cat <<EOF
Usage: images/kvmhost/pack.sh --out FILE [--images-env FILE] [--qemu] BINARY...

Writes FILE: the kvm host's base initramfs with BINARY... (at
/opt/bd/bin/<name>, debug info stripped), the shared libraries they need and
the guest images (bzImage, stock-vmlinuz, stock612-vmlinuz, initramfs.cpio.gz,
stock-boot-initrd.cpio.gz under /opt/bd/images/, listed in /opt/bd/images.env)
appended. Boot it as the
-initrd of BD_KVMHOST_KERNEL. Prints FILE as the last stdout line.

  --out FILE         the initrd to write (replaced atomically)
  --images-env FILE  default: \$BACKDOORS_CACHE/images.env (now: $cache/images.env)
  --qemu             also qemu-system-x86_64 (from PATH) with its libraries and
                     firmware (-L /opt/bd/share/qemu inside): about 25 MB more
EOF
}

out=""
env_file=$cache/images.env
bins=()
with_qemu=no
while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--out | --images-env)
		if [ $# -lt 2 ] || [ -z "$2" ]; then
			log "$1 needs a value"
			usage >&2
			exit 2
		fi
		if [ "$1" = --out ]; then out=$2; else env_file=$2; fi
		shift 2
		;;
	--qemu)
		with_qemu=yes
		shift
		;;
	--)
		shift
		bins+=("$@")
		break
		;;
	-*)
		log "unknown option $1"
		usage >&2
		exit 2
		;;
	*)
		bins+=("$1")
		shift
		;;
	esac
done
if [ -z "$out" ] || [ ${#bins[@]} -eq 0 ]; then
	usage >&2
	exit 2
fi

for tool in cpio ldd objcopy readlink; do
	command -v "$tool" >/dev/null || die "$tool not found (Debian packages: cpio libc-bin binutils coreutils)"
done

# env_get KEY: the value of KEY=... in the images.env file.
env_get() {
	sed -n "s/^$1=//p" "$env_file" | tail -n1
}

[ -f "$env_file" ] || die "no $env_file; run images/build.sh"
base=$(env_get BD_KVMHOST_INITRD)
[ -n "$base" ] || die "$env_file has no BD_KVMHOST_INITRD; run images/build.sh"
[ -s "$base" ] || die "base image $base does not exist; run images/build.sh"

# Inside name, images.env key.
images=(
	"bzImage BD_KERNEL_BZIMAGE"
	"stock-vmlinuz BD_STOCK_VMLINUZ"
	"stock612-vmlinuz BD_STOCK612_VMLINUZ"
	"initramfs.cpio.gz BD_INITRAMFS"
	"stock-boot-initrd.cpio.gz BD_STOCK_BOOT_INITRD"
)

out_dir=$(dirname "$out")
mkdir -p "$out_dir"
stage=$(mktemp -d "$out_dir/.pack.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/opt/bd/images"

# QEMU's firmware for -M microvm (bios-microvm.bin, linuxboot_dma.bin to load
# -kernel through fw_cfg) and -M pc; the files it may look for are staged when
# this machine has them, the first two are required.
qemu_firmware=(bios-microvm.bin linuxboot_dma.bin qboot.rom linuxboot.bin pvh.bin
	kvmvapic.bin multiboot_dma.bin bios-256k.bin)
if [ "$with_qemu" = yes ]; then
	qemu=$(command -v qemu-system-x86_64) ||
		die "--qemu: no qemu-system-x86_64 on PATH (Debian package qemu-system-x86)"
	bins+=("$qemu")
	for fw in "${qemu_firmware[@]}"; do
		src=""
		for d in /usr/share/qemu /usr/share/seabios; do
			if [ -e "$d/$fw" ]; then
				src=$d/$fw
				break
			fi
		done
		if [ -n "$src" ]; then
			stage_link "$stage" "/opt/bd/share/qemu/$fw" "$src"
		else
			case "$fw" in
			bios-microvm.bin | linuxboot_dma.bin)
				die "--qemu: no $fw in /usr/share/qemu or /usr/share/seabios (Debian packages qemu-system-data, seabios)"
				;;
			esac
		fi
	done
fi

stage_binaries "$stage" "${bins[@]}"
nbin=${#bins[@]}

inside_env=""
for entry in "${images[@]}"; do
	read -r iname key <<<"$entry"
	src=$(env_get "$key")
	[ -n "$src" ] || die "$env_file has no $key; run images/build.sh"
	[ -s "$src" ] || die "$key=$src does not exist; run images/build.sh"
	stage_link "$stage" "/opt/bd/images/$iname" "$src"
	inside_env+="$key=/opt/bd/images/$iname"$'\n'
done
printf '%s' "$inside_env" >"$stage/opt/bd/images.env"
chmod 0644 "$stage/opt/bd/images.env"

append_archive "$base" "$stage" "$out"
log "wrote $out ($(du -h "$out" | cut -f1); $nbin binaries, $(find "$stage" -type l | wc -l) libraries and images)"
echo "$out"
