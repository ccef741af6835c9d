#!/usr/bin/env bash
# Build the cached part of the "kvm host": a QEMU-TCG VM (-cpu max emulates
# AMD-V with nested paging) that runs the stock Debian cloud kernel with
# kvm-amd loaded, so that our VMM can use /dev/kvm inside it.
#
# Takes the stock kernel from images/stock/fetch.sh, downloads the same image
# package (apt-get download, nothing is installed), takes from its
# lib/modules/<release>/ the modules we want plus everything they depend on
# (resolved through a modules.dep made by depmod over the package's modules)
# and builds a base initramfs: busybox, those modules and their load order,
# /init, /etc. The per-run part (our binaries and guest images) is appended
# by images/kvmhost/pack.sh.
#
# Output: $CACHE/kvmhost/<key>/ with vmlinuz, initramfs.cpio.gz, release,
# modules.txt (load order), inputs.txt and contents.txt, where CACHE is
# ${BACKDOORS_CACHE:-$HOME/.cache/backdoors} and <key> is the first 16 hex
# digits of the sha256 of every input (this script, init, every file under
# rootfs/, the stock package version and the versions of busybox-static,
# cpio, gzip and kmod). An existing output is reused. Progress goes to
# stderr; the LAST stdout line is the output directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}
packages=(apt dpkg busybox-static cpio gzip kmod findutils coreutils)
outputs=(vmlinuz initramfs.cpio.gz release modules.txt)

# Modules wanted in the kvm host (names as `modinfo` spells them; '-' and '_'
# are the same). Their dependencies are added from modules.dep. A required
# module that is neither a .ko in the package nor built in is an error; an
# optional one that is missing is skipped.
required_modules=(kvm-amd virtio_pci virtio_net virtio_blk virtio_console vhost_net tun)
optional_modules=(9p 9pnet_virtio bridge veth)

log() { printf 'kvmhost: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: images/kvmhost/build.sh [--help]

Builds the base image of the kvm host (kernel + initramfs with kvm-amd) and
prints its directory as the last stdout line. Per-run contents are added by
images/kvmhost/pack.sh.
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

is_root() { [ "$(id -u)" -eq 0 ]; }

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
	is_root || die "missing Debian packages: ${missing[*]}; install them: sudo apt-get install ${missing[*]}"
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
		for f in "$here/build.sh" "$here/init" "$here/../lib/kmod.sh" "$here/../lib/cpio.sh"; do
			echo "file ${f#"$here/"} $(sha256sum <"$f" | cut -d' ' -f1)"
		done
		while IFS= read -r -d '' f; do
			echo "file ${f#"$here/"} $(sha256sum <"$f" | cut -d' ' -f1)"
		done < <(find "$here/rootfs" -type f -print0)
		echo "stock $1"
		echo "modules required ${required_modules[*]}"
		echo "modules optional ${optional_modules[*]}"
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

	local stock_out stock_dir
	log "stock kernel: images/stock/fetch.sh"
	stock_out=$(bash "$here/../stock/fetch.sh") || die "images/stock/fetch.sh failed"
	stock_dir=${stock_out##*$'\n'}
	local f
	for f in vmlinuz package release; do
		[ -s "$stock_dir/$f" ] || die "images/stock/fetch.sh printed '$stock_dir', which has no $f"
	done
	local pkg version release
	read -r pkg version <"$stock_dir/package"
	release=$(cat "$stock_dir/release")
	if [ -z "$pkg" ] || [ -z "$version" ]; then
		die "cannot parse $stock_dir/package"
	fi

	local manifest key dest
	manifest=$(input_manifest "$pkg $version")
	key=$(printf '%s\n' "$manifest" | sha256sum | cut -c1-16)
	dest=$cache/kvmhost/$key
	if complete "$dest"; then
		log "up to date: $dest"
		echo "$dest"
		return 0
	fi

	mkdir -p "$cache/kvmhost"
	tmp=$(mktemp -d "$cache/kvmhost/.tmp.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	local root=$tmp/root out=$tmp/out x=$tmp/x
	mkdir -p "$out" "$x"

	kmod_extract_package "$pkg" "$version" "$release" "$x"
	kmod_resolve "$kmod_moddir" "${required_modules[*]}" "${optional_modules[*]}"

	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/kvmhost,proc,sys,dev,tmp,run,root,opt}
	chmod 1777 "$root/tmp"
	chmod 0700 "$root/root"
	kmod_install_all "$kmod_moddir" "$root" "$release" "$root/etc/kvmhost/modules.txt"
	echo "$release" >"$root/etc/kvmhost/release"

	install -m 0755 /bin/busybox "$root/bin/busybox"
	install -m 0755 "$here/init" "$root/init"
	cp -R "$here/rootfs/." "$root/"
	find "$root/etc" -type f -exec chmod 0644 {} +
	find "$root/etc" -type d -exec chmod 0755 {} +
	chmod 0755 "$root/etc/kvmhost/agent"

	# Reproducible archive: fixed mtimes, owner root, sorted names.
	find "$root" -exec touch -h -d @0 {} +
	log "packing cpio"
	(
		cd "$root"
		find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
			cpio --create --format=newc --owner=0:0 --reproducible --quiet
		device_nodes_archive
	) | gzip -9 -n >"$out/initramfs.cpio.gz"

	cp "$stock_dir/vmlinuz" "$out/vmlinuz"
	echo "$release" >"$out/release"
	cp "$root/etc/kvmhost/modules.txt" "$out/modules.txt"
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
