# shellcheck shell=sh disable=SC2034 # variables read by /sbin/init
# /etc/bd/services/redis.sh: redis-server, started by /sbin/init as the
# user redis (created by the Debian package), in the foreground, with
# /etc/bd/redis.conf. See images/README.md for the variables.
SERVICE_USER=redis
SERVICE_DIR=/var/lib/redis
SERVICE_EXEC="/usr/bin/redis-server /etc/bd/redis.conf"
SERVICE_READY="/usr/bin/redis-cli -h 127.0.0.1 -p 6379 ping"
SERVICE_READY_SECONDS=60
