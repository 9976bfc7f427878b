#!/usr/bin/env bash
# A 2-node SLURM cluster on this one machine, for tests/test_slurm.py (and .ci/run).
#
#   tests/cluster/slurm.sh up       start munged (if needed), slurmctld and two slurmd ("nodes"
#                                   n1, n2: one CPU each, ports 17001/17002 of 127.0.0.1)
#   tests/cluster/slurm.sh down     stop the SLURM daemons this script started (munged stays)
#   tests/cluster/slurm.sh status   exit 0 when both nodes answer
#
# Everything lives in $IMAGEN_TRAIN_SLURM_DIR (default /tmp/imagen-train-slurm): the config
# (clients find it through SLURM_CONF=$dir/slurm.conf), state, spool, logs and pid files.
# Nothing is written under /etc/slurm. Needs root and Debian's slurmctld, slurmd,
# slurm-client and munge (docs/fault-tolerance.md, "Testing the launchers").
set -euo pipefail

S=${IMAGEN_TRAIN_SLURM_DIR:-/tmp/imagen-train-slurm}
export SLURM_CONF=$S/slurm.conf

nodes_up() {
  # Both nodes known and idle/allocated/mixed (not down or not responding).
  local states
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [[ $(grep -cE '^n[12] (idle|alloc|mix|comp)$' <<< "$states") == 2 ]]
}

munge_up() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

write_config() {
  local host
  host=$(hostname)
  mkdir -p "$S/state" "$S/log" "$S/spool/n1" "$S/spool/n2"
  # KillWait=30 is SLURM's default: scancel and the time limit SIGKILL 30 s after SIGTERM.
  cat > "$SLURM_CONF" <<CONF
ClusterName=imagen-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$S/state
SlurmctldPidFile=$S/slurmctld.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdPidFile=$S/slurmd-%n.pid
SlurmdLogFile=$S/log/slurmd-%n.log
SlurmdSpoolDir=$S/spool/%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=30
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=4000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=4000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
}

up() {
  for bin in slurmctld slurmd sinfo munged; do
    command -v "$bin" >/dev/null || { echo "slurm.sh: $bin not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 3; }
  done
  if [[ -f $SLURM_CONF ]] && nodes_up; then echo "slurm.sh: already up"; return 0; fi
  if ! munge_up; then
    mkdir -p /run/munge
    chown munge:munge /run/munge
    [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    su -s /bin/sh munge -c /usr/sbin/munged
  fi
  down quiet
  write_config
  slurmctld
  slurmd -N n1
  slurmd -N n2
  for _ in $(seq 60); do
    nodes_up && { echo "slurm.sh: up ($SLURM_CONF)"; return 0; }
    sleep 0.5
  done
  echo "slurm.sh: the nodes did not come up; logs in $S/log" >&2
  sinfo -N >&2 || true
  exit 1
}

down() {
  local pidfile pid
  for pidfile in "$S"/slurmd-n1.pid "$S"/slurmd-n2.pid "$S"/slurmctld.pid; do
    [[ -s $pidfile ]] || continue
    pid=$(cat "$pidfile")
    # Only a SLURM daemon: a stale pid file may name a reused pid.
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurm* ]] && kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
  # A fresh start forgets old jobs.
  rm -rf "$S/state" "$S/spool"
  [[ ${1:-} == quiet ]] || echo "slurm.sh: down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) nodes_up ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
