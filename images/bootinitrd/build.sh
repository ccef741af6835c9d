#!/usr/bin/env bash
# Build the stock kernel's boot initramfs: a small busybox initramfs that loads the stock Debian
# kernel's virtio modules (virtio_pci, virtio_mmio, virtio_blk, virtio_net and what they
# depend on), mounts the root= disk and switch_roots to its init (images/bootinitrd/init). With
# it the stock kernel boots the Debian root filesystem image (images/rootfs/) from a virtio
# disk, on QEMU (virtio-pci) and on bdvmm's kvm engine (virtio-mmio described in ACPI).
#
# The modules come from the stock kernel's own package, taken as images/kvmhost/build.sh does
# (images/lib/kmod.sh: apt-get download, nothing is installed, depmod over the package).
#
# Output: $CACHE/bootinitrd/<key>/ with initramfs.cpio.gz, release, modules.txt (load order),
# inputs.txt and contents.txt, where CACHE is ${BACKDOORS_CACHE:-$HOME/.cache/backdoors} and
# <key> is the first 16 hex digits of the sha256 of every input (this script, init, the
# shared libraries it sources, the module list, the stock package version and the versions of
# busybox-static, cpio, gzip and kmod). An existing output is reused. Progress goes to stderr;
# the LAST stdout line is the output directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}
packages=(apt dpkg busybox-static cpio gzip kmod findutils coreutils xz-utils)
outputs=(initramfs.cpio.gz release modules.txt)

# What the root disk and the NIC need. ext4 is built into the stock kernel: listing it checks
# that it still is (a module would have to be loaded too).
required_modules=(virtio_pci virtio_mmio virtio_blk virtio_net ext4)

log() { printf 'bootinitrd: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: images/bootinitrd/build.sh [--help]

Builds the stock kernel's boot initramfs (virtio modules + a root= mounter) and prints its
directory as the last stdout line; the archive is initramfs.cpio.gz in it.
Cache root: \${BACKDOORS_CACHE:-\$HOME/.cache/backdoors} (now: $cache)
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

# shellcheck source=images/lib/kmod.sh
. "$here/../lib/kmod.sh"
# shellcheck source=images/lib/cpio.sh
. "$here/../lib/cpio.sh"

ensure_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]}; install them: sudo apt-get install ${missing[*]}"
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update >&2
	apt-get install -y --no-install-recommends "${missing[@]}" >&2
}

# One line per input, sorted: the key is the sha256 of this manifest.
# input_manifest STOCK_PACKAGE_LINE
input_manifest() {
	local f
	{
		echo "format 1"
		for f in build.sh init ../lib/kmod.sh ../lib/cpio.sh; do
			echo "file $f $(sha256sum <"$here/$f" | cut -d' ' -f1)"
		done
		echo "stock $1"
		echo "modules required ${required_modules[*]}"
		dpkg-query -W -f='package ${Package} ${Version}\n' busybox-static cpio gzip kmod
	} | LC_ALL=C sort
}

complete() {
	local d=$1 f
	for f in "${outputs[@]}"; do
		[ -s "$d/$f" ] || return 1
	done
}

main() {
	ensure_packages "${packages[@]}"
	[ -x /bin/busybox ] || die "/bin/busybox missing although busybox-static is installed"

	local stock_out stock_dir f pkg version release
	log "stock kernel: images/stock/fetch.sh"
	stock_out=$(bash "$here/../stock/fetch.sh") || die "images/stock/fetch.sh failed"
	stock_dir=${stock_out##*$'\n'}
	for f in package release; do
		[ -s "$stock_dir/$f" ] || die "images/stock/fetch.sh printed '$stock_dir', which has no $f"
	done
	read -r pkg version <"$stock_dir/package"
	release=$(cat "$stock_dir/release")
	if [ -z "$pkg" ] || [ -z "$version" ]; then
		die "cannot parse $stock_dir/package"
	fi

	local manifest key dest
	manifest=$(input_manifest "$pkg $version")
	key=$(printf '%s\n' "$manifest" | sha256sum | cut -c1-16)
	dest=$cache/bootinitrd/$key
	if complete "$dest"; then
		log "up to date: $dest"
		echo "$dest"
		return 0
	fi

	mkdir -p "$cache/bootinitrd"
	tmp=$(mktemp -d "$cache/bootinitrd/.tmp.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	local root=$tmp/root out=$tmp/out x=$tmp/x
	mkdir -p "$out" "$x"

	kmod_extract_package "$pkg" "$version" "$release" "$x"
	kmod_resolve "$kmod_moddir" "${required_modules[*]}" ""

	mkdir -p "$root"/{bin,etc/bootinitrd,proc,sys,dev,newroot}
	kmod_install_all "$kmod_moddir" "$root" "$release" "$root/etc/bootinitrd/modules.txt"
	echo "$release" >"$root/etc/bootinitrd/release"
	chmod 0644 "$root/etc/bootinitrd/"*
	install -m 0755 /bin/busybox "$root/bin/busybox"
	install -m 0755 "$here/init" "$root/init"

	# Reproducible archive: fixed mtimes, owner root, sorted names.
	find "$root" -exec touch -h -d @0 {} +
	log "packing cpio"
	(
		cd "$root"
		find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
			cpio --create --format=newc --owner=0:0 --reproducible --quiet
		device_nodes_archive
	) | gzip -9 -n >"$out/initramfs.cpio.gz"

	echo "$release" >"$out/release"
	cp "$root/etc/bootinitrd/modules.txt" "$out/modules.txt"
	printf '%s\n' "$manifest" >"$out/inputs.txt"
	(cd "$root" && find . -mindepth 1 -printf '%M %s %P\n' | LC_ALL=C sort -k3) >"$out/contents.txt"

	if ! mv -T "$out" "$dest" 2>/dev/null; then
		complete "$dest" || die "cannot move the result to $dest"
		log "another build finished first; using it"
	fi
	log "built $dest (initramfs $(du -h "$dest/initramfs.cpio.gz" | cut -f1), kernel $release)"
	echo "$dest"
}

main
