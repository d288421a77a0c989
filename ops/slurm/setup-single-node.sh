#!/bin/bash
# A one-machine Slurm cluster from Debian's packages, with fake GPUs as gres, for trying
# ops/slurm-workers.sbatch for real (bench/slurm_check.py): munged, slurmctld and slurmd on
# this host, partition "fleet", node "$(hostname -s)" with $GPUS GPUs.
#   sudo ops/slurm/setup-single-node.sh [start]   # install if needed, (re)write the config, (re)start
#   sudo ops/slurm/setup-single-node.sh stop      # stop the three daemons
# The GPUs are copies of /dev/null (/run/fleet-fake-gpus/nvidia0 ...), listed in gres.conf: Slurm allocates
# them and sets CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS, SLURM_STEP_GPUS as for real ones; fleet's
# workers see the same indices through FLEET_FAKE_GPUS (a JSON inventory). No cgroups
# (proctrack/linuxproc, task/none): this works in a container or a VM without systemd.
# On a real cluster use the site's slurm.conf; nothing of this is needed there.
set -euo pipefail
GPUS=${GPUS:-4}
KILL_WAIT_S=${KILL_WAIT_S:-30}   # Slurm's SIGTERM -> SIGKILL at a job's end (KillWait)
host=$(hostname -s)
conf=/etc/slurm
fake=/run/fleet-fake-gpus
[ "$(id -u)" -eq 0 ] || { echo "setup-single-node: run as root" >&2; exit 1; }

pid_of() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && cat "$1"; }

stop() {
  for d in slurmd:/run/slurmd.pid slurmctld:/run/slurmctld.pid munged:/run/munge/munged.pid; do
    pidfile=${d#*:}
    if pid=$(pid_of "$pidfile"); then
      kill -TERM "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "stopped ${d%%:*} (pid $pid)"
    fi
  done
}

if [ "${1:-start}" = stop ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd munge slurm-client
fi
stop

# The node as slurmd sees it (CPUs, sockets, memory), plus the GPUs.
node=$(slurmd -C | head -1)
mkdir -p "$fake"
for ((i = 0; i < GPUS; i++)); do
  # Slurm wants a character device: a copy of /dev/null (major 1, minor 3) under another name.
  [ -c "$fake/nvidia$i" ] || { rm -f "$fake/nvidia$i"; mknod -m 0666 "$fake/nvidia$i" c 1 3; }
done
mkdir -p "$conf" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
chown slurm: /var/lib/slurm/slurmctld /var/log/slurm
cat > "$conf/slurm.conf" <<CONF
# Written by fleet's ops/slurm/setup-single-node.sh: one node, fake GPUs.
ClusterName=fleet
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
KillWait=$KILL_WAIT_S
MinJobAge=300
${node/NodeName=$host/NodeName=$host Gres=gpu:$GPUS} State=UNKNOWN
PartitionName=fleet Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=$host Name=gpu File=$fake/nvidia[0-$((GPUS - 1))]" > "$conf/gres.conf"

mkdir -p /run/munge && chown munge: /run/munge && chmod 0755 /run/munge
runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null || { echo "setup-single-node: munge does not work" >&2; exit 1; }
slurmctld
slurmd
for _ in $(seq 150); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
  case $state in idle | mixed | allocated) break ;; down* | drain*) scontrol update nodename="$host" state=resume || true ;; esac
  sleep 0.2
done
sinfo -N -o "%N %T %c %m %G"
[[ $state == idle || $state == mixed || $state == allocated ]] || {
  echo "setup-single-node: node $host is $state; see /var/log/slurm/slurmd.log and slurmctld.log" >&2; exit 1; }
