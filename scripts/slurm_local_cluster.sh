#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the Slurm launcher's tests and for trying
# `launcher.type: slurm` without a cluster: slurmctld + slurmd on localhost (no GPUs, this machine's CPUs and
# memory as the node's), authenticated by munge, from Debian's packages. Needs root.
#
#   bash scripts/slurm_local_cluster.sh start    # install slurm-wlm and munge if missing, configure, start
#   bash scripts/slurm_local_cluster.sh status   # is it up? (sinfo)
#   bash scripts/slurm_local_cluster.sh stop     # stop the daemons this script started, remove its state
#
# `start` is idempotent (a running cluster is left as it is). There is no accounting database, so `sacct`
# is unavailable; the sweep's Slurm launcher follows its tasks with `squeue`.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurm-local      # slurmctld state and slurmd spool: removed by `stop`
LOGS=/var/log/slurm-local
RUN=/run/slurm-local              # pid files of the daemons this script started
MUNGE_RUN=/run/munge
PARTITION=debug

say() { echo "slurm_local_cluster: $*"; }

is_up() { command -v scontrol >/dev/null && timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; }

node_ready() { timeout 5 sinfo -h -N -o "%T" 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    say "installing slurm-wlm and munge (apt-get)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    # slurmd refuses a node that claims more memory than it finds: leave 5% for the kernel's own accounting.
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"
    cat > "$CONF" <<CONF
# Written by scripts/slurm_local_cluster.sh: a single-node cluster on localhost.
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    say "node localhost: $cpus CPUs, $mem_mb MB"
}

start_munge() {
    if [ -S "$MUNGE_RUN/munge.socket.2" ] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile /etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chown munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    say "munged did not start"; exit 1
}

wait_for() {  # wait_for SECONDS COMMAND...: until the command succeeds
    local seconds=$1; shift
    for _ in $(seq $((seconds * 5))); do
        "$@" && return 0
        sleep 0.2
    done
    return 1
}

start() {
    install_packages
    if is_up && node_ready; then
        say "already running"; sinfo; return
    fi
    write_config
    start_munge
    if ! is_up; then
        /usr/sbin/slurmctld -i   # -i: ignore state left by an earlier cluster
        wait_for 30 is_up || { say "slurmctld did not start (log: $LOGS/slurmctld.log)"; exit 1; }
    fi
    if ! { [ -s "$RUN/slurmd.pid" ] && kill -0 "$(cat "$RUN/slurmd.pid")" 2>/dev/null; }; then
        /usr/sbin/slurmd -N localhost
    fi
    if ! wait_for 30 node_ready; then
        scontrol update NodeName=localhost State=RESUME 2>/dev/null || true
        wait_for 10 node_ready || { say "the node is not ready (log: $LOGS/slurmd.log)"; sinfo; exit 1; }
    fi
    say "up"; sinfo
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    local pid
    [ -s "$2" ] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        wait_for 15 bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
        say "stopped $1 ($pid)"
    fi
    rm -f "$2"
}

stop() {
    command -v scancel >/dev/null && is_up && scancel --user=root 2>/dev/null || true
    stop_daemon slurmd "$RUN/slurmd.pid"
    stop_daemon slurmctld "$RUN/slurmctld.pid"
    stop_daemon munged "$MUNGE_RUN/munged.pid"
    rm -rf "$STATE" "$RUN"
    say "down"
}

status() {
    if is_up; then
        sinfo; squeue
    else
        say "not running"; return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: bash scripts/slurm_local_cluster.sh start|stop|status" >&2; exit 2 ;;
esac
