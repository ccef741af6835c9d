# shellcheck shell=bash
# Shared by the image scripts that take kernel modules from the stock Debian kernel package
# (images/kvmhost/build.sh, images/bootinitrd/build.sh). Source it after defining log() and
# die(); nothing runs on sourcing.
#
# The package is downloaded with `apt-get download` (nothing is installed), unpacked with
# `dpkg-deb -x`, and a modules.dep is made with `depmod -b` (the package has none: its
# postinst runs depmod). The wanted modules and everything they depend on are then copied,
# decompressed, in load order (dependencies first).

# kmod_extract_package PKG VERSION RELEASE DIR: unpack PKG=VERSION into DIR and run depmod
# over it; sets kmod_moddir to DIR's lib/modules/RELEASE.
kmod_moddir=""
kmod_extract_package() {
	local pkg=$1 version=$2 release=$3 x=$4 dl deb base
	log "downloading $pkg=$version"
	# apt-get download runs as the sandbox user _apt when it can write there; a cache under
	# a private home is out of its reach, so use TMPDIR.
	dl=$(mktemp -d)
	chmod 0755 "$dl"
	if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then
		chown _apt "$dl"
	fi
	if ! (cd "$dl" && apt-get download "$pkg=$version" >&2); then
		rm -rf "$dl"
		die "apt-get download $pkg=$version failed (is the network up, and apt-get update done?)"
	fi
	deb=$(find "$dl" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
	if [ -z "$deb" ]; then
		rm -rf "$dl"
		die "apt-get download did not produce ${pkg}_*.deb"
	fi
	mkdir -p "$x"
	if ! dpkg-deb -x "$deb" "$x"; then
		rm -rf "$dl"
		die "dpkg-deb -x $deb failed"
	fi
	rm -rf "$dl"
	for base in "$x" "$x/usr"; do
		[ -d "$base/lib/modules/$release" ] && break
	done
	kmod_moddir=$base/lib/modules/$release
	[ -d "$kmod_moddir/kernel" ] || die "no lib/modules/$release/kernel in $pkg=$version"
	log "depmod over the package's modules"
	depmod -b "$base" "$release" || die "depmod -b $base $release failed"
}

# kmod_name PATH: module name of a path in modules.dep: basename without .ko[.xz|.zst|.gz],
# '-' as '_'.
kmod_name() {
	local n=${1##*/}
	n=${n%%.ko*}
	echo "${n//-/_}"
}

# Filled by kmod_resolve: the load order (dependencies first), paths relative to the module
# directory as modules.dep spells them (possibly compressed).
declare -A kmod_deps=() kmod_path=() kmod_state=()
kmod_load_order=()

# kmod_visit PATH: depth-first, dependencies first. modules.dep lists the full closure of
# each module's dependencies, so any order of the list works.
kmod_visit() {
	local p=$1 d
	case "${kmod_state[$p]:-}" in
	visited) return 0 ;;
	visiting) die "dependency cycle at $p" ;;
	esac
	kmod_state[$p]=visiting
	for d in ${kmod_deps[$p]}; do
		[ -n "${kmod_deps[$d]+x}" ] || die "$p depends on $d, which modules.dep does not list"
		kmod_visit "$d"
	done
	kmod_state[$p]=visited
	kmod_load_order+=("$p")
}

# kmod_resolve MODDIR "REQUIRED..." "OPTIONAL...": fill kmod_load_order from MODDIR/modules.dep
# (names as `modinfo` spells them; '-' and '_' are the same). A required module that is
# neither a .ko nor built in is an error; an optional one that is missing is skipped. A
# built-in module is skipped with a note.
kmod_resolve() {
	local moddir=$1 line p deps name key optional
	local -a required optional_list
	read -r -a required <<<"$2"
	read -r -a optional_list <<<"${3:-}"
	while IFS= read -r line; do
		p=${line%%:*}
		deps=${line#*:}
		kmod_deps[$p]=$deps
		kmod_path[$(kmod_name "$p")]=$p
	done <"$moddir/modules.dep"
	[ ${#kmod_deps[@]} -gt 0 ] || die "empty modules.dep in $moddir"

	for name in "${required[@]}" "${optional_list[@]}"; do
		key=${name//-/_}
		optional=no
		case " ${optional_list[*]} " in *" $name "*) optional=yes ;; esac
		if [ -n "${kmod_path[$key]:-}" ]; then
			kmod_visit "${kmod_path[$key]}"
		elif grep -Eq "(^|/)${name//[-_]/[-_]}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
			log "  $name is built into the kernel"
		elif [ "$optional" = yes ]; then
			log "  $name (optional) is not in this kernel; skipped"
		else
			die "module $name is neither a module nor built into this kernel"
		fi
	done
	[ ${#kmod_load_order[@]} -gt 0 ] || die "no modules resolved"
}

# kmod_install SRC DEST: copy a module, decompressing it if needed.
kmod_install() {
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

# kmod_install_all MODDIR ROOT RELEASE LIST: copy every module of kmod_load_order to
# ROOT/lib/modules/RELEASE/<path>.ko and write the load order (those relative paths, one per
# line) to LIST.
kmod_install_all() {
	local moddir=$1 root=$2 release=$3 list=$4 p rel order=()
	for p in "${kmod_load_order[@]}"; do
		rel=${p%.ko*}.ko
		kmod_install "$moddir/$p" "$root/lib/modules/$release/$rel"
		order+=("$rel")
	done
	mkdir -p "$(dirname "$list")"
	printf '%s\n' "${order[@]}" >"$list"
	log "modules (load order): $(printf '%s ' "${order[@]##*/}")"
}
