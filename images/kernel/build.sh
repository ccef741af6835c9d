#!/usr/bin/env bash
# Build the Backdoors guest kernel: Debian's Linux 6.1 source + guest-kernel-patches/series,
# configured with microvm.config on top of allnoconfig.
#
# Usage: images/kernel/build.sh [--jobs N] [--variant patched|nosb|rxe]
#
# --variant nosb builds the same sources with `# CONFIG_BACKDOOR_SENSOR_BOX is not set`, for
# measuring what the Sensor Box costs; the default variant `patched` is the guest kernel.
# --variant rxe builds the same sources with microvm.config + rxe.config (IPv4/IPv6, network
# namespaces, veth, InfiniBand core + uverbs, Soft-RoCE), the kernel of the SoftRoCE test VM.
#
# Everything lives under the cache, never in the checkout:
#   $CACHE/kernel/src-<pkgver>/             pristine source as a git repo (tag `pristine`), patched per build
#   $CACHE/kernel/build-<pkgver>/           out-of-tree build dir (make O=...), kept between runs
#   $CACHE/kernel/build-<pkgver>-nosb/      the same for --variant nosb
#   $CACHE/kernel/build-<pkgver>-rxe/       the same for --variant rxe (seeded from the patched one)
#   $CACHE/kernel/out/patched-<key16>/      results: bzImage vmlinux System.map config manifest.txt
#   $CACHE/kernel/out/nosb-<key16>/         the same for --variant nosb
#   $CACHE/kernel/out/rxe-<key16>/          the same for --variant rxe
#   $CACHE/kernel/build.log                 log of the last real build
# CACHE is ${BACKDOORS_CACHE:-$HOME/.cache/backdoors}.
#
# <key16> is the first 16 hex digits of a sha256 over every input (see key_inputs), so an
# unchanged input set is never rebuilt. Progress goes to stderr; the last (and only) line on
# stdout is the output directory.
set -euo pipefail

# Keep stdout for the result path alone: everything else the script or its tools print goes
# to stderr. fd 3 is the real stdout.
exec 3>&1 1>&2

# ---------------------------------------------------------------------------------------------
# Constants and paths
# ---------------------------------------------------------------------------------------------
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
KERNEL_DIR=$(dirname "$SCRIPT_PATH")
REPO_ROOT=$(cd "$KERNEL_DIR/../.." && pwd)
FRAGMENT=$KERNEL_DIR/microvm.config
RXE_FRAGMENT=$KERNEL_DIR/rxe.config
PATCH_DIR=$REPO_ROOT/guest-kernel-patches
SERIES=$PATCH_DIR/series

SOURCE_PKG=linux-source-6.1
SOURCE_TARBALL=/usr/src/linux-source-6.1.tar.xz
BUILD_DEPS=(linux-source-6.1 bc bison flex libelf-dev libssl-dev dwarves cpio xz-utils git make
    gcc binutils python3 rsync kmod)
OUTPUT_FILES=(bzImage vmlinux System.map config manifest.txt)

CACHE=${BACKDOORS_CACHE:-${HOME:?HOME is not set; set BACKDOORS_CACHE}/.cache/backdoors}
WORK=$CACHE/kernel
LOG=$WORK/build.log

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
log() { printf '[kernel] %s\n' "$*" >&2; }
die() { printf '[kernel] error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
Usage: $0 [--jobs N] [--variant patched|nosb|rxe]
Builds the Backdoors guest kernel (or reuses a cached build) and prints the output directory.
  --jobs N          parallel make jobs (default: nproc = $(nproc))
  --variant patched the guest kernel (default)
  --variant nosb    the same sources with CONFIG_BACKDOOR_SENSOR_BOX off (cost benchmark only)
  --variant rxe     the same sources plus rxe.config: networking + Soft-RoCE (SoftRoCE test VM)
Cache root: \${BACKDOORS_CACHE:-\$HOME/.cache/backdoors} (now: $CACHE)
EOF
}

sha256_of() { sha256sum <"$1" | cut -d' ' -f1; }

# Run a command with its output appended to the build log; on failure show the log's tail.
run_logged() {
    printf '\n$ %s\n' "$*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        log "command failed: $*"
        log "last lines of $LOG:"
        tail -n 40 "$LOG" >&2
        exit 1
    fi
}

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

