#!/bin/sh
# Scenario app (root filesystem image only): runs an application brought on a disk of its own.
# Mounts the app disk (BD_APP_DISK, default /dev/vdb) read-only at /app and runs /app/start.sh
# with busybox sh as root; start.sh starts the application's processes (as whatever users it
# chooses) and prints its own markers. The disk is any file system the kernel mounts (the tests
# make an ext4 image with mkfs.ext4 -d). Markers:
#   APP mounted <dev>
#   APP failed: <why>
dev=${BD_APP_DISK:-/dev/vdb}
i=0
while [ ! -b "$dev" ] && [ $i -lt 50 ]; do
	sleep 0.1
	i=$((i + 1))
done
if [ ! -b "$dev" ]; then
	echo "APP failed: no disk $dev"
	exit 1
fi
mkdir -p /app
if ! mount -o ro "$dev" /app; then
	echo "APP failed: cannot mount $dev"
	exit 1
fi
if [ ! -f /app/start.sh ]; then
	echo "APP failed: no start.sh on $dev"
	exit 1
fi
echo "APP mounted $dev"
exec sh /app/start.sh
