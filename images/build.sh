#!/usr/bin/env bash
# Build every guest image, reusing cached results whose inputs did not change:
#   1. images/kernel/build.sh     the patched guest kernel (bzImage, vmlinux, ...)
#   2. images/stock/fetch.sh      the stock Debian cloud kernel, unmodified
#   3. images/initramfs/build.sh  the initramfs with busybox, programs, scenarios
#   4. images/kvmhost/build.sh    the kvm host: stock kernel + initramfs with kvm-amd
# then writes $CACHE/images.env (KEY=absolute-path lines, for tests and tools)
# and prints its path as the LAST stdout line. Progress goes to stderr.
# CACHE is ${BACKDOORS_CACHE:-$HOME/.cache/backdoors}.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}

log() { printf 'images: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: images/build.sh [--help]

Builds (or reuses) the guest kernel, the stock kernel, the initramfs and the
kvm host's base image and writes $cache/images.env with the lines
  BD_KERNEL_DIR BD_KERNEL_BZIMAGE BD_KERNEL_VMLINUX BD_KERNEL_SYSTEM_MAP
  BD_KERNEL_CONFIG BD_STOCK_DIR BD_STOCK_VMLINUZ BD_STOCK_VMLINUX
  BD_STOCK_SYSTEM_MAP BD_STOCK_CONFIG BD_INITRAMFS
  BD_KVMHOST_KERNEL BD_KVMHOST_INITRD
Cache root: \${BACKDOORS_CACHE:-\$HOME/.cache/backdoors}
EOF
}

case "${1:-}" in
-h | --help)
	usage
	exit 0
	;;
"") ;;
*)
	usage >&2
	exit 2
	;;
esac

# run_step NAME SCRIPT: run SCRIPT, pass its progress through, and set
# step_out to the last line it printed on stdout (its output path).
step_out=""
run_step() {
	local name=$1 script=$2 out
	[ -f "$script" ] || die "$name: $script does not exist"
	log "$name: $script"
	out=$(bash "$script") || die "$name failed ($script)"
	step_out=${out##*$'\n'}
	if [ "$out" != "$step_out" ]; then
		printf '%s\n' "${out%$'\n'*}" >&2
	fi
	[ -n "$step_out" ] || die "$name printed no output path"
	[ -e "$step_out" ] || die "$name printed '$step_out', which does not exist"
	step_out=$(readlink -f "$step_out")
}

run_step kernel "$here/kernel/build.sh"
kernel_dir=$step_out
run_step stock "$here/stock/fetch.sh"
stock_dir=$step_out
run_step initramfs "$here/initramfs/build.sh"
initramfs=$step_out
run_step kvmhost "$here/kvmhost/build.sh"
kvmhost_dir=$step_out

for f in "$kernel_dir"/{bzImage,vmlinux,System.map,config} \
	"$stock_dir"/{vmlinuz,vmlinux,System.map,config} "$initramfs" \
	"$kvmhost_dir"/{vmlinuz,initramfs.cpio.gz}; do
	[ -s "$f" ] || die "missing or empty: $f"
done
env_lines="BD_KERNEL_DIR=$kernel_dir
BD_KERNEL_BZIMAGE=$kernel_dir/bzImage
BD_KERNEL_VMLINUX=$kernel_dir/vmlinux
BD_KERNEL_SYSTEM_MAP=$kernel_dir/System.map
BD_KERNEL_CONFIG=$kernel_dir/config
BD_STOCK_DIR=$stock_dir
BD_STOCK_VMLINUZ=$stock_dir/vmlinuz
BD_STOCK_VMLINUX=$stock_dir/vmlinux
BD_STOCK_SYSTEM_MAP=$stock_dir/System.map
BD_STOCK_CONFIG=$stock_dir/config
BD_INITRAMFS=$initramfs
BD_KVMHOST_KERNEL=$kvmhost_dir/vmlinuz
BD_KVMHOST_INITRD=$kvmhost_dir/initramfs.cpio.gz"
case "$env_lines" in
*[[:blank:]\"\'\\]*) die "an output path contains blanks or quotes; set BACKDOORS_CACHE to a plain path" ;;
esac

mkdir -p "$cache"
env_file=$cache/images.env
tmp_env=$(mktemp "$cache/.images.env.XXXXXX")
printf '%s\n' "$env_lines" >"$tmp_env"
chmod 0644 "$tmp_env"
mv -f "$tmp_env" "$env_file"
log "wrote $env_file:"
sed 's/^/images:   /' "$env_file" >&2
echo "$env_file"
