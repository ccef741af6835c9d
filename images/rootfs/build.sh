#!/usr/bin/env bash
# Build the Debian 12 (bookworm) root filesystem image: a raw ext4 image
# (mkfs.ext4 -d, no loop mount) of a minimal Debian made with mmdebstrap,
# holding one real server (redis-server), the project's fault programs and
# scenarios, and a systemd-free /sbin/init (images/rootfs/init) that mounts
# the kernel file systems, configures eth0 from the kernel's ip= parameter,
# starts every service of /etc/bd/services/ as its own user, prints
# "BACKDOORS: service up" and optionally starts a scenario (bd.scenario=).
#
# Output: $CACHE/rootfs/<key>/ with rootfs.ext4, packages.txt (the Debian
# packages inside, with versions), inputs.txt and contents.txt, where CACHE
# is ${BACKDOORS_CACHE:-$HOME/.cache/backdoors} and <key> is the first 16
# hex digits of the sha256 of every input: this script, init, every file
# under rootfs/ and images/programs/, the scenarios and lib.sh of
# images/initramfs/, the apt sources used, the package list, the size, every
# --overlay file and the versions of mmdebstrap, e2fsprogs, gcc and
# libc6-dev. An existing output is reused. The Debian archive is not an
# input: a rebuild (new key) takes the packages current at that time.
# Progress goes to stderr; the LAST stdout line is the output directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
programs_dir=$(cd "$here/../programs" && pwd)
initramfs_dir=$(cd "$here/../initramfs" && pwd)
cache=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}
host_packages=(mmdebstrap e2fsprogs gcc libc6-dev coreutils findutils)
suite=bookworm
# The image's packages besides Debian's "minbase" variant (Essential and
# apt): the server, what /sbin/init and the scenarios need (busybox for
# their shell and applets, iproute2 for the network; util-linux's setpriv
# comes with minbase), redis-tools for a check from inside, and for the
# device benchmarks (tests/benches/devices.rs) iperf3 (a server started with
# bd.iperf3=yes), fio and jq (the fio scenario parses fio's JSON with it), and
# earlyoom, a baseline of the evaluation (started with bd.earlyoom=yes).
image_packages=(redis-server redis-tools busybox-static iproute2 procps iperf3 fio jq earlyoom)
size=1G
overlays=()
extra_packages=()

log() { printf 'rootfs: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: images/rootfs/build.sh [--packages PKG[,PKG...]] [--overlay DIR]... [--size SIZE] [--help]

Builds a raw ext4 image of a minimal Debian 12 with redis-server, the fault
programs and /sbin/init, and prints its directory as the last stdout line
(the image is rootfs.ext4 in it). Must run as root (mmdebstrap in root mode,
file owners kept by mkfs.ext4 -d).

  --packages LIST   more Debian packages to install (comma-separated)
  --overlay DIR     copy DIR's tree over the image's root after the
                    packages are installed (repeatable, applied in order);
                    a service file DIR/etc/bd/services/NAME.sh makes
                    /sbin/init start your workload (see images/README.md)
  --size SIZE       size of the image file (truncate(1) syntax; default $size)

Apt sources: the machine's own (/etc/apt/sources.list.d/debian.sources or
/etc/apt/sources.list). Cache root: \${BACKDOORS_CACHE:-\$HOME/.cache/backdoors}
(now: $cache)
EOF
}

while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--packages)
		[ $# -ge 2 ] || die "--packages needs a value"
		IFS=, read -r -a more <<<"$2"
		extra_packages+=("${more[@]}")
		shift 2
		;;
	--overlay)
		[ $# -ge 2 ] || die "--overlay needs a directory"
		[ -d "$2" ] || die "--overlay $2: not a directory"
		overlays+=("$(cd "$2" && pwd)")
		shift 2
		;;
	--size)
		[ $# -ge 2 ] || die "--size needs a value"
		size=$2
		shift 2
		;;
	*)
		usage >&2
		exit 2
		;;
	esac
done
for p in "${extra_packages[@]}"; do
	case "$p" in
	"" | *[!a-z0-9.+-]*) die "bad package name '$p' in --packages" ;;
	esac
