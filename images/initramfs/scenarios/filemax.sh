#!/bin/sh
# Scenario filemax: lower fs.file-max to BD_FILEMAX (default 256), then
# user1 (root is exempt from file-max) opens files until the system file
# table is full (ENFILE; drives FILE_TABLE_FULL) and keeps them open for
# BD_SECONDS seconds (default 3600) while the scenario holds; then the
# files are closed and file-max restored.
# shellcheck source=/dev/null # the guest's /etc/bd/lib.sh
. /etc/bd/lib.sh
log=/tmp/filemax.log
rm -f "$log"
old=$(cat /proc/sys/fs/file-max)
if ! echo "${BD_FILEMAX:-256}" >/proc/sys/fs/file-max; then
	echo "SCENARIO filemax: cannot set file-max to ${BD_FILEMAX:-256}"
	exit 1
fi
echo "SCENARIO filemax: file-max old=$old new=$(cat /proc/sys/fs/file-max) file-nr=$(tr -s '\t ' , </proc/sys/fs/file-nr)"
bd_as_bg "$BD_USER1" openmany --hold "${BD_SECONDS:-3600}" --log "$log"
# shellcheck disable=SC2154 # bd_pid is set by bd_as_bg
openmany_pid=$bd_pid
if ! bd_wait_lines "$log" '^OPENMANY' 1 600; then
	echo "SCENARIO filemax: openmany did not report"
	kill -9 "$openmany_pid" 2>/dev/null
	echo "$old" >/proc/sys/fs/file-max
	exit 1
fi
line=$(grep -m 1 '^OPENMANY' "$log")
errno=$(bd_field "$line" errno)
name=$(echo "$line" | sed -n 's/.*errno=[0-9]* (\([^)]*\)).*/\1/p')
echo "SCENARIO filemax: full errno=$errno ($name) opened=$(bd_field "$line" opened) file-nr=$(tr -s '\t ' , </proc/sys/fs/file-nr)"
bd_hold
kill -9 "$openmany_pid" 2>/dev/null
wait "$openmany_pid"
echo "$old" >/proc/sys/fs/file-max
echo "SCENARIO filemax: over file-max=$(cat /proc/sys/fs/file-max) file-nr=$(tr -s '\t ' , </proc/sys/fs/file-nr)"
