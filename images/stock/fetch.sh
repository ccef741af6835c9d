#!/usr/bin/env bash
# Fetch a stock, unmodified Debian cloud kernel for introspection tests
# against a distribution kernel. Two series:
#   6.1   (default) linux-image-cloud-amd64 from the system's apt sources
#         (bookworm)
#   6.12  linux-image-cloud-amd64 from bookworm-backports, through a private
#         apt configuration in a temporary directory (the system's sources
#         are neither read nor changed)
#
# Resolves the versioned package that the metapackage depends on, downloads
# it with `apt-get download` (no install), unpacks it with `dpkg-deb -x` and
# produces $CACHE/stock/<package version>/ with
#   vmlinuz     the boot image
#   vmlinux     ELF extracted from vmlinuz with the kernel's
#               scripts/extract-vmlinux (taken from linux-source-6.1; it
#               also handles 6.12's zstd); checked to be an ELF file with a
#               .BTF section
#   System.map  6.1 only: the real one, from the matching -dbg package (the
#               image package only holds a stub); only that file is extracted.
#               6.12 gets none: introspection must work without it (issue 14)
#   config
#   release     the kernel release (uname -r), package: name and version
# CACHE is ${BACKDOORS_CACHE:-$HOME/.cache/backdoors}. An existing complete
# output for the same package version is reused; for 6.12, when the package
# lists cannot be fetched (offline), the newest complete 6.12 output is.
# Progress goes to stderr; the LAST stdout line is the output directory.
set -euo pipefail

cache=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}
meta=linux-image-cloud-amd64
source_pkg=linux-source-6.1
source_tar=/usr/src/linux-source-6.1.tar.xz
backports_line="deb http://deb.debian.org/debian bookworm-backports main"

log() { printf 'stock: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: images/stock/fetch.sh [--series 6.1|6.12] [--help]

Fetches the stock Debian cloud kernel behind $meta and prints the
output directory as the last stdout line.
  --series 6.1   (default) bookworm's kernel, from the system's apt sources;
                 output: vmlinuz vmlinux System.map config release package
  --series 6.12  bookworm-backports' kernel, through a private apt
                 configuration (the system's apt sources are not changed);
                 output: vmlinuz vmlinux config release package (no System.map)
Cache root: \${BACKDOORS_CACHE:-\$HOME/.cache/backdoors} (now: $cache)
EOF
}

series=6.1
while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--series)
		if [ $# -lt 2 ]; then
			usage >&2
			exit 2
		fi
		series=$2
		shift 2
		;;
	*)
		usage >&2
		exit 2
		;;
	esac
done

packages=(apt dpkg binutils xz-utils gzip tar "$source_pkg")
case "$series" in
6.1)
	outputs=(vmlinuz vmlinux System.map config release package)
	want_map=yes
	;;
6.12)
	outputs=(vmlinuz vmlinux config release package)
	want_map=no
	# Debian's 6.12 vmlinuz is zstd-compressed; extract-vmlinux runs unzstd.
	packages+=(zstd)
	;;
*)
	log "error: unknown series '$series' (known: 6.1, 6.12)"
	usage >&2
	exit 2
	;;
esac

is_root() { [ "$(id -u)" -eq 0 ]; }

# Options for every apt-get/apt-cache call: none for 6.1 (the system's
# configuration); for 6.12 a private source list, package lists and cache.
apt_opts=()
# Temporary directories, removed on exit: the private apt configuration, the
# download directory and the staging directory.
private_apt=""
dl=""
tmp=""
cleanup() { rm -rf ${private_apt:+"$private_apt"} ${dl:+"$dl"} ${tmp:+"$tmp"}; }
trap cleanup EXIT

apt_updated=no
apt_update() {
	[ "$apt_updated" = yes ] && return 0
	export DEBIAN_FRONTEND=noninteractive
	apt-get update >&2
	apt_updated=yes
}

ensure_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	is_root || die "missing Debian packages: ${missing[*]}; install them: sudo apt-get install ${missing[*]}"
	log "installing ${missing[*]}"
	apt_update
	apt-get install -y --no-install-recommends "${missing[@]}" >&2
}

# setup_private_apt: a private apt configuration that sees only
# bookworm-backports (installed packages still come from the system's dpkg
# status), with fresh package lists. Returns 1 when the lists cannot be
# fetched.
setup_private_apt() {
	private_apt=$(mktemp -d)
	chmod 0755 "$private_apt"
	mkdir -p "$private_apt/lists/partial" "$private_apt/cache/archives/partial"
	printf '%s\n' "$backports_line" >"$private_apt/sources.list"
	apt_opts=(
		-o "Dir::Etc::SourceList=$private_apt/sources.list"
		-o "Dir::Etc::SourceParts=-"
		-o "Dir::State::Lists=$private_apt/lists"
		-o "Dir::Cache=$private_apt/cache"
		-o "Dir::State::status=/var/lib/dpkg/status"
	)
	log "fetching the bookworm-backports package lists (private apt configuration)"
	# apt-get update only warns (status 0) when an index cannot be fetched.
	apt-get "${apt_opts[@]}" update >&2 || return 1
	find "$private_apt/lists" -maxdepth 1 -name '*_Packages*' -print -quit | grep -q .
}

# The versioned kernel package the metapackage depends on.
resolve_image_package() {
	apt-cache "${apt_opts[@]}" depends "$meta" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

candidate_version() {
	apt-cache "${apt_opts[@]}" policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }'
}

