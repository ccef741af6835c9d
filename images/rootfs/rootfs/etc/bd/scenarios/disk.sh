#!/bin/sh
# Scenario disk (root filesystem image only): the disks as the guest sees them, and a file that
# must survive a reboot. The first boot writes /var/lib/bd/disk-mark and reboots the guest; the
# next boot finds it and powers off. Before the reboot and the poweroff it waits (at most 300 s) until a
# client outside sets the redis key bd:disk-go, so a test can talk to the guest first. If a second disk /dev/vdb exists, it is expected read-only:
# its first 16 bytes are printed and a write to it must fail.
#   DISK vda size=<sectors> ro=<0|1>      one line per virtio disk
#   DISK vdb head=<text> write=refused|ALLOWED
#   DISK wrote <mark>                     first boot (then reboot)
#   DISK found <mark>                     second boot (then poweroff)
for d in /sys/block/vd*; do
	[ -e "$d" ] || continue
	echo "DISK ${d##*/} size=$(cat "$d/size") ro=$(cat "$d/ro")"
done
if [ -b /dev/vdb ]; then
	head=$(dd if=/dev/vdb bs=16 count=1 2>/dev/null | tr -dc 'A-Za-z0-9 _-')
	if echo overwrite | dd of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
		echo "DISK vdb head=$head write=ALLOWED"
	else
		echo "DISK vdb head=$head write=refused"
	fi
fi
# wait_go: until bd:disk-go is set in the local redis (redis keeps nothing across a reboot).
wait_go() {
	i=0
	while [ "$(redis-cli -h 127.0.0.1 get bd:disk-go 2>/dev/null)" != 1 ] && [ $i -lt 1500 ]; do
		sleep 0.2
		i=$((i + 1))
	done
	echo "DISK go after $((i / 5)) s"
}
mark=/var/lib/bd/disk-mark
if [ -f "$mark" ]; then
	echo "DISK found $(cat "$mark")"
	wait_go
	sync
	poweroff
else
	wait_go
	mkdir -p /var/lib/bd
	echo "boot-$(cat /proc/sys/kernel/random/boot_id)" >"$mark"
	sync
	echo "DISK wrote $(cat "$mark")"
	reboot
fi
