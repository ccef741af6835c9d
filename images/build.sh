#!/usr/bin/env bash
# Build every guest image, reusing cached results whose inputs did not change:
#   1. images/kernel/build.sh     the patched guest kernel (bzImage, vmlinux, ...)
#   2. images/stock/fetch.sh      the stock Debian cloud kernel (6.1), unmodified, and
#      ... --series 6.12          the stock Debian cloud kernel 6.12 (bookworm-backports)
#   3. images/initramfs/build.sh  the initramfs with busybox, programs, scenarios
#   4. images/kvmhost/build.sh    the kvm host: stock kernel + initramfs with kvm-amd
#   5. images/kernel/build.sh --variant rxe and images/rxe/build.sh
#                                 the SoftRoCE VM: kernel with Soft-RoCE + base initramfs
#                                 (optional: if either fails, a warning, no BD_RXE_* keys,
#                                 and tests/tests/rxe.rs skips saying so)
#   6. images/bootinitrd/build.sh the stock kernel's boot initramfs (virtio modules, root=)
#   7. images/rootfs/build.sh     the Debian 12 root filesystem image with redis-server
#                                 (required: needs root and the network)
# then writes $CACHE/images.env (KEY=absolute-path lines, for tests and tools;
# $BD_IMAGES_ENV instead when set) and prints its path as the LAST stdout line.
# Progress goes to stderr. CACHE is ${BACKDOORS_CACHE:-$HOME/.cache/backdoors}.
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

Builds (or reuses) the guest kernel, the stock kernels (6.1, 6.12), the
initramfs, the kvm host's base image, the SoftRoCE VM's kernel and base image,
the stock kernel's boot initramfs and the Debian root filesystem image, and writes
\${BD_IMAGES_ENV:-$cache/images.env} with the lines
  BD_KERNEL_DIR BD_KERNEL_BZIMAGE BD_KERNEL_VMLINUX BD_KERNEL_SYSTEM_MAP
  BD_KERNEL_CONFIG BD_STOCK_DIR BD_STOCK_VMLINUZ BD_STOCK_VMLINUX
  BD_STOCK_SYSTEM_MAP BD_STOCK_CONFIG BD_STOCK612_DIR BD_STOCK612_VMLINUZ
  BD_STOCK612_VMLINUX BD_STOCK612_CONFIG BD_INITRAMFS
  BD_KVMHOST_KERNEL BD_KVMHOST_INITRD
  BD_STOCK_BOOT_INITRD BD_ROOTFS_IMAGE
  BD_RXE_KERNEL BD_RXE_INITRD (only if the SoftRoCE images could be built)
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
	shift 2
	[ -f "$script" ] || die "$name: $script does not exist"
	log "$name: $script $*"
	out=$(bash "$script" "$@") || die "$name failed ($script $*)"
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
# The 6.12 one has no System.map on purpose: introspection must find what it needs without files.
run_step stock612 "$here/stock/fetch.sh" --series 6.12
stock612_dir=$step_out
run_step initramfs "$here/initramfs/build.sh"
initramfs=$step_out
run_step kvmhost "$here/kvmhost/build.sh"
kvmhost_dir=$step_out

# The SoftRoCE VM (tests/tests/rxe.rs). Optional: a machine that cannot build it still runs
# everything else, and the test says why it skipped.
rxe_lines=""
# Each step in a subshell, so that its failure (die) ends only the subshell; it prints its
# output path, the one thing on stdout.
if rxe_kernel_dir=$(run_step rxe-kernel "$here/kernel/build.sh" --variant rxe && echo "$step_out") &&
	rxe_image_dir=$(run_step rxe-image "$here/rxe/build.sh" && echo "$step_out"); then
	rxe_lines="
BD_RXE_KERNEL=$rxe_kernel_dir/bzImage
BD_RXE_INITRD=$rxe_image_dir/initramfs.cpio.gz"
else
	log "warning: the SoftRoCE VM's images could not be built (see above): images.env gets no"
	log "warning: BD_RXE_* keys, and tests/tests/rxe.rs (rxe_verbs_on_softroce) will be skipped"
fi

# The stock kernel's boot initramfs and the Debian root filesystem image (issue 13): the
# service guests boot that image from a disk, with the patched kernel or the stock one.
run_step bootinitrd "$here/bootinitrd/build.sh"
bootinitrd_dir=$step_out
if ! rootfs_dir=$(run_step rootfs "$here/rootfs/build.sh" && echo "$step_out"); then
	die "the Debian root filesystem image (images/rootfs/build.sh) could not be built (see above);
it needs root (mmdebstrap, mkfs.ext4 -d) and the network (Debian's archive): run
'sudo scripts/install-deps.sh', then 'sudo images/build.sh'"
fi

for f in "$kernel_dir"/{bzImage,vmlinux,System.map,config} \
	"$stock_dir"/{vmlinuz,vmlinux,System.map,config} "$stock612_dir"/{vmlinuz,vmlinux,config} \
	"$initramfs" \
	"$kvmhost_dir"/{vmlinuz,initramfs.cpio.gz} "$bootinitrd_dir/initramfs.cpio.gz" \
	"$rootfs_dir/rootfs.ext4" ${rxe_lines:+"$rxe_kernel_dir/bzImage" "$rxe_image_dir/initramfs.cpio.gz"}; do
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
BD_STOCK612_DIR=$stock612_dir
BD_STOCK612_VMLINUZ=$stock612_dir/vmlinuz
BD_STOCK612_VMLINUX=$stock612_dir/vmlinux
BD_STOCK612_CONFIG=$stock612_dir/config
BD_INITRAMFS=$initramfs
BD_KVMHOST_KERNEL=$kvmhost_dir/vmlinuz
BD_KVMHOST_INITRD=$kvmhost_dir/initramfs.cpio.gz
BD_STOCK_BOOT_INITRD=$bootinitrd_dir/initramfs.cpio.gz
BD_ROOTFS_IMAGE=$rootfs_dir/rootfs.ext4$rxe_lines"
case "$env_lines" in
*[[:blank:]\"\'\\]*) die "an output path contains blanks or quotes; set BACKDOORS_CACHE to a plain path" ;;
esac

env_file=${BD_IMAGES_ENV:-$cache/images.env}
mkdir -p "$(dirname "$env_file")"
tmp_env=$(mktemp "$(dirname "$env_file")/.images.env.XXXXXX")
printf '%s\n' "$env_lines" >"$tmp_env"
chmod 0644 "$tmp_env"
mv -f "$tmp_env" "$env_file"
log "wrote $env_file:"
sed 's/^/images:   /' "$env_file" >&2
echo "$env_file"
