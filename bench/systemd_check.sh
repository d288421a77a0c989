#!/bin/bash
# Check: the systemd units of ops/ run under a real systemd (PID 1 of a podman container), on
# this checkout. For hosts whose own PID 1 is not systemd (containers, this VM).
#   sudo bench/systemd_check.sh [--keep]
# 1. An image: fleet-base:bookworm (docker/build-base.sh builds it if missing) + systemd and
#    redis-server from Debian. The container mounts this checkout and its venv's Python
#    read-only, runs systemd as PID 1, and uses the host's network (Redis on port $PORT).
# 2. ops/fleet-redis.service (ops/redis.conf, a password) and ops/fleet.service, installed with
#    /opt/fleet/.venv -> this checkout's venv and User=root (the venv's Python lives under
#    /root); `systemctl start`: a CPU worker (no GPU in the container) registers.
# 3. A slow sample (tests/kinds/touch.py, ignoring the stop) runs; `systemctl stop fleet`:
#    the unit must end Result=success, status 0, within the grace period (a drop-in sets
#    --grace-s 3) plus a few seconds, with the sample back in its queue and no worker left.
# 4. ops/fleet-worker@.service on fake GPU 0 (a drop-in: FLEET_FAKE_GPUS,
#    max_consecutive_errors 1, RestartSec=2): a sample whose job raises an unexpected error
#    makes the worker stop itself with status 3; systemd must restart it (NRestarts >= 1).
# Prints the steps and the units' journal lines; exit 1 on a fault.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PORT:-6393}
IMAGE=fleet-systemd:check
NAME=fleet-systemd-check
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/docker/containers.conf}  # this VM's podman settings
keep=${1:-}
py=$(readlink -f "$repo/.venv/bin/python")
pyroot=$(cd "$(dirname "$py")/.." && pwd)  # the interpreter the venv was made from
say() { echo "[$(date +%H:%M:%S)] $*"; }
fail() { say "FAULT: $*"; podman exec "$NAME" journalctl --no-pager -n 60 2>/dev/null | tail -60; exit 1; }
[ "$(id -u)" = 0 ] || { echo "systemd_check: run it as root (rootful podman)" >&2; exit 1; }

if ! podman image exists fleet-base:bookworm; then "$repo/docker/build-base.sh"; fi
if ! podman image exists "$IMAGE"; then
  say "building $IMAGE (systemd, redis-server from Debian)"
  printf '%s\n' 'FROM localhost/fleet-base:bookworm' \
    'RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd systemd-sysv redis-server procps >/dev/null && rm -rf /var/lib/apt/lists/* && systemctl mask redis-server.service' \
    'CMD ["/lib/systemd/systemd"]' | podman build --network host -q -t "$IMAGE" -f - "$repo/ops" >/dev/null
fi
podman rm -f "$NAME" >/dev/null 2>&1 || true
cleanup() { [ "$keep" = --keep ] || podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
podman run -d --name "$NAME" --systemd=always --network host -v "$repo:$repo:ro" -v "$pyroot:$pyroot:ro" \
  "$IMAGE" >/dev/null
inside() { podman exec "$NAME" bash -c "$1"; }
for _ in $(seq 100); do inside 'systemctl is-system-running' 2>/dev/null | grep -qE 'running|degraded' && break; sleep 0.2; done
say "container $NAME: PID 1 is $(inside 'cat /proc/1/comm'), $(inside 'systemctl --version | head -1')"

fleet="$repo/.venv/bin/fleet"
inside "set -e
mkdir -p /etc/fleet /srv/fleet
for u in fleet-redis fleet fleet-worker@; do
  sed 's#/opt/fleet/.venv#$repo/.venv#; s#^User=fleet#User=root#' $repo/ops/\$u.service > /etc/systemd/system/\$u.service
done
sed 's/^port 6379/port $PORT/' $repo/ops/redis.conf > /etc/fleet/redis.conf
echo 'requirepass \"check\"' > /etc/fleet/redis-password.conf && chmod 0600 /etc/fleet/redis-password.conf
cat > /etc/fleet/fleet.yaml <<EOF
broker_url: redis://:check@127.0.0.1:$PORT/0
state_dir: /var/lib/fleet
output_roots: [/srv/fleet]
heartbeat_s: 1
kinds: {touch: {planner: tests.kinds.touch, job: tests.kinds.touch}}
EOF
echo '[{\"index\": 0, \"uuid\": \"GPU-fake-0\", \"name\": \"FAKE\", \"memory_total_mib\": 81559, \"memory_used_mib\": 0, \"memory_free_mib\": 81559}]' > /etc/fleet/gpus.json
mkdir -p /etc/systemd/system/fleet.service.d /etc/systemd/system/fleet-worker@.service.d
printf '[Service]\nEnvironment=PYTHONPATH=$repo FLEET_PLACEMENT_INTERVAL_S=0.5\nExecStart=\nExecStart=$fleet up --foreground --grace-s 3\n' > /etc/systemd/system/fleet.service.d/check.conf
printf '[Service]\nEnvironment=PYTHONPATH=$repo FLEET_FAKE_GPUS=/etc/fleet/gpus.json FLEET_MAX_CONSECUTIVE_ERRORS=1 FLEET_MAX_ATTEMPTS=1\nRestartSec=2\n' > /etc/systemd/system/fleet-worker@.service.d/check.conf
cat > /srv/fleet/slow.yaml <<EOF
kind: touch
name: slow
output: out
items: [{name: slow, sleep_s: 120, ignore_stop: true}]
EOF
cat > /srv/fleet/bad.yaml <<EOF
kind: touch
name: bad
output: out-bad
items: [{name: bad1, fail: 'CUDA error: an illegal memory access'}, {name: bad2, fail: 'CUDA error: again'}]
EOF
systemctl daemon-reload"
export_env="FLEET_CONFIG=/etc/fleet/fleet.yaml PYTHONPATH=$repo"
status() { inside "$export_env $fleet status /srv/fleet/$1.yaml --json" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['queued'], d['running'], d['done'], d['failed'])"; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  fail "timed out after $t s waiting for $what"
}

