#!/usr/bin/env bash
# Build the guest initramfs: busybox, the programs of images/programs/*.c,
# /init, /etc (users, inittab, scenario helpers) and the scenarios of
# images/initramfs/scenarios/*.sh, as a gzip-compressed cpio (newc) archive.
#
# Output: $CACHE/initramfs/<key>/initramfs.cpio.gz, where CACHE is
# ${BACKDOORS_CACHE:-$HOME/.cache/backdoors} and <key> is the sha256 of every
# input (this script, /init, rootfs/, scenarios/, programs/, and the versions
# of busybox-static, gcc, libc6-dev, cpio and gzip). An existing output is
# reused. Progress goes to stderr; the LAST stdout line is the archive path.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
programs_dir=$(cd "$here/../programs" && pwd)
cache=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}
packages=(busybox-static gcc libc6-dev cpio gzip coreutils findutils)

log() { printf 'initramfs: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: images/initramfs/build.sh [--help]

Builds the guest initramfs and prints its path as the last stdout line.
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

ensure_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	if [ "$(id -u)" -ne 0 ]; then
		die "missing Debian packages: ${missing[*]}; install them: sudo apt-get install ${missing[*]}"
	fi
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update >&2
	apt-get install -y --no-install-recommends "${missing[@]}" >&2
}

# One line per input, sorted: the key is the sha256 of this manifest.
input_manifest() {
	local f
	{
		echo "format 1"
		for f in "$here/build.sh" "$here/init"; do
			echo "file ${f#"$here/"} $(sha256sum <"$f" | cut -d' ' -f1)"
		done
		while IFS= read -r -d '' f; do
			echo "file ${f#"$here/"} $(sha256sum <"$f" | cut -d' ' -f1)"
		done < <(find "$here/rootfs" "$here/scenarios" -type f -print0)
		while IFS= read -r -d '' f; do
			echo "file programs/${f#"$programs_dir/"} $(sha256sum <"$f" | cut -d' ' -f1)"
		done < <(find "$programs_dir" -type f -print0)
		dpkg-query -W -f='package ${Package} ${Version}\n' "${packages[@]}"
		echo "compiler $(gcc --version | head -n1)"
	} | LC_ALL=C sort
}

# Append one cpio "newc" entry with no data (a directory or device node):
# newc_entry NAME MODE(octal incl. type) RDEVMAJOR RDEVMINOR INODE
newc_entry() {
	local name=$1 mode=$2 major=$3 minor=$4 ino=$5
	local namesize=$((${#name} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$ino" "$((8#$mode))" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
	printf '%s\0' "$name"
	# header (110 bytes) + name is padded to a multiple of 4
	local pad=$(((4 - (110 + namesize) % 4) % 4))
	head -c "$pad" /dev/zero
}

# The kernel opens /dev/console for /init before anything is mounted, so the
# archive must hold that device node. A second, tiny archive appended to the
# first provides it without needing mknod (and so without root).
device_nodes_archive() {
	newc_entry dev/console 020600 5 1 900001
	newc_entry dev/null 020666 1 3 900002
	newc_entry TRAILER!!! 0 0 0 0
}

main() {
	ensure_packages "${packages[@]}"
	[ -x /bin/busybox ] || die "/bin/busybox missing although busybox-static is installed"

	local manifest key dest
	manifest=$(input_manifest)
	key=$(printf '%s\n' "$manifest" | sha256sum | cut -d' ' -f1)
	dest=$cache/initramfs/$key
	if [ -f "$dest/initramfs.cpio.gz" ]; then
		log "up to date: $dest"
		echo "$dest/initramfs.cpio.gz"
		return 0
	fi

	mkdir -p "$cache/initramfs"
	tmp=$(mktemp -d "$cache/initramfs/.tmp.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	local root=$tmp/root out=$tmp/out
	mkdir -p "$out"
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/bd/scenarios,proc,sys,dev,tmp,run,root}
	chmod 1777 "$root/tmp"
	chmod 0700 "$root/root"

	log "building programs with $(gcc --version | head -n1)"
	local src name
	for src in "$programs_dir"/*.c; do
		[ -e "$src" ] || continue
		name=$(basename "$src" .c)
		case "$name" in
		busybox | init | *[!A-Za-z0-9_-]*)
			die "program name '$name' is not allowed (file $src)"
			;;
		esac
		log "  gcc $name"
		gcc -static -O2 -Wall -Wextra -Werror -I"$programs_dir" \
			-o "$root/bin/$name" "$src" >&2
	done

	install -m 0755 /bin/busybox "$root/bin/busybox"
	install -m 0755 "$here/init" "$root/init"
	cp -R "$here/rootfs/." "$root/"
	local s
	for s in "$here"/scenarios/*.sh; do
		[ -e "$s" ] || continue
		install -m 0755 "$s" "$root/etc/bd/scenarios/$(basename "$s")"
	done
	find "$root/etc" -type f ! -path '*/scenarios/*' -exec chmod 0644 {} +
	find "$root/etc" -type d -exec chmod 0755 {} +

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
		[ -f "$dest/initramfs.cpio.gz" ] || die "cannot move the result to $dest"
		log "another build finished first; using it"
	fi
	log "built $dest/initramfs.cpio.gz ($(du -h "$dest/initramfs.cpio.gz" | cut -f1))"
	echo "$dest/initramfs.cpio.gz"
}

main
