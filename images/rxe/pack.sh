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
# shellcheck source=images/lib/stage.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/stage.sh"

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
trap 'rm -rf "$stage"' EXIT

stage_binaries "$stage" "${bins[@]}"
mkdir -p "$stage/opt/bd/run"
cp -R "$run_dir/." "$stage/opt/bd/run/"

append_archive "$base" "$stage" "$out"
log "wrote $out ($(du -h "$out" | cut -f1), ${#bins[@]} binaries)"
echo "$out"
