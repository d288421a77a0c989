#!/usr/bin/env bash
# The containers end to end on this host: build the images (on a local Debian base: no registry
# is reachable), start docker/compose.yaml with podman-compose (Redis, Flower, metrics and two
# CPU workers: no GPU here), make the demo's inputs (`fleet demo`'s tiny Wan model, 4 categories
# of reference videos, 3 prompts, 2 seeds) on the output volume, enqueue them from the cli
# service, wait until every sample is done, check what the compose file promises (Redis asks for
# its password, appendonly, noeviction; Flower and /metrics ask for the login; no password in
# any image or container configuration) and print the figures docs/BENCHMARKS.md records.
# Not run by CI (minutes, ~10 GB of disk: torch's CUDA build).
#
# Usage (root, from anywhere): docker/check.sh            the check; the stack is stopped after
#                              docker/check.sh --clean    remove what the check made (its images too;
#                                                         the base image as well with CLEAN_BASE=1)
# Env: BASE_IMAGE (default localhost/fleet-base:bookworm, built by docker/build-base.sh when
#      absent), BUILD_CA (a CA bundle for pip in the build; default PIP_CERT or pip's cert setting),
#      CHECK_DATA (the output folder, default /var/tmp/fleet-check), KEEP_UP=1 (leave it running).
set -euo pipefail
cd "$(dirname "$0")/.."

export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}  # this VM's podman settings
PROJECT=fleetcheck
BASE=${BASE_IMAGE:-localhost/fleet-base:bookworm}
DATA=${CHECK_DATA:-/var/tmp/fleet-check}
LOG=/var/tmp/fleet-check.log  # podman-compose's and the builds' output
export CONTROL_IMAGE=localhost/fleet-control:check WORKER_IMAGE=localhost/fleet-worker:check OUTPUT_VOLUME=$DATA
EXP=/data/demo/experiment.yaml
UID_IN_IMAGES=10001  # the images' user `fleet`: it must read the secrets and write the output folder

compose() { podman-compose -p "$PROJECT" -f docker/compose.yaml "$@" >>"$LOG" 2>&1; }
fail() { echo "check.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
size_mb() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1e6}'; }

for tool in podman podman-compose curl python3; do
  command -v "$tool" >/dev/null || fail "$tool not found (apt-get install podman podman-compose curl)"
done
[ "$(id -u)" = 0 ] || fail "run it as root (rootful podman; the secrets and $DATA are chowned to uid $UID_IN_IMAGES)"

stop_stack() {
  compose down -t 60 || true  # podman-compose 1.0.3 ignores stop_grace_period: podman's 10 s would SIGKILL
  podman volume rm -f "${PROJECT}_redis-data" >/dev/null 2>&1 || true
}

if [ "${1:-}" = "--clean" ]; then
  : >"$LOG"
  stop_stack
  # Removing a tag removes its build's untagged layers too; other users' images are left alone.
  podman rmi -f "$CONTROL_IMAGE" "$WORKER_IMAGE" >/dev/null 2>&1 || true
  # The base stays unless CLEAN_BASE=1: other images (bench/systemd_check.sh's) build on it too.
  if [ -n "${CLEAN_BASE:-}" ] && [ "$BASE" = localhost/fleet-base:bookworm ]; then
    podman rmi "$BASE" >/dev/null 2>&1 || echo "kept $BASE: an image or container still uses it"
  fi
  rm -rf "$DATA" docker/secrets
  echo "removed the check's stack, its images, $DATA and docker/secrets"
  exit 0
fi

: >"$LOG"
echo "check.sh: $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores; log: $LOG"

# ---- images ------------------------------------------------------------------------------
if ! podman image exists "$BASE"; then
  [ "$BASE" = localhost/fleet-base:bookworm ] || fail "base image $BASE not found"
  t=$(now); docker/build-base.sh "$BASE" >>"$LOG" 2>&1 || fail "building the base failed, see $LOG"
  echo "base   $BASE built in $(secs "$t" "$(now)") s, $(size_mb "$BASE") MB"
