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
		for f in "$here/build.sh" "$here/init"; do
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

# Append one cpio "newc" entry with no data (a device node), as
# images/initramfs/build.sh does:
# newc_entry NAME MODE(octal incl. type) RDEVMAJOR RDEVMINOR INODE
newc_entry() {
	local name=$1 mode=$2 major=$3 minor=$4 ino=$5
	local namesize=$((${#name} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$ino" "$((8#$mode))" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
	printf '%s\0' "$name"
	local pad=$(((4 - (110 + namesize) % 4) % 4))
	head -c "$pad" /dev/zero
}

# /dev/console must exist before anything is mounted: a tiny second archive
# appended to the first provides the nodes without mknod (and so root).
device_nodes_archive() {
	newc_entry dev/console 020600 5 1 900001
	newc_entry dev/null 020666 1 3 900002
	newc_entry TRAILER!!! 0 0 0 0
}

complete() {
	local d=$1 f
	for f in "${outputs[@]}"; do
		[ -s "$d/$f" ] || return 1
	done
}

# Module name of a path in modules.dep: basename without .ko[.xz|.zst|.gz],
# '-' as '_'.
mod_name() {
	local n=${1##*/}
	n=${n%%.ko*}
	echo "${n//-/_}"
}

# Resolved by resolve_modules: load order (deps first), relative paths.
declare -A mod_deps=() mod_path=() mod_state=()
load_order=()

# visit PATH: depth-first, dependencies first. modules.dep lists the full
# closure of each module's dependencies, so any order of the list works.
visit() {
	local p=$1 d
	case "${mod_state[$p]:-}" in
	visited) return 0 ;;
	visiting) die "dependency cycle at $p" ;;
	esac
	mod_state[$p]=visiting
	for d in ${mod_deps[$p]}; do
		[ -n "${mod_deps[$d]+x}" ] || die "$p depends on $d, which modules.dep does not list"
		visit "$d"
	done
	mod_state[$p]=visited
	load_order+=("$p")
}

# resolve_modules MODDIR: fill load_order from MODDIR/modules.dep.
resolve_modules() {
	local moddir=$1 line p deps name
	while IFS= read -r line; do
		p=${line%%:*}
		deps=${line#*:}
		mod_deps[$p]=$deps
		mod_path[$(mod_name "$p")]=$p
	done <"$moddir/modules.dep"
	[ ${#mod_deps[@]} -gt 0 ] || die "empty modules.dep in $moddir"

	for name in "${required_modules[@]}" "${optional_modules[@]}"; do
		local key=${name//-/_} optional=no
		case " ${optional_modules[*]} " in *" $name "*) optional=yes ;; esac
		if [ -n "${mod_path[$key]:-}" ]; then
			visit "${mod_path[$key]}"
		elif grep -Eq "(^|/)${name//[-_]/[-_]}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
			log "  $name is built into the kernel"
		elif [ "$optional" = yes ]; then
			log "  $name (optional) is not in this kernel; skipped"
		else
			die "module $name is neither a module nor built into this kernel"
		fi
	done
}

# install_module SRC DEST: copy a module, decompressing it if needed.
install_module() {
	local src=$1 dest=$2
	mkdir -p "$(dirname "$dest")"
	case "$src" in
	*.ko) cp "$src" "$dest" ;;
	*.ko.xz) xz -dc "$src" >"$dest" ;;
	*.ko.gz) gzip -dc "$src" >"$dest" ;;
	*.ko.zst)
		command -v zstd >/dev/null || die "$src is zstd-compressed; install zstd"
		zstd -qdc "$src" >"$dest"
		;;
	*) die "unknown module file type: $src" ;;
	esac
	chmod 0644 "$dest"
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
	dl=""
	trap 'rm -rf "$tmp" ${dl:+"$dl"}' EXIT
	local root=$tmp/root out=$tmp/out x=$tmp/x
	mkdir -p "$out" "$x"

	log "downloading $pkg=$version"
	# apt-get download runs as the sandbox user _apt when it can write there;
	# the cache under a private home is out of its reach, so use TMPDIR.
	dl=$(mktemp -d)
	chmod 0755 "$dl"
	if is_root && id _apt >/dev/null 2>&1; then
		chown _apt "$dl"
	fi
	(cd "$dl" && apt-get download "$pkg=$version" >&2)
	local deb
	deb=$(find "$dl" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
	[ -n "$deb" ] || die "apt-get download did not produce ${pkg}_*.deb"
	dpkg-deb -x "$deb" "$x"
	rm -rf "$dl"
	dl=""

	# The package has no modules.dep (the postinst runs depmod); make one.
	local base moddir
	for base in "$x" "$x/usr"; do
		[ -d "$base/lib/modules/$release" ] && break
	done
	moddir=$base/lib/modules/$release
	[ -d "$moddir/kernel" ] || die "no lib/modules/$release/kernel in $deb"
	log "depmod over the package's modules"
	depmod -b "$base" "$release" || die "depmod -b $base $release failed"

	resolve_modules "$moddir"
	[ ${#load_order[@]} -gt 0 ] || die "no modules resolved"

	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/kvmhost,proc,sys,dev,tmp,run,root,opt}
	chmod 1777 "$root/tmp"
	chmod 0700 "$root/root"
	local p rel order=()
	for p in "${load_order[@]}"; do
		rel=${p%.ko*}.ko
		install_module "$moddir/$p" "$root/lib/modules/$release/$rel"
		order+=("$rel")
	done
	printf '%s\n' "${order[@]}" >"$root/etc/kvmhost/modules.txt"
	echo "$release" >"$root/etc/kvmhost/release"
	log "modules (load order): $(printf '%s ' "${order[@]##*/}")"

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