done
case "$size" in
[1-9] | [1-9]*[0-9KMG]) ;;
*) die "bad --size '$size' (e.g. 1G, 800M)" ;;
esac
case "$size" in
*[!0-9KMG]*) die "bad --size '$size' (e.g. 1G, 800M)" ;;
esac

ensure_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update >&2
	apt-get install -y --no-install-recommends "${missing[@]}" >&2
}

# The machine's Debian sources, in deb822 or one-line style; mmdebstrap
# pastes the file into the image's apt sources.
find_sources() {
	local f
	for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
		if [ -s "$f" ] && grep -Eq "^[^#]*$suite" "$f"; then
			echo "$f"
			return 0
		fi
	done
	die "no apt sources for $suite in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
}

# file_lines DIR PREFIX: one "file PREFIX/PATH MODE SHA256" line per file or
# symlink under DIR.
file_lines() {
	local dir=$1 prefix=$2 f sum
	while IFS= read -r -d '' f; do
		if [ -L "$f" ]; then
			sum="link:$(readlink "$f")"
		else
			sum=$(sha256sum <"$f" | cut -d' ' -f1)
		fi
		echo "file $prefix/${f#"$dir/"} $(stat -c %a "$f") $sum"
	done < <(find "$dir" \( -type f -o -type l \) -print0)
}

# One line per input, sorted (overlays keep their order): the key is the
# sha256 of this manifest.
input_manifest() {
	local sources=$1 i
	{
		echo "format 1"
		echo "suite $suite"
		echo "size $size"
		echo "packages ${image_packages[*]}"
		echo "extra-packages ${extra_packages[*]}"
		echo "sources $sources $(sha256sum <"$sources" | cut -d' ' -f1)"
		echo "file build.sh $(sha256sum <"$here/build.sh" | cut -d' ' -f1)"
		echo "file init $(sha256sum <"$here/init" | cut -d' ' -f1)"
		file_lines "$here/rootfs" rootfs
		file_lines "$programs_dir" programs
		file_lines "$initramfs_dir/scenarios" initramfs/scenarios
		echo "file initramfs/lib.sh $(sha256sum <"$initramfs_dir/rootfs/etc/bd/lib.sh" | cut -d' ' -f1)"
		dpkg-query -W -f='package ${Package} ${Version}\n' "${host_packages[@]}"
		echo "compiler $(gcc --version | head -n1)"
	} | LC_ALL=C sort
	for i in "${!overlays[@]}"; do
		file_lines "${overlays[$i]}" "overlay$i" | LC_ALL=C sort
	done
}

# mmdebstrap (root mode) mounts proc, sysfs and the host's device nodes
# inside the tree while it runs and unmounts them itself, also when
# interrupted. Should any be left, deleting the tree must not reach into
# them: keep it and say so.
remove_tmp() {
	[ -n "${tmp:-}" ] && [ -d "$tmp" ] || return 0
	if findmnt -rn -o TARGET | grep -q "^$tmp/"; then
		log "file systems still mounted under $tmp; not deleting it (unmount them, then rm -rf it)"
		return 0
	fi
	rm -rf --one-file-system "$tmp"
}

complete() {
	[ -s "$1/rootfs.ext4" ] && [ -s "$1/packages.txt" ]
}

