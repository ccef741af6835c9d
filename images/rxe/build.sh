#!/usr/bin/env bash
# Build the cached base initramfs of the SoftRoCE VM (the VM that runs the bridge's RDMA verbs
# transport on Soft-RoCE, tests/tests/rxe.rs): busybox, `ip` and `rdma` (iproute2), libibverbs
# with the rxe provider (/etc/libibverbs.d/rxe.driver and librxe-rdmav*.so), every shared
# library they need (resolved with ldd, at the paths ldd names) and /init. The per-run part
# (rdma-bridge, bd-verbs-check, the PKI, the bridge config and the memory image) is appended
# by images/rxe/pack.sh. The kernel is `images/kernel/build.sh --variant rxe`.
#
# Output: $CACHE/rxe/<key>/ with initramfs.cpio.gz, inputs.txt and contents.txt, where CACHE
# is ${BACKDOORS_CACHE:-$HOME/.cache/backdoors} and <key> is the first 16 hex digits of the
# sha256 of every input (this script, init, and the versions of the Debian packages the files
# come from). An existing output is reused. Progress goes to stderr; the LAST stdout line is
# the output directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}
# Where the files come from; their versions are key inputs.
packages=(busybox-static iproute2 libibverbs1 ibverbs-providers cpio gzip)
outputs=(initramfs.cpio.gz inputs.txt contents.txt)

log() { printf 'rxe-image: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
# shellcheck source=images/lib/stage.sh
. "$here/../lib/stage.sh"

usage() {
	cat <<USAGE
Usage: images/rxe/build.sh [--help]

Builds the base initramfs of the SoftRoCE VM (busybox, ip, rdma, libibverbs + rxe provider,
/init) and prints its directory as the last stdout line. Per-run contents are added by
images/rxe/pack.sh; the kernel is images/kernel/build.sh --variant rxe.
Cache root: \${BACKDOORS_CACHE:-\$HOME/.cache/backdoors} (now: $cache)
USAGE
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

input_manifest() {
	local f
	{
		echo "format 1"
		for f in build.sh init ../lib/stage.sh; do
			echo "file $f $(sha256sum <"$here/$f" | cut -d' ' -f1)"
		done
		dpkg-query -W -f='package ${Package} ${Version}\n' "${packages[@]}"
	} | LC_ALL=C sort
}

complete() {
	local f
	for f in "${outputs[@]}"; do
		[ -s "$1/$f" ] || return 1
	done
}

# A cpio "newc" entry with no data (a device node), as images/kvmhost/build.sh makes them:
# newc_entry NAME MODE(octal incl. type) RDEVMAJOR RDEVMINOR INODE
newc_entry() {
	local name=$1 mode=$2 major=$3 minor=$4 ino=$5
	local namesize=$((${#name} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$ino" "$((8#$mode))" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
	printf '%s\0' "$name"
	head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}

# /dev/console must exist before devtmpfs is mounted; a tiny appended archive provides it
# without mknod (and so without root).
device_nodes_archive() {
	newc_entry dev/console 020600 5 1 900001
	newc_entry dev/null 020666 1 3 900002
	newc_entry TRAILER!!! 0 0 0 0
}

# add_file ROOT PATH: PATH's content at the same path under ROOT (once).
add_file() {
	[ -e "$1$2" ] && return 0
	mkdir -p "$1$(dirname "$2")"
	cp -L "$2" "$1$2"
}

# copy_with_libs ROOT FILE: FILE and every shared object ldd lists for it, at their paths.
copy_with_libs() {
	local root=$1 file=$2 libs path
	add_file "$root" "$file"
	libs=$(ldd_paths "$file") || exit 1
	while IFS= read -r path; do
		[ -n "$path" ] && add_file "$root" "$path"
	done <<<"$libs"
}

main() {
	ensure_packages "${packages[@]}"
	[ -x /bin/busybox ] || die "/bin/busybox missing although busybox-static is installed"
	local manifest key dest
	manifest=$(input_manifest)
	key=$(printf '%s\n' "$manifest" | sha256sum | cut -c1-16)
	dest=$cache/rxe/$key
	if complete "$dest"; then
		log "up to date: $dest"
		echo "$dest"
		return 0
	fi
	mkdir -p "$cache/rxe"
	tmp=$(mktemp -d "$cache/rxe/.tmp.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	local root=$tmp/root out=$tmp/out
	mkdir -p "$out" "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,opt/bd}
	chmod 1777 "$root/tmp"

	install -m 0755 /bin/busybox "$root/bin/busybox"
	install -m 0755 "$here/init" "$root/init"

	# ip and rdma from iproute2, with their libraries, wherever the host keeps them.
	local tool path
	for tool in ip rdma; do
		path=$(command -v "$tool") || die "$tool not found (Debian package iproute2)"
		path=$(readlink -f "$path")
		copy_with_libs "$root" "$path"
		# /usr/sbin/<tool> always exists: the init calls the tools by that path.
		[ -e "$root/usr/sbin/$tool" ] || ln -s "$path" "$root/usr/sbin/$tool"
	done

	# libibverbs and its rxe provider: the provider is dlopen()ed, so ldd of a binary never
	# names it; take it and its driver file from the package's file list.
	local lib provider driver
	lib=$(dpkg -L libibverbs1 | grep -E '/libibverbs\.so\.1$' | head -n1) || true
	[ -n "$lib" ] || die "the package libibverbs1 has no libibverbs.so.1"
	copy_with_libs "$root" "$(readlink -f "$lib")"
	[ -e "$root$lib" ] || ln -s "$(basename "$(readlink -f "$lib")")" "$root$lib"
	provider=$(dpkg -L ibverbs-providers | grep -E '/librxe-rdmav[0-9]+\.so$' | head -n1) || true
	[ -n "$provider" ] || die "the package ibverbs-providers has no librxe-rdmav*.so"
	copy_with_libs "$root" "$(readlink -f "$provider")"
	[ -e "$root$provider" ] || ln -s "$(basename "$(readlink -f "$provider")")" "$root$provider"
	driver=$(dpkg -L ibverbs-providers | grep -E '/libibverbs\.d/rxe\.driver$' | head -n1) || true
	[ -n "$driver" ] || die "the package ibverbs-providers has no libibverbs.d/rxe.driver"
	add_file "$root" "$driver"

	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
	printf 'root:x:0:\n' >"$root/etc/group"
	find "$root/etc" -type f -exec chmod 0644 {} +

	# Reproducible archive: fixed mtimes, owner root, sorted names.
	find "$root" -exec touch -h -d @0 {} +
	log "packing cpio"
	(
		cd "$root"
		find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
			cpio --create --format=newc --owner=0:0 --reproducible --quiet
		device_nodes_archive
	) | gzip -9 -n >"$out/initramfs.cpio.gz"
	printf '%s\n' "$manifest" >"$out/inputs.txt"
	(cd "$root" && find . -mindepth 1 -printf '%M %s %P\n' | LC_ALL=C sort -k3) >"$out/contents.txt"
	if ! mv -T "$out" "$dest" 2>/dev/null; then
		complete "$dest" || die "cannot move the result to $dest"
		log "another build finished first; using it"
	fi
	log "built $dest (initramfs $(du -h "$dest/initramfs.cpio.gz" | cut -f1))"
	echo "$dest"
}

main
