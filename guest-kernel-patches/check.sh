#!/usr/bin/env bash
# Check every patch listed in `series` with the kernel's own `scripts/checkpatch.pl --strict`.
#
# Usage: guest-kernel-patches/check.sh [KERNEL_SOURCE_DIR]
#
# KERNEL_SOURCE_DIR defaults to the source tree that images/kernel/build.sh keeps in the cache,
# $CACHE/kernel/src-<pkgver> (CACHE=${BACKDOORS_CACHE:-$HOME/.cache/backdoors}); run
# images/kernel/build.sh once to create it. Exits non-zero if any patch has an ERROR or a
# WARNING; CHECKs are printed but do not fail the run.
set -euo pipefail

PATCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERIES=$PATCH_DIR/series
CACHE=${BACKDOORS_CACHE:-${HOME:?HOME is not set; set BACKDOORS_CACHE}/.cache/backdoors}

die() { printf 'check.sh: %s\n' "$*" >&2; exit 2; }

if (($# > 0)); then
    SRC=$1
else
    SRC=$(find "$CACHE/kernel" -maxdepth 1 -type d -name 'src-*' 2>/dev/null | sort -V | tail -n 1)
    [[ -n $SRC ]] || die "no kernel source under $CACHE/kernel; run images/kernel/build.sh first"
fi
CHECKPATCH=$SRC/scripts/checkpatch.pl
[[ -f $CHECKPATCH ]] || die "$CHECKPATCH not found"

# checkpatch runs scripts/spdxcheck.py with the first python3 on PATH, which needs the python
# modules ply and git (Debian: python3-ply python3-git); prefer the system interpreter.
export PATH=/usr/bin:$PATH
python3 -c 'import ply, git' 2>/dev/null ||
    printf 'check.sh: note: python3 lacks ply/git (apt-get install python3-ply python3-git); SPDX tags are not checked\n' >&2

# Same series syntax as images/kernel/build.sh: one file per line, blank lines and # comments
# ignored.
PATCHES=()
while IFS= read -r line || [[ -n $line ]]; do
    line=${line%%#*}
    line=${line#"${line%%[![:space:]]*}"}
    line=${line%"${line##*[![:space:]]}"}
    [[ -n $line ]] || continue
    [[ -f $PATCH_DIR/$line ]] || die "series lists '$line' but $PATCH_DIR/$line does not exist"
    PATCHES+=("$line")
done <"$SERIES"

failed=0
for p in "${PATCHES[@]}"; do
    # checkpatch must run from the top of the kernel tree to find its data files.
    out=$(cd "$SRC" && perl scripts/checkpatch.pl --strict --no-color --showfile "$PATCH_DIR/$p" 2>&1) || true
    summary=$(grep -E '^total: [0-9]+ errors, [0-9]+ warnings, [0-9]+ checks' <<<"$out" | tail -n 1)
    [[ -n $summary ]] || { printf '%s\n' "$out"; die "checkpatch gave no summary for $p"; }
    read -r errors warnings checks < <(sed -E 's/^total: ([0-9]+) errors, ([0-9]+) warnings, ([0-9]+) checks.*/\1 \2 \3/' <<<"$summary")
    if ((errors + warnings > 0)); then
        printf '%s\n' "$out"
        printf 'FAIL %s: %s\n\n' "$p" "$summary"
        failed=1
    elif ((checks > 0)); then
        printf '%s\n' "$out"
        printf 'ok   %s: %s\n\n' "$p" "$summary"
    else
        printf 'ok   %s: %s\n' "$p" "$summary"
    fi
done
((${#PATCHES[@]} > 0)) || printf 'series is empty: nothing to check\n'
exit "$failed"