# Install missing Debian build dependencies (root only; otherwise say what is missing).
ensure_deps() {
    command -v dpkg >/dev/null || die "dpkg not found: this script expects a Debian(-based) host"
    local missing=() pkg
    for pkg in "${BUILD_DEPS[@]}"; do
        # dpkg -s also succeeds for removed packages whose config files remain: check Status.
        [[ $(dpkg -s "$pkg" 2>/dev/null) == *'Status: install ok installed'* ]] || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    if ((EUID != 0)); then
        die "missing build dependencies: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
    fi
    log "installing build dependencies: ${missing[*]}"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
}

# Fill PATCHES with the series entries: one file name per line, relative to
# guest-kernel-patches/; blank lines and `#` comments are ignored. An empty series is fine.
read_series() {
    PATCHES=()
    [[ -f $SERIES ]] || die "series file not found: $SERIES"
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%%#*}                                   # drop comments
        line=${line#"${line%%[![:space:]]*}"}              # trim leading blanks
        line=${line%"${line##*[![:space:]]}"}              # trim trailing blanks
        [[ -n $line ]] || continue
        [[ -f $PATCH_DIR/$line ]] || die "series lists '$line' but $PATCH_DIR/$line does not exist"
        PATCHES+=("$line")
    done <"$SERIES"
}

# Everything that determines the result, one line each. The build key is the sha256 of this
# text; it is also written into manifest.txt.
key_inputs() {
    local p
    [[ $VARIANT == patched ]] || printf 'variant %s\n' "$VARIANT"
    printf 'source-package %s %s\n' "$SOURCE_PKG" "$PKG_VERSION"
    printf 'microvm.config %s\n' "$(sha256_of "$FRAGMENT")"
    [[ $VARIANT != rxe ]] || printf 'rxe.config %s\n' "$(sha256_of "$RXE_FRAGMENT")"
    printf 'build.sh %s\n' "$(sha256_of "$SCRIPT_PATH")"
    printf 'series %s\n' "$(sha256_of "$SERIES")"
    for p in "${PATCHES[@]}"; do
        printf 'patch %s %s\n' "$(sha256_of "$PATCH_DIR/$p")" "$p"
    done
    printf 'gcc %s\n' "$(gcc --version | sed -n 1p)"
    printf 'pahole %s\n' "$(pahole --version)"
}

outputs_complete() {
    local f
    for f in "${OUTPUT_FILES[@]}"; do
        [[ -s $1/$f ]] || return 1
    done
}

# ---------------------------------------------------------------------------------------------
# Source tree
# ---------------------------------------------------------------------------------------------

# Extract the Debian source once and commit it, tagged `pristine`. Extraction happens in a
# temporary directory that is renamed at the end, so an interrupted run leaves nothing half-made.
prepare_source() {
    if [[ -d $SRC/.git ]] && git -C "$SRC" rev-parse -q --verify refs/tags/pristine >/dev/null; then
        return 0
    fi
    local tmp=$SRC.tmp
    rm -rf "$SRC" "$tmp"
    mkdir -p "$tmp"
    log "extracting $SOURCE_TARBALL (once per package version)"
    run_logged tar -xJf "$SOURCE_TARBALL" -C "$tmp" --strip-components=1
    log "recording the pristine tree in git"
    run_logged git -C "$tmp" init -q -b build
    # Identity and settings for this repository only.
    git -C "$tmp" config user.name "Backdoors kernel build"
    git -C "$tmp" config user.email "kernel-build@backdoors.invalid"
    git -C "$tmp" config commit.gpgsign false
    git -C "$tmp" config core.autocrlf false
    git -C "$tmp" config gc.auto 0
    # -f: take files that the kernel's .gitignore would skip too, so the commit is the tarball.
    run_logged git -C "$tmp" add -A -f .
    run_logged git -C "$tmp" commit -q -m "Linux $PKG_VERSION ($SOURCE_PKG, pristine)"
    run_logged git -C "$tmp" tag pristine
    mv -T "$tmp" "$SRC"
}

# make decides what to recompile from mtimes. Resetting to pristine and re-applying the series
# rewrites every patched file, even one whose content ends up exactly as in the last build,
# and a patched header would then recompile most of the kernel. So: before the reset, note the
# content hash and mtime of every file that differs from pristine; after the patches are
# applied, give back the old mtime to each of those files whose content is unchanged.
snapshot_patched_files() {
    local f
    git -C "$SRC" diff --name-only -z pristine -- | while IFS= read -r -d '' f; do
        [[ -f $SRC/$f ]] || continue
        printf '%s %s %s\0' "$(git -C "$SRC" hash-object -- "$f")" "$(stat -c %.9Y -- "$SRC/$f")" "$f"
    done >"$MTIME_SNAPSHOT"
}

restore_unchanged_mtimes() {
    local hash mtime f kept=0
    while IFS=' ' read -r -d '' hash mtime f; do
        [[ -f $SRC/$f ]] || continue
        [[ $(git -C "$SRC" hash-object -- "$f") == "$hash" ]] || continue
        touch -m -d "@$mtime" -- "$SRC/$f"
        kept=$((kept + 1))
    done <"$MTIME_SNAPSHOT"
    ((kept == 0)) || log "$kept patched file(s) unchanged since the last build keep their mtime"
}

apply_patches() {
    snapshot_patched_files
    log "resetting the source tree to pristine"
    # A run killed in the middle of `git am` leaves its state behind; drop it.
    if [[ -d $SRC/.git/rebase-apply ]]; then
        git -C "$SRC" am --abort >>"$LOG" 2>&1 || rm -rf "$SRC/.git/rebase-apply"
    fi
    run_logged git -C "$SRC" reset -q --hard pristine
    run_logged git -C "$SRC" clean -fdxq
    local p
    for p in "${PATCHES[@]}"; do
        log "applying $p"
        printf '\n$ git am %s\n' "$PATCH_DIR/$p" >>"$LOG"
        if ! git -C "$SRC" am -q "$PATCH_DIR/$p" >>"$LOG" 2>&1; then
            git -C "$SRC" am --abort >>"$LOG" 2>&1 || true
            # git's hints about --continue/--skip do not apply: the am was aborted.
            tail -n 20 "$LOG" | grep -v '^hint:' >&2 || true
            die "patch '$p' (guest-kernel-patches/$p) does not apply to $SOURCE_PKG $PKG_VERSION"
        fi
    done
    restore_unchanged_mtimes
}

# ---------------------------------------------------------------------------------------------
# Configure and build
# ---------------------------------------------------------------------------------------------

# --variant nosb: the fragment with the Sensor Box switched off, written to $WORK/microvm-nosb.config.
# The configure check then verifies the `is not set` line like any other.
make_nosb_fragment() {
    local on='CONFIG_BACKDOOR_SENSOR_BOX=y' off='# CONFIG_BACKDOOR_SENSOR_BOX is not set'
    grep -qxF -- "$on" "$FRAGMENT" || die "$FRAGMENT has no line '$on' to switch off for --variant nosb"
    sed "s/^$on\$/$off/" "$FRAGMENT" >"$WORK/microvm-nosb.config"
    FRAGMENT=$WORK/microvm-nosb.config
}

# --variant rxe: microvm.config followed by rxe.config, written to $WORK/microvm-rxe.config
# and verified line by line like the plain fragment.
make_rxe_fragment() {
    [[ -f $RXE_FRAGMENT ]] || die "$RXE_FRAGMENT not found (needed by --variant rxe)"
    cat "$FRAGMENT" "$RXE_FRAGMENT" >"$WORK/microvm-rxe.config"
    FRAGMENT=$WORK/microvm-rxe.config
}

# A variant's first build starts from a copy of the patched build directory (mtimes kept):
# kbuild then recompiles only what the changed options touch instead of the whole kernel.
seed_variant_build() {
    local base=$WORK/build-$PKG_VERSION
    [[ $VARIANT != patched && ! -e $BUILD/.config && -f $base/.config ]] || return 0
    log "seeding $BUILD from $base (first build of this variant)"
    rm -rf "$BUILD" "$BUILD.tmp"
    run_logged cp -a --reflink=auto "$base" "$BUILD.tmp"
    mv -T "$BUILD.tmp" "$BUILD"
}

kmake() {
    run_logged make -C "$SRC" O="$BUILD" \
        KBUILD_BUILD_USER=backdoors KBUILD_BUILD_HOST=builder "$@"
}

# allnoconfig with the fragment forced in (KCONFIG_ALLCONFIG), then check that every line of
# the fragment survived: Kconfig silently drops values whose dependencies are not met.
configure() {
    log "configuring: allnoconfig + $(basename "$FRAGMENT")"
    kmake KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig
    local cfg=$BUILD/.config line sym got bad=0
    while IFS= read -r line || [[ -n $line ]]; do
        case $line in
        CONFIG_*=*)
            grep -qxF -- "$line" "$cfg" && continue
            sym=${line%%=*}
            ;;
        '# CONFIG_'*' is not set')
            sym=${line#'# '}
            sym=${sym%' is not set'}
            grep -q "^$sym=" "$cfg" || continue
            ;;
        *) continue ;;
        esac
        got=$(grep -E "^$sym=|^# $sym is not set" "$cfg" || echo "absent")
        log "config option not applied: wanted '$line', got '$got'"
        bad=1
    done <"$FRAGMENT"
    ((bad == 0)) || die "microvm.config asks for options the final .config does not have (see above)"
    log "all $(grep -cE '^CONFIG_|^# CONFIG_.* is not set' "$FRAGMENT") requested options are set"
}