fi
# pip's CA bundle on this host (PIP_CERT, else a cert setting of pip's configuration), for pip in the build
ca=${BUILD_CA-${PIP_CERT:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.cert='\(.*\)'\$/\1/p" | head -1)}}
build=(podman build --build-arg "BASE_IMAGE=$BASE")
if [ -n "$ca" ]; then
  [ -r "$ca" ] || fail "BUILD_CA $ca: not readable"
  build+=(-v "$ca:/etc/fleet-build-ca.crt:ro" --build-arg PIP_CERT=/etc/fleet-build-ca.crt)
fi
stop_stack  # a previous run's, if any: the check starts from an empty Redis (and frees the old images)
for kind in control worker; do
  image=localhost/fleet-$kind:check
  old=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  t=$(now)
  "${build[@]}" -f "docker/Dockerfile.$kind" -t "$image" . >>"$LOG" 2>&1 || fail "building $image failed, see $LOG"
  # The previous build of the tag, untagged now: its own layers would only take disk.
  [ -z "$old" ] || [ "$old" = "$(podman image inspect --format '{{.Id}}' "$image")" ] || podman rmi "$old" >/dev/null 2>&1 || true
  echo "image  $image built in $(secs "$t" "$(now)") s (layers found in the cache take none), $(size_mb "$image") MB"
done

# ---- secrets, output folder, ports -------------------------------------------------------
mkdir -p docker/secrets
for name in redis_password flower_password; do
  f=docker/secrets/$name
  [ -s "$f" ] || (umask 077; python3 -c 'import secrets; print(secrets.token_hex(24))' >"$f")
  chown "$UID_IN_IMAGES:$UID_IN_IMAGES" "$f"; chmod 0400 "$f"
done
REDIS_PW=$(cat docker/secrets/redis_password); FLOWER_PW=$(cat docker/secrets/flower_password)
rm -rf "$DATA"; mkdir -p "$DATA"; chown "$UID_IN_IMAGES:$UID_IN_IMAGES" "$DATA"
read -r P_REDIS P_FLOWER P_METRICS < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export REDIS_PUBLISH=127.0.0.1:$P_REDIS FLOWER_PUBLISH=127.0.0.1:$P_FLOWER METRICS_PUBLISH=127.0.0.1:$P_METRICS

# ---- the demo's inputs on the output folder (the worker image has torch for the model) -----
t=$(now)
podman run --rm -v "$DATA:/data" "$WORKER_IMAGE" python -c \
  "from pathlib import Path; from fleet.demo import build_demo; build_demo(Path('/data/demo'))" >>"$LOG" 2>&1 \
  || fail "making the demo's inputs failed, see $LOG"
echo "inputs /data/demo (tiny Wan model, 9 reference videos) made in $(secs "$t" "$(now)") s"

# ---- the stack -----------------------------------------------------------------------------
t_up=$(now)
compose up -d redis flower metrics worker-cpu0 worker-cpu1 || fail "compose up failed, see $LOG"
trap '[ -n "${KEEP_UP:-}" ] || stop_stack' EXIT
in_worker() { podman exec "${PROJECT}_worker-cpu0_1" fleet-entrypoint "$@"; }  # the entrypoint adds the secret
# `fleet ARGS --json` in the cli service, as docs/ARCHITECTURE.md shows it; its JSON line only
# (podman-compose prints what it runs and skips to stdout too).
cli_json() { podman-compose -p "$PROJECT" -f docker/compose.yaml run --rm cli "$@" 2>>"$LOG" | grep '^{'; }
for _ in $(seq 120); do
  in_worker fleet status --json >/dev/null 2>&1 && break
  sleep 1
done
in_worker fleet status --json >/dev/null 2>>"$LOG" || fail "the workers' container never reached Redis, see $LOG"
enq=$(cli_json enqueue --json "$EXP") || fail "enqueue failed, see $LOG"
echo "enqueue (cli service): $enq"
t_enq=$(now)
deadline=$(( $(date +%s) + 900 ))
while :; do
  st=$(in_worker fleet status --json "$EXP" 2>>"$LOG") || st='{}'
  read -r total done_ failed < <(python3 -c 'import json,sys; d=json.loads(sys.argv[1] or "{}")
print(d.get("total", 0), d.get("done", 0), d.get("failed", 0))' "$st")
  [ "$total" -gt 0 ] && [ $((done_ + failed)) -ge "$total" ] && break
  [ "$(date +%s)" -lt "$deadline" ] || fail "not done after 15 minutes: $st"
  sleep 2
done
t_done=$(now)
echo "samples: $done_ done, $failed failed of $total; $(secs "$t_enq" "$t_done") s from enqueue to the last" \
     "($(python3 -c "print(f'{$done_ * 60 / ($t_done - $t_enq):.0f}')" ) samples/min on 2 CPU workers)," \
     "$(secs "$t_up" "$t_done") s from compose up"
[ "$failed" = 0 ] && [ "$done_" = "$total" ] || fail "not every sample is done: $st"

# ---- what the compose file promises ---------------------------------------------------------
mp4=$(find "$DATA/demo/results" -name '*.mp4' | wc -l)
manifest=$(wc -l <"$DATA/demo/results/fleet-manifest.jsonl")
[ "$mp4" = "$total" ] || fail "$mp4 mp4 files in $DATA/demo/results, expected $total"
echo "outputs: $mp4 mp4 files and $manifest manifest lines under $DATA/demo/results (host folder = /data)," \
     "e.g. $(find "$DATA/demo/results" -name '*.mp4' | sort | head -1)"

code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
flower=http://127.0.0.1:$P_FLOWER metrics=http://127.0.0.1:$P_METRICS
for _ in $(seq 60); do [ "$(code "$flower/healthcheck")" = 200 ] && break; sleep 1; done
[ "$(code "$flower/")" = 401 ] && [ "$(code "$flower/metrics")" = 401 ] || fail "Flower answers without its login"
[ "$(code -u "fleet:$FLOWER_PW" "$flower/")" = 200 ] || fail "Flower refuses its login"
workers=$(curl -s -u "fleet:$FLOWER_PW" "$flower/api/workers?refresh=1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$(code "$metrics/metrics")" = 401 ] || fail "/metrics answers without the login"
done_metric=$(curl -s -u "fleet:$FLOWER_PW" "$metrics/metrics" \
  | awk '/^fleet_samples\{.*experiment="demo".*state="done"/ {s += $NF} END {printf "%d", s}')
[ "$done_metric" = "$total" ] || fail "/metrics counts $done_metric done samples, expected $total"
echo "flower: 401 without the login (pages and /metrics), 200 with it, $workers workers seen;" \
     "/metrics: 401 without, fleet_samples done = $done_metric"

redis_c=${PROJECT}_redis_1
podman exec "$redis_c" redis-cli ping 2>&1 | grep -q NOAUTH || fail "Redis answers without its password"
aof=$(podman exec "$redis_c" fleet-entrypoint redis-cli info persistence | tr -d '\r' | awk -F: '/^aof_enabled/ {print $2}')
policy=$(podman exec "$redis_c" fleet-entrypoint redis-cli info memory | tr -d '\r' | awk -F: '/^maxmemory_policy/ {print $2}')
[ "$aof" = 1 ] && [ "$policy" = noeviction ] || fail "Redis: aof_enabled=$aof maxmemory_policy=$policy"
echo "redis: NOAUTH without the password, aof_enabled=$aof, maxmemory_policy=$policy"

leaks=0
for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
  podman inspect "$c" | grep -qF -e "$REDIS_PW" -e "$FLOWER_PW" && { echo "  a password in: podman inspect $c"; leaks=1; }
done
for image in "$CONTROL_IMAGE" "$WORKER_IMAGE"; do
  { podman image inspect "$image"; podman history --no-trunc "$image"; } | grep -qF -e "$REDIS_PW" -e "$FLOWER_PW" \
    && { echo "  a password in: $image"; leaks=1; }
done
[ "$leaks" = 0 ] || fail "a password is in a container's or an image's configuration"
echo "secrets: in no image and no container configuration (podman inspect, podman history)"

# SIGTERM is a warm shutdown: an idle worker exits by itself (status 0), not by podman's SIGKILL.
t=$(now)
podman stop -t 60 "${PROJECT}_worker-cpu0_1" "${PROJECT}_worker-cpu1_1" >/dev/null
codes=$(podman inspect --format '{{.State.ExitCode}}' "${PROJECT}_worker-cpu0_1" "${PROJECT}_worker-cpu1_1" | xargs)
echo "workers: stopped (SIGTERM) in $(secs "$t" "$(now)") s, exit statuses $codes"
[ "$codes" = "0 0" ] || fail "a worker did not stop cleanly on SIGTERM (exit statuses $codes)"
echo "check.sh: OK"
