#!/usr/bin/env bash
# Make the per-run initrd of the SoftRoCE VM: the cached base image (images/rxe/build.sh,
# BD_RXE_INITRD in images.env) followed by an uncompressed cpio (newc) archive with
#   /opt/bd/bin/<name>        each BINARY (rdma-bridge and bd-verbs-check, built with
#                             --features verbs), debug info stripped
#   <the libraries they need> at the absolute paths ldd names, so they run unmodified
#   /opt/bd/run/...           the contents of RUN_DIR: run.env, bridge.toml, pki/, mem.raw
# Linux unpacks concatenated archives, each compressed or not, into one rootfs; the memory
# image stays uncompressed (unpacking gzip under TCG is slower than copying). Not cached: it
# runs for every test run. Progress goes to stderr; the LAST stdout line is the output file.
set -euo pipefail

log() { printf 'rxe-pack: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<USAGE
Usage: images/rxe/pack.sh --base FILE --run-dir DIR --out FILE BINARY...

Writes FILE: the SoftRoCE VM's base initramfs (--base, BD_RXE_INITRD of images.env) with
BINARY... at /opt/bd/bin/<name> (debug info stripped), the shared libraries they need, and
DIR's contents at /opt/bd/run/ appended. Boot it as the -initrd of BD_RXE_KERNEL.
Prints FILE as the last stdout line.
USAGE
}

base="" run_dir="" out=""
bins=()
while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--base | --run-dir | --out)
		if [ $# -lt 2 ] || [ -z "$2" ]; then
			log "$1 needs a value"
			usage >&2
			exit 2
		fi
		case "$1" in
		--base) base=$2 ;;
		--run-dir) run_dir=$2 ;;
		--out) out=$2 ;;
		esac
		shift 2
		;;
	-*)
		log "unknown option $1"
		usage >&2
		exit 2
		;;
	*)
		bins+=("$1")
		shift
		;;
	esac
done
if [ -z "$base" ] || [ -z "$run_dir" ] || [ -z "$out" ] || [ ${#bins[@]} -eq 0 ]; then
	usage >&2
	exit 2
fi
for tool in cpio ldd objcopy readlink; do
	command -v "$tool" >/dev/null || die "$tool not found (Debian packages: cpio libc-bin binutils coreutils)"
done
[ -s "$base" ] || die "base image $base does not exist; run images/build.sh"
[ -d "$run_dir" ] || die "run directory $run_dir does not exist"

out_dir=$(dirname "$out")
mkdir -p "$out_dir"
stage=$(mktemp -d "$out_dir/.pack.XXXXXX")
tmp_out=""
trap 'rm -rf "$stage" ${tmp_out:+"$tmp_out"}' EXIT
mkdir -p "$stage/opt/bd/bin"

# add_link ABS_PATH SOURCE: the archive gets SOURCE's content at ABS_PATH (the stage holds a
# symlink; cpio --dereference stores the file itself).
add_link() {
	local dest=$stage$1 src
	src=$(readlink -f "$2") || die "cannot resolve $2"
	[ -f "$src" ] || die "$2 is not a file"
	if [ -e "$dest" ] || [ -L "$dest" ]; then
		[ "$(readlink "$dest")" = "$src" ] && return 0
		die "two different files for $1: $(readlink "$dest") and $src"
	fi
	mkdir -p "$(dirname "$dest")"
	ln -s "$src" "$dest"
}

add_libraries() {
	local bin=$1 lddout line path
	lddout=$(ldd "$bin" 2>&1) || die "ldd $bin failed: $lddout"
	while IFS= read -r line; do
		case "$line" in
		*"=> not found"*) die "$bin needs ${line%% =>*}, which is not found" ;;
		*"=> /"*)
			path=${line#*=> }
			path=${path%% (*}
			;;
		*/*" (0x"*)
			path=${line#"${line%%[![:space:]]*}"}
			path=${path%% (*}
			;;
		*) continue ;;
		esac
		add_link "$path" "$path"
	done <<<"$lddout"
}

for bin in "${bins[@]}"; do
	[ -f "$bin" ] && [ -x "$bin" ] || die "binary $bin is not an executable file"
	name=$(basename "$bin")
	[ ! -e "$stage/opt/bd/bin/$name" ] || die "two binaries named $name"
	if [ "$(head -c4 "$bin" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
		objcopy --strip-debug "$bin" "$stage/opt/bd/bin/$name" || die "objcopy --strip-debug $bin failed"
		add_libraries "$bin"
	else
		cp "$bin" "$stage/opt/bd/bin/$name" # a script
	fi
	chmod 0755 "$stage/opt/bd/bin/$name"
done
mkdir -p "$stage/opt/bd/run"
cp -R "$run_dir/." "$stage/opt/bd/run/"

tmp_out=$(mktemp "$out_dir/.$(basename "$out").XXXXXX")
cp "$base" "$tmp_out"
# The kernel looks for an uncompressed archive at a 4-byte aligned offset only; zero bytes
# between archives are skipped.
size=$(stat -c %s "$tmp_out")
head -c $(((4 - size % 4) % 4)) /dev/zero >>"$tmp_out"
(
	cd "$stage"
	find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
		cpio --create --format=newc --dereference --owner=0:0 --reproducible --quiet
) >>"$tmp_out"
chmod 0644 "$tmp_out"
mv -f "$tmp_out" "$out"
tmp_out=""
log "wrote $out ($(du -h "$out" | cut -f1), ${#bins[@]} binaries)"
echo "$out"