main() {
	[ "$(id -u)" -eq 0 ] || die "run as root: mmdebstrap builds in root mode and mkfs.ext4 -d keeps the files' owners"
	ensure_packages "${host_packages[@]}"

	local sources manifest key dest
	sources=$(find_sources)
	manifest=$(input_manifest "$sources")
	key=$(printf '%s\n' "$manifest" | sha256sum | cut -c1-16)
	dest=$cache/rootfs/$key
	if complete "$dest"; then
		log "up to date: $dest"
		echo "$dest"
		return 0
	fi

	mkdir -p "$cache/rootfs"
	tmp=$(mktemp -d "$cache/rootfs/.tmp.XXXXXX")
	trap remove_tmp EXIT
	local root=$tmp/root out=$tmp/out
	mkdir -p "$out"

	local include
	include=$(
		IFS=,
		echo "${image_packages[*]}${extra_packages[*]:+,${extra_packages[*]}}"
	)
	log "mmdebstrap $suite (minbase + $include) from $sources"
	# The users of the scenarios: user1 runs the faults, user2 the useful
	# work (the same ids as in the initramfs, see images/README.md).
	# The hooks are run by mmdebstrap with the tree as $1.
	# shellcheck disable=SC2016
	mmdebstrap --variant=minbase --include="$include" \
		--customize-hook='chroot "$1" groupadd -g 1000 user1' \
		--customize-hook='chroot "$1" useradd -u 1000 -g 1000 -d /tmp -s /bin/sh -c "fault injector" user1' \
		--customize-hook='chroot "$1" groupadd -g 1001 user2' \
		--customize-hook='chroot "$1" useradd -u 1001 -g 1001 -d /tmp -s /bin/sh -c "useful work" user2' \
		--customize-hook='echo bdguest >"$1/etc/hostname"' \
		--customize-hook='printf "127.0.0.1 localhost\n127.0.1.1 bdguest\n::1 localhost\n" >"$1/etc/hosts"' \
		"$suite" "$root" "$sources" >&2 || die "mmdebstrap failed"

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
		[ ! -e "$root/usr/bin/$name" ] || die "program $name would shadow Debian's /usr/bin/$name"
		log "  gcc $name"
		gcc -static -O2 -Wall -Wextra -Werror -I"$programs_dir" \
			-o "$root/usr/local/bin/$name" "$src" >&2
	done

	install -m 0755 "$here/init" "$root/sbin/init"
	cp -R "$here/rootfs/." "$root/"
	mkdir -p "$root/etc/bd/scenarios" "$root/var/log/bd"
	install -m 0644 "$initramfs_dir/rootfs/etc/bd/lib.sh" "$root/etc/bd/lib.sh"
	local s
	for s in "$initramfs_dir"/scenarios/*.sh; do
		[ -e "$s" ] || continue
		install -m 0755 "$s" "$root/etc/bd/scenarios/$(basename "$s")"
	done
	find "$root/etc/bd" -type d -exec chmod 0755 {} +
	find "$root/etc/bd" -type f ! -path '*/scenarios/*' -exec chmod 0644 {} +
	local o
	for o in "${overlays[@]}"; do
		log "overlay $o"
		cp -a "$o/." "$root/"
	done
	[ -x "$root/bin/busybox" ] || die "no /bin/busybox in the image"
	[ -x "$root/usr/bin/setpriv" ] || die "no /usr/bin/setpriv (util-linux) in the image"

	# shellcheck disable=SC2016 # dpkg-query expands ${Package}, not the shell
	chroot "$root" dpkg-query -W -f='${Package} ${Version}\n' >"$out/packages.txt"
	(cd "$root" && find . -mindepth 1 -printf '%M %U:%G %s %P\n' | LC_ALL=C sort -k4) >"$out/contents.txt"
	log "image tree: $(du -sh "$root" | cut -f1), $(wc -l <"$out/packages.txt") packages"

	log "mkfs.ext4 -d ($size)"
	truncate -s "$size" "$out/rootfs.ext4"
	# A fixed UUID (from the key) and label: the same inputs give the same
	# identity; root=/dev/vda, or root=LABEL=bdroot with an initramfs.
	local uuid
	uuid=$(printf '%s' "$key" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
	mkfs.ext4 -q -F -L bdroot -U "$uuid" -d "$root" "$out/rootfs.ext4" >&2 ||
		die "mkfs.ext4 failed (is $size too small for $(du -sh "$root" | cut -f1)?)"
	printf '%s\n' "$manifest" >"$out/inputs.txt"

	if ! mv -T "$out" "$dest" 2>/dev/null; then
		complete "$dest" || die "cannot move the result to $dest"
		log "another build finished first; using it"
	fi
	log "built $dest/rootfs.ext4 ($size, $(du -h "$dest/rootfs.ext4" | cut -f1) used)"
	echo "$dest"
}

main
