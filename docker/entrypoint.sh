#!/bin/sh
# The images' entrypoint: the secrets from files (compose secrets under /run/secrets) into the
# environment of the command it execs, so no password is in the image, the compose file or the
# container's configuration (`podman inspect` shows FLEET_BROKER_URL without it).
#   redis_password:  added to FLEET_BROKER_URL (redis://redis:6379/0 -> redis://:PW@redis:6379/0)
#   flower_password: FLEET_FLOWER_PASSWORD (`fleet metrics`) and FLOWER_BASIC_AUTH (Flower's login)
# A secret that is absent leaves the environment as it is. SECRETS_DIR moves the folder (tests).
set -eu

dir=${SECRETS_DIR:-/run/secrets}

# The secret's one line, checked: URL-safe characters only (it goes into a URL and into Flower's
# user:password list); one clear line and exit 1 otherwise.
secret() {
  file="$dir/$1"
  [ -e "$file" ] || return 0
  if ! value=$(tr -d '\r\n' <"$file" 2>/dev/null); then
    echo "fleet-entrypoint: $file: cannot read it" >&2
    exit 1
  fi
  case "$value" in
    "") echo "fleet-entrypoint: $file: empty" >&2; exit 1 ;;
    *[!A-Za-z0-9._~-]*)
      echo "fleet-entrypoint: $file: only letters, digits and . _ ~ - may appear (e.g. openssl rand -hex 24)" >&2
      exit 1 ;;
  esac
  printf '%s' "$value"
}

redis_password=$(secret redis_password)
if [ -n "$redis_password" ] && [ -n "${FLEET_BROKER_URL:-}" ]; then
  scheme=${FLEET_BROKER_URL%%://*}
  rest=${FLEET_BROKER_URL#*://}
  case "$rest" in
    *@*) ;;  # the URL names its own credentials: keep them
    *) FLEET_BROKER_URL="$scheme://:$redis_password@$rest"; export FLEET_BROKER_URL ;;
  esac
fi
if [ -n "$redis_password" ]; then
  REDISCLI_AUTH=$redis_password  # redis-cli in the container (health checks, by hand)
  export REDISCLI_AUTH
fi

flower_password=$(secret flower_password)
if [ -n "$flower_password" ]; then
  FLEET_FLOWER_PASSWORD=$flower_password
  FLOWER_BASIC_AUTH="${FLEET_FLOWER_USER:-fleet}:$flower_password"
  export FLEET_FLOWER_PASSWORD FLOWER_BASIC_AUTH
fi

exec "$@"
