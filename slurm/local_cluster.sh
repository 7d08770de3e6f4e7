#!/bin/bash
# A one-node SLURM cluster on this machine, for trying slurm/train.sbatch and for tests/slurm/test_local_cluster.py.
#   sudo bash slurm/local_cluster.sh start    # munged + slurmctld + slurmd; waits until the node is idle
#   sudo bash slurm/local_cluster.sh stop
# Needs root and Debian/Ubuntu's packages: apt-get install -y slurm-wlm munge. No accounting database: finished
# jobs are read with `sacct -c` (job completion log). Writes /etc/slurm/slurm.conf (only if it is absent or was
# written by this script) and keeps state and logs in $SLURM_LOCAL_STATE (default /var/lib/reasonpost-slurm).

set -euo pipefail
STATE=${SLURM_LOCAL_STATE:-/var/lib/reasonpost-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by reasonpost slurm/local_cluster.sh"
HOST=$(hostname -s)

die() { echo "local_cluster: $*" >&2; exit 1; }

start() {
    ((EUID == 0)) || die "run as root (it starts munged, slurmctld and slurmd)"
    for bin in munged slurmctld slurmd sbatch; do
        command -v "$bin" >/dev/null || die "$bin not found: apt-get install -y slurm-wlm munge"
    done
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching a real cluster's config"
    fi

    # munge authenticates every SLURM message; Debian's package creates the key, older setups may lack it.
    mkdir -p /run/munge && chown munge:munge /run/munge
    [[ -f /etc/munge/munge.key ]] || { mungekey --create && chown munge:munge /etc/munge/munge.key; }
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- munged
    fi

    mkdir -p "$STATE/ctld" "$STATE/d"
    # CPUs and memory as slurmd detects them; linuxproc/task none work in containers without cgroup delegation.
    local node_line
    node_line=$(slurmd -C | head -n 1)
    cat > "$CONF" <<CONFIG
$MARK
ClusterName=reasonpost-local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
MinJobAge=3600
$node_line State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFIG

    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
        [[ $state == idle* || $state == mix* || $state == alloc* ]] && break
        [[ $state == down* || $state == drain* ]] && scontrol update nodename="$HOST" state=resume 2>/dev/null || true
        sleep 1
    done
    [[ $state == idle* || $state == mix* || $state == alloc* ]] || die "node $HOST is '$state' after 60 s; see $STATE/*.log"
    sinfo
}

stop() {
    scontrol shutdown 2>/dev/null || true  # slurmctld and every slurmd
    for _ in $(seq 30); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
        sleep 1
    done
    if [[ -f /run/munge/munged.pid ]]; then kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true; fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
