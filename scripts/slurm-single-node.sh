#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the `slurm` tests and CI.
#   scripts/slurm-single-node.sh up     install (apt, root) if needed, start munged/slurmctld/slurmd
#   scripts/slurm-single-node.sh stop   stop the daemons
# Container notes (no systemd, no cgroups): munged runs as the munge user with /run/munge
# created by hand; proctrack/linuxproc + task/none; RealMemory below the real amount or the
# node goes INVAL; JobRequeue=1 so `scontrol requeue` works; KillWait=5 (SIGTERM -> SIGKILL grace)
# keeps the requeue tests short (a test model saves its checkpoint in well under a second).
set -euo pipefail
PARTITION=${SLURM_TEST_PARTITION:-debug}
HOST=$(hostname -s)

wait_until() {  # wait_until 'condition' [tries of 0.2 s]
  local tries=${2:-300}
  for _ in $(seq "$tries"); do eval "$1" && return 0; sleep 0.2; done
  echo "slurm-single-node: timed out waiting for: $1" >&2; return 1
}
pid_alive() { kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
stop_daemons() {
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    if pid_alive "$pidfile"; then
      pid=$(cat "$pidfile"); kill "$pid"; wait_until "! kill -0 $pid 2>/dev/null"
    fi
  done
}

case "${1:-up}" in
  stop) stop_daemons; munged --stop 2>/dev/null || true; exit 0 ;;
  up) ;;
  *) echo "usage: $0 [up|stop]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "slurm-single-node: needs root (apt-get, munged, slurmctld); run it as root or use an existing cluster" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq slurm-wlm munge >/dev/null
fi

# munge: key owned by munge, runtime dir that systemd would have made.
[ -s /etc/munge/munge.key ] || mungekey -c
chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge /run/munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
munge_ok || runuser -u munge -- munged
wait_until munge_ok

mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
memory_mb=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
conf=$(mktemp)
cat > "$conf" <<CONF
ClusterName=repro-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=5
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory_mb
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s "$conf" /etc/slurm/slurm.conf; then
  stop_daemons
  cp "$conf" /etc/slurm/slurm.conf
fi
rm -f "$conf"

pid_alive /run/slurmctld.pid || slurmctld
wait_until 'scontrol ping 2>/dev/null | grep -q UP'
pid_alive /run/slurmd.pid || slurmd
wait_until '[[ $(sinfo -h -n '"$HOST"' -o %t) =~ ^(idle|mix|alloc)$ ]]'
sinfo