complete() {
	local d=$1 f
	for f in "${outputs[@]}"; do
		[ -s "$d/$f" ] || return 1
	done
}

# newest_cached: the newest complete output of this series, or nothing.
newest_cached() {
	local d pkg version best
	best=$(
		for d in "$cache"/stock/*/; do
			d=${d%/}
			complete "$d" || continue
			read -r pkg version <"$d/package" || continue
			case "$pkg" in
			"linux-image-$series."*) printf '%s %s\n' "$version" "$d" ;;
			esac
		done | sort -V | tail -n1
	)
	[ -n "$best" ] || return 1
	echo "${best#* }"
}

main() {
	ensure_packages "${packages[@]}"

	local pkg version
	if [ "$series" = 6.12 ]; then
		if ! setup_private_apt; then
			local old
			old=$(newest_cached) ||
				die "cannot fetch the bookworm-backports package lists (network?) and no $series kernel is cached"
			log "warning: cannot fetch the bookworm-backports package lists; reusing $old"
			echo "$old"
			return 0
		fi
		pkg=$(resolve_image_package)
		[ -n "$pkg" ] || die "cannot resolve the package behind $meta in bookworm-backports"
	else
		pkg=$(resolve_image_package)
		if [ -z "$pkg" ] && is_root; then
			log "apt has no package lists for $meta; running apt-get update"
			apt_update
			pkg=$(resolve_image_package)
		fi
		[ -n "$pkg" ] || die "cannot resolve the package behind $meta (apt-cache depends $meta); run apt-get update"
	fi
	case "$pkg" in
	"linux-image-$series."*) ;;
	*) die "$meta resolves to $pkg, which is not a $series kernel; images/stock/fetch.sh needs updating for it" ;;
	esac
	version=$(candidate_version "$pkg")
	if [ -z "$version" ] || [ "$version" = "(none)" ]; then
		die "no installable version of $pkg"
	fi
	log "$meta -> $pkg $version"

	local dest=$cache/stock/${version//:/_}
	if complete "$dest"; then
		log "up to date: $dest"
		echo "$dest"
		return 0
	fi

	mkdir -p "$cache/stock"
	tmp=$(mktemp -d "$cache/stock/.tmp.XXXXXX")
	local out=$tmp/out
	mkdir -p "$out" "$tmp/x" "$tmp/src"

	local wanted=("$pkg=$version")
	[ "$want_map" = yes ] && wanted+=("$pkg-dbg=$version")
	log "downloading ${wanted[*]}"
	# apt-get download runs as the sandbox user _apt when it can write there;
	# the cache under a private home is out of its reach, so use TMPDIR.
	dl=$(mktemp -d)
	chmod 0755 "$dl"
	if is_root && id _apt >/dev/null 2>&1; then
		chown _apt "$dl"
	fi
	(cd "$dl" && apt-get "${apt_opts[@]}" download "${wanted[@]}" >&2)
	local deb dbg=""
	deb=$(find "$dl" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
	[ -n "$deb" ] || die "apt-get download did not produce $pkg's .deb file"
	if [ "$want_map" = yes ]; then
		dbg=$(find "$dl" -maxdepth 1 -name "${pkg}-dbg_*.deb" -print -quit)
		[ -n "$dbg" ] || die "apt-get download did not produce $pkg-dbg's .deb file"
	fi
	dpkg-deb -x "$deb" "$tmp/x"

	local vmlinuz release
	vmlinuz=$(find "$tmp/x/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
	[ -n "$vmlinuz" ] || die "no /boot/vmlinuz-* in $deb"
	release=${vmlinuz##*/vmlinuz-}
	cp "$vmlinuz" "$out/vmlinuz"
	cp "$tmp/x/boot/config-$release" "$out/config"
	echo "$release" >"$out/release"
	echo "$pkg $version" >"$out/package"

	if [ "$want_map" = yes ]; then
		# The System.map in the image package is a one-line stub; the real
		# one is in the -dbg package (near the start of its data, so stop
		# early).
		log "extracting System.map from $(basename "$dbg")"
		local map=./usr/lib/debug/boot/System.map-$release
		set +o pipefail
		dpkg-deb --fsys-tarfile "$dbg" 2>/dev/null |
			tar -x -C "$tmp/x" --occurrence=1 "$map"
		set -o pipefail
		[ -s "$tmp/x/$map" ] || die "no $map in $dbg"
		grep -q ' T _text$' "$tmp/x/$map" || die "$map has no _text symbol"
		cp "$tmp/x/$map" "$out/System.map"
	fi
	rm -rf "$dl"

	log "extracting scripts/extract-vmlinux from $source_tar"
	tar -xJf "$source_tar" -C "$tmp/src" --occurrence=1 \
		linux-source-6.1/scripts/extract-vmlinux
	log "extracting vmlinux"
	bash "$tmp/src/linux-source-6.1/scripts/extract-vmlinux" "$out/vmlinuz" >"$out/vmlinux"

	readelf -h "$out/vmlinux" 2>/dev/null | grep -q 'Class:[[:space:]]*ELF64' ||
		die "extracted vmlinux is not an ELF64 file"
	readelf -S --wide "$out/vmlinux" | grep -q '[[:space:]]\.BTF[[:space:]]' ||
		die "extracted vmlinux has no .BTF section"

	if ! mv -T "$out" "$dest" 2>/dev/null; then
		complete "$dest" || die "cannot move the result to $dest"
		log "another fetch finished first; using it"
	fi
	log "stock kernel $release in $dest"
	echo "$dest"
}

main
