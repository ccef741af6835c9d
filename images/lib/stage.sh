# shellcheck shell=bash
# Shared by the image scripts that put host binaries into an initramfs (images/rxe/build.sh,
# images/rxe/pack.sh, images/kvmhost/pack.sh). Source it after defining die(); nothing runs
# on sourcing.

# ldd_paths FILE: the absolute path of every shared object ldd lists for FILE, one per line
# (nothing for a static executable). A library that is not found, or a line that cannot be
# read, is an error.
ldd_paths() {
	local file=$1 lddout line path
	if ! lddout=$(ldd "$file" 2>&1); then
		case "$lddout" in
		*"not a dynamic executable"* | *"statically linked"*) return 0 ;;
		*) die "ldd $file failed: $lddout" ;;
		esac
	fi
	while IFS= read -r line; do
		case "$line" in
		*"=> not found"*) die "$file needs ${line%% =>*}, which is not found: ${line#"${line%%[![:space:]]*}"}" ;;
		*"=> /"*)
			path=${line#*=> }
			path=${path%% (*}
			;;
		*/*" (0x"*)
			path=${line#"${line%%[![:space:]]*}"}
			path=${path%% (*}
			;;
		*) continue ;; # linux-vdso.so.1, "statically linked"
		esac
		case "$path" in
		/*) printf '%s\n' "$path" ;;
		*) die "ldd $file: cannot parse '$line'" ;;
		esac
	done <<<"$lddout"
}

# stage_link STAGE ABS_PATH SOURCE: the archive made from STAGE gets SOURCE's content at
# ABS_PATH. The stage holds a symlink; `cpio --dereference` stores the file itself.
stage_link() {
	local dest=$1$2 src
	src=$(readlink -f "$3") || die "cannot resolve $3"
	[ -f "$src" ] || die "$3 is not a file"
	if [ -e "$dest" ] || [ -L "$dest" ]; then
		[ "$(readlink "$dest")" = "$src" ] && return 0
		die "two different files for $2: $(readlink "$dest") and $src"
	fi
	mkdir -p "$(dirname "$dest")"
	ln -s "$src" "$dest"
}

# stage_binaries STAGE BINARY...: each BINARY at STAGE/opt/bd/bin/<name> (an ELF file with its
# debug info stripped and every library it needs staged at the path ldd names; a script as
# it is).
stage_binaries() {
	local stage=$1 bin name dest lib libs
	shift
	mkdir -p "$stage/opt/bd/bin"
	for bin in "$@"; do
		[ -e "$bin" ] || die "binary $bin does not exist"
		if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
			die "binary $bin is not an executable file"
		fi
		name=$(basename "$bin")
		dest=$stage/opt/bd/bin/$name
		[ ! -e "$dest" ] || die "two binaries named $name"
		if [ "$(head -c4 "$bin" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
			objcopy --strip-debug "$bin" "$dest" || die "objcopy --strip-debug $bin failed"
			libs=$(ldd_paths "$bin") || exit 1
			while IFS= read -r lib; do
				[ -n "$lib" ] && stage_link "$stage" "$lib" "$lib"
			done <<<"$libs"
		else
			cp "$bin" "$dest"
		fi
		chmod 0755 "$dest"
	done
}

# append_archive BASE STAGE OUT: OUT becomes BASE followed by an uncompressed cpio (newc) of
# STAGE, written under a temporary name and renamed into place. The kernel looks for an
# uncompressed archive at a 4-byte aligned offset only; zero bytes between archives are
# skipped.
append_archive() {
	local base=$1 stage=$2 out=$3 tmp size
	tmp=$(mktemp "$(dirname "$out")/.$(basename "$out").XXXXXX")
	if ! {
		cp "$base" "$tmp" &&
			size=$(stat -c %s "$tmp") &&
			head -c $(((4 - size % 4) % 4)) /dev/zero >>"$tmp" &&
			(
				cd "$stage" &&
					find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
					cpio --create --format=newc --dereference --owner=0:0 --reproducible --quiet
			) >>"$tmp" &&
			chmod 0644 "$tmp" &&
			mv -f "$tmp" "$out"
	}; then
		rm -f "$tmp"
		die "cannot write $out"
	fi
}