# A whole build of the patched kernel's configuration compiles about this many objects (1,297
# .o files on 2026-12-03); a progress line of a first build counts against it.
FULL_BUILD_OBJECTS=1300
# Seconds between progress lines of a kernel build.
PROGRESS_EVERY=${KERNEL_PROGRESS_EVERY:-30}

build_kernel() {
    log "building vmlinux + bzImage with $JOBS jobs (log: $LOG)"
    local start=$SECONDS total="" last="" stats=$WORK/last-build-$VARIANT.txt from pid
    # A build directory without objects is a whole build: count against the whole; otherwise make
    # recompiles what changed, an unknown part of it.
    find "$BUILD" -name '*.o' -print -quit 2>/dev/null | grep -q . || total=$FULL_BUILD_OBJECTS
    [[ -f $stats ]] && last=$(<"$stats")
    touch "$LOG"
    from=$(($(wc -l <"$LOG") + 1))
    kmake -j"$JOBS" vmlinux bzImage &
    pid=$!
    local ticks=0 objs
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        ((++ticks % PROGRESS_EVERY == 0)) || continue
        objs=$(tail -n +"$from" "$LOG" | grep -cE '^ +(CC|AS) ' || true)
        log "kernel build: $objs${total:+ of ~$total} objects compiled, $((SECONDS - start)) s${last:+ (last build of this variant: $last)}"
    done
    wait "$pid" || exit 1
    objs=$(tail -n +"$from" "$LOG" | grep -cE '^ +(CC|AS) ' || true)
    printf '%s objects in %s s\n' "$objs" "$((SECONDS - start))" >"$stats"
    log "make finished in $((SECONDS - start)) s ($objs objects compiled)"
}

