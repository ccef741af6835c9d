# shellcheck shell=bash
# Shared by the image scripts that write an initramfs without root (images/kvmhost/build.sh,
# images/bootinitrd/build.sh): device nodes as cpio entries, no mknod needed. Nothing runs on
# sourcing.

# newc_entry NAME MODE(octal incl. type) RDEVMAJOR RDEVMINOR INODE: one cpio "newc" entry with
# no data (a device node) on stdout.
newc_entry() {
	local name=$1 mode=$2 major=$3 minor=$4 ino=$5
	local namesize=$((${#name} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$ino" "$((8#$mode))" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
	printf '%s\0' "$name"
	local pad=$(((4 - (110 + namesize) % 4) % 4))
	head -c "$pad" /dev/zero
}

# device_nodes_archive: a tiny archive with /dev/console and /dev/null, to append to the main
# one. /dev/console must exist before anything is mounted: the kernel opens it for /init's
# stdin, stdout and stderr.
device_nodes_archive() {
	newc_entry dev/console 020600 5 1 900001
	newc_entry dev/null 020666 1 3 900002
	newc_entry TRAILER!!! 0 0 0 0
}