inside "systemctl start fleet-redis"
say "fleet-redis: $(inside 'systemctl is-active fleet-redis') ($(inside "redis-cli -p $PORT -a check --no-auth-warning ping"))"
inside "systemctl start fleet"
wait_for 60 "the worker of fleet.service" inside "redis-cli -p $PORT -a check --no-auth-warning hlen fleet:workers | grep -q 1"
say "fleet.service: $(inside 'systemctl is-active fleet'), main pid $(inside 'systemctl show -p MainPID --value fleet'), worker registered"
inside "cd /srv/fleet && $export_env $fleet enqueue slow.yaml" >/dev/null
slow_running() { [ "$(status slow)" = "0 1 0 0" ]; }
wait_for 60 "the slow sample to run ($(status slow))" slow_running
say "slow sample running (queued running done failed: $(status slow)); systemctl stop fleet"
t0=$(date +%s.%N)
inside "systemctl stop fleet"
t1=$(date +%s.%N)
show=$(inside "systemctl show fleet -p Result -p ExecMainStatus -p ExecMainCode | sort | tr '\n' ' '")
say "stopped in $(python3 -c "print(round($t1 - $t0, 1))") s: $show"
[[ $show == *"ExecMainStatus=0"*"Result=success"* ]] || fail "fleet.service did not end cleanly: $show"
[ "$(status slow)" = "1 0 0 0" ] || fail "the slow sample is not back in its queue: $(status slow)"
left=$(inside "pgrep -f '[w]orkers[.]main' || true")
[ -z "$left" ] || fail "workers left after the stop: $left"
say "the slow sample is back in its queue (queued running done failed: $(status slow)); no worker left"
inside "journalctl -u fleet --no-pager -o cat | grep -E 'fleet.foreground|stop worker|interrupting|Stopping|Stopped|Deactivated'"

inside "systemctl start fleet-worker@0"
wait_for 60 "fleet-worker@0 to register" inside "redis-cli -p $PORT -a check --no-auth-warning hexists fleet:workers gpu0@\$(hostname) | grep -q 1"
say "fleet-worker@0: $(inside 'systemctl is-active fleet-worker@0'); enqueue two samples that raise unexpected errors"
inside "cd /srv/fleet && $export_env $fleet enqueue bad.yaml" >/dev/null
wait_for 90 "systemd to restart the broken worker" inside "[ \$(systemctl show -p NRestarts --value fleet-worker@0) -ge 1 ]"
say "fleet-worker@0 restarted by systemd: NRestarts=$(inside 'systemctl show -p NRestarts --value fleet-worker@0')"
inside "journalctl -u fleet-worker@0 --no-pager -o cat | grep -E 'looks broken|status=3|Scheduled restart|Started' | head -8"
inside "journalctl -u fleet-worker@0 --no-pager -o cat" | grep -q "status=3" || fail "no exit status 3 in the worker's journal"
inside "systemctl stop fleet-worker@0 fleet-redis"
say "OK: fleet.service stopped cleanly with its sample given back; a broken fleet-worker@0 exited 3 and was restarted"
