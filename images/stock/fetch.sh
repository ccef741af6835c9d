#!/usr/bin/env bash
# Fetch the stock, unmodified Debian cloud kernel (6.1) for introspection
# tests against a distribution kernel.
#
# Resolves the versioned package that the metapackage linux-image-cloud-amd64
# depends on, downloads it with `apt-get download` (no install), unpacks it
# with `dpkg-deb -x` and produces $CACHE/stock/<package version>/ with
#   vmlinuz     the boot image
#   vmlinux     ELF extracted from vmlinuz with the kernel's
#               scripts/extract-vmlinux (taken from linux-source-6.1);
#               checked to be an ELF file with a .BTF section
#   System.map  the real one, from the matching -dbg package (the image
#               package only holds a stub); only that file is extracted
#   config
#   release     the kernel release (uname -r), package: name and version
# CACHE is ${BACKDOORS_CACHE:-$HOME/.cache/backdoors}. An existing complete
# output for the same package version is reused. Progress goes to stderr; the
# LAST stdout line is the output directory.
set -euo pipefail

cache=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}
meta=linux-image-cloud-amd64
source_pkg=linux-source-6.1
source_tar=/usr/src/linux-source-6.1.tar.xz
packages=(apt dpkg binutils xz-utils gzip tar "$source_pkg")
outputs=(vmlinuz vmlinux System.map config release package)

log() { printf 'stock: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: images/stock/fetch.sh [--help]

Fetches the stock Debian kernel behind $meta and prints the output
directory as the last stdout line.
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

# The versioned kernel package the metapackage depends on.
resolve_image_package() {
	apt-cache depends "$meta" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

candidate_version() {
	apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }'
}

complete() {
	local d=$1 f
	for f in "${outputs[@]}"; do
		[ -s "$d/$f" ] || return 1
	done
}

main() {
	ensure_packages "${packages[@]}"

	local pkg version
	pkg=$(resolve_image_package)
	if [ -z "$pkg" ] && is_root; then
		log "apt has no package lists for $meta; running apt-get update"
		apt_update
		pkg=$(resolve_image_package)
	fi
	[ -n "$pkg" ] || die "cannot resolve the package behind $meta (apt-cache depends $meta); run apt-get update"
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
	dl=""
	trap 'rm -rf "$tmp" ${dl:+"$dl"}' EXIT
	local out=$tmp/out
	mkdir -p "$out" "$tmp/x" "$tmp/src"

	log "downloading $pkg=$version and $pkg-dbg=$version"
	# apt-get download runs as the sandbox user _apt when it can write there;
	# the cache under a private home is out of its reach, so use TMPDIR.
	dl=$(mktemp -d)
	chmod 0755 "$dl"
	if is_root && id _apt >/dev/null 2>&1; then
		chown _apt "$dl"
	fi
	(cd "$dl" && apt-get download "$pkg=$version" "$pkg-dbg=$version" >&2)
	local deb dbg
	deb=$(find "$dl" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
	dbg=$(find "$dl" -maxdepth 1 -name "${pkg}-dbg_*.deb" -print -quit)
	if [ -z "$deb" ] || [ -z "$dbg" ]; then
		die "apt-get download did not produce both .deb files"
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

	# The System.map in the image package is a one-line stub; the real one
	# is in the -dbg package (near the start of its data, so stop early).
	log "extracting System.map from $(basename "$dbg")"
	local map=./usr/lib/debug/boot/System.map-$release
	set +o pipefail
	dpkg-deb --fsys-tarfile "$dbg" 2>/dev/null |
		tar -x -C "$tmp/x" --occurrence=1 "$map"
	set -o pipefail
	[ -s "$tmp/x/$map" ] || die "no $map in $dbg"
	grep -q ' T _text$' "$tmp/x/$map" || die "$map has no _text symbol"
	cp "$tmp/x/$map" "$out/System.map"
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