# Copy the results into a temporary directory next to the final one, check them, then rename.
install_outputs() {
    local tmp=$OUT_ROOT/.tmp-$KEY16-$$
    TMP_OUT=$tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"

    cp "$BUILD/arch/x86/boot/bzImage" "$tmp/bzImage"
    cp "$BUILD/System.map" "$tmp/System.map"
    cp "$BUILD/.config" "$tmp/config"
    # DWARF is only needed to generate BTF; .BTF is an allocated section, so --strip-debug keeps
    # it, together with the symbol table and the ELF notes (PVH entry point). The .rela.*
    # sections (kept by --emit-relocs for the bzImage relocation table) serve nobody who loads
    # or reads this ELF, so they go too. The full vmlinux stays in the build directory.
    run_logged objcopy --strip-debug --remove-relocations='*' "$BUILD/vmlinux" "$tmp/vmlinux"

    # Check what the VMM and introspection rely on.
    local sections
    sections=$(readelf -S --wide "$tmp/vmlinux")
    grep -q ' \.BTF ' <<<"$sections" || die "stripped vmlinux has no .BTF section"
    grep -q ' \.symtab ' <<<"$sections" || die "stripped vmlinux has no symbol table"
    objcopy -O binary --only-section=.BTF "$BUILD/vmlinux" "$tmp/.btf.orig"
    objcopy -O binary --only-section=.BTF "$tmp/vmlinux" "$tmp/.btf.stripped"
    cmp -s "$tmp/.btf.orig" "$tmp/.btf.stripped" || die ".BTF changed while stripping vmlinux"
    rm -f "$tmp/.btf.orig" "$tmp/.btf.stripped"
    # XEN_ELFNOTE_PHYS32_ENTRY is note type 18 (0x12) with owner "Xen".
    readelf -n "$tmp/vmlinux" | grep -qE '^\s+Xen\s.*(0x00000012|PHYS32_ENTRY)' ||
        die "vmlinux lacks the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
    grep -qE ' (linux_banner|init_task)$' "$tmp/System.map" || die "System.map looks incomplete"

    {
        printf 'key %s\n' "$KEY"
        printf 'key16 %s\n' "$KEY16"
        printf 'variant %s\n' "$VARIANT"
        printf 'kernel-release %s\n' "$(cat "$BUILD/include/config/kernel.release")"
        printf 'built-at %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        printf 'patches-applied %d\n' "${#PATCHES[@]}"
        printf '%s\n' "--- key inputs ---"
        printf '%s\n' "$KEY_INPUTS"
    } >"$tmp/manifest.txt"

    rm -rf "$OUT"
    mv -T "$tmp" "$OUT"
    TMP_OUT=
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
JOBS=$(nproc)
VARIANT=patched
while (($# > 0)); do
    case $1 in
    --jobs)
        (($# >= 2)) || die "--jobs needs a value"
        JOBS=$2
        shift 2
        ;;
    --jobs=*)
        JOBS=${1#--jobs=}
        shift
        ;;
    --variant)
        (($# >= 2)) || die "--variant needs a value"
        VARIANT=$2
        shift 2
        ;;
    --variant=*)
        VARIANT=${1#--variant=}
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage
        die "unknown argument: $1"
        ;;
    esac
done
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs wants a positive integer, got '$JOBS'"
[[ $VARIANT == patched || $VARIANT == nosb || $VARIANT == rxe ]] ||
    die "--variant wants patched, nosb or rxe, got '$VARIANT'"

mkdir -p "$WORK"
case "$(readlink -f "$CACHE")/" in
"$REPO_ROOT"/*) die "cache $CACHE is inside the checkout; point BACKDOORS_CACHE elsewhere" ;;
esac

ensure_deps
[[ -f $SOURCE_TARBALL ]] || die "$SOURCE_TARBALL not found (package $SOURCE_PKG)"
PKG_VERSION=$(dpkg-query -W -f='${Version}' "$SOURCE_PKG")
read_series
KEY_INPUTS=$(key_inputs)
KEY=$(sha256sum <<<"$KEY_INPUTS" | cut -d' ' -f1)
KEY16=${KEY:0:16}
OUT_ROOT=$WORK/out
OUT=$OUT_ROOT/$VARIANT-$KEY16

# Fast path: these exact inputs were built before.
if outputs_complete "$OUT"; then
    log "up to date: $OUT"
    echo "$OUT" >&3
    exit 0
fi

# One build at a time per cache; re-check after waiting, another run may have built it.
exec 9>"$WORK/.lock"
if ! flock -n 9; then
    log "another kernel build holds $WORK/.lock; waiting"
    flock 9
fi
if outputs_complete "$OUT"; then
    log "up to date: $OUT"
    echo "$OUT" >&3
    exit 0
fi

SRC=$WORK/src-$PKG_VERSION
BUILD=$WORK/build-$PKG_VERSION
[[ $VARIANT == patched ]] || BUILD=$BUILD-$VARIANT
MTIME_SNAPSHOT=$WORK/.patched-mtimes
TMP_OUT=
trap '[[ -z ${TMP_OUT:-} ]] || rm -rf "$TMP_OUT"' EXIT
mkdir -p "$OUT_ROOT"
: >"$LOG"
seed_variant_build
mkdir -p "$BUILD"
log "building kernel $VARIANT-$KEY16 (${#PATCHES[@]} patch(es)); cache $WORK"
TOTAL_START=$SECONDS

prepare_source
apply_patches
[[ $VARIANT != nosb ]] || make_nosb_fragment
[[ $VARIANT != rxe ]] || make_rxe_fragment
configure
build_kernel
install_outputs

log "done in $((SECONDS - TOTAL_START)) s: $OUT"
echo "$OUT" >&3
