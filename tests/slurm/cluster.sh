#!/usr/bin/env bash
# A throw-away single-node SLURM cluster for tests (Debian-like, root, no systemd).
#
#   tests/slurm/cluster.sh up      install munge + slurm-wlm if needed, write the
#                                  config, start munged/slurmctld/slurmd, wait for
#                                  the node to be idle (idempotent)
#   tests/slurm/cluster.sh status  show daemons and sinfo; exit 1 when not up
#   tests/slurm/cluster.sh down    stop the daemons started by `up`
#
# Partitions: "cpu" (default) and "gpu" (same node, lower PriorityTier, so a job
# waiting for the GPU does not hold back CPU jobs). The node has one fake GPU
# (a /dev/null-like char device), so `--gpus=1` / `--gres=gpu:1` jobs get
# CUDA_VISIBLE_DEVICES=0. No slurmdbd: `sacct` does not work; clients must poll
# with `squeue` (MinJobAge=300 keeps finished jobs visible for 5 minutes).
#
# Environment: MEDLDM_SLURM_DIR  scratch dir for config, state, pids, logs
#                                (default /tmp/medldm-slurm)
set -euo pipefail

DIR="${MEDLDM_SLURM_DIR:-/tmp/medldm-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
MUNGE_PID=/run/munge/munged.pid

die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

preflight() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (it installs packages and starts daemons)"
    command -v apt-get >/dev/null || die "needs a Debian-like system with apt-get"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    log "installing munge and slurm-wlm"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends munge slurm-wlm)
    "${apt[@]}" >/dev/null || { apt-get update -q >/dev/null && "${apt[@]}" >/dev/null; } \
        || die "apt-get install munge slurm-wlm failed"
}

start_munge() {
    if alive "$MUNGE_PID"; then return; fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --force
    munge -n | unmunge >/dev/null || die "munge does not work"
}

# Write $1 to file $2 unless it already holds exactly that; sets CHANGED=1 if written.
CHANGED=0
write_if_changed() {
    if [[ -f "$2" ]] && [[ "$(cat "$2")" == "$1" ]]; then return 0; fi
    printf '%s\n' "$1" >"$2"
    CHANGED=1
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log}
    [[ -c "$DIR/fakegpu0" ]] || { rm -f "$DIR/fakegpu0"; mknod "$DIR/fakegpu0" c 1 3; }

    # Hardware as slurmd sees it; RealMemory at ~90% or the node registers INVALID.
    local hw mem
    hw="$(slurmd -C | head -n1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')"
    mem="$(slurmd -C | head -n1 | tr ' ' '\n' | sed -n 's/^RealMemory=//p')"
    mem=$((mem * 9 / 10))

    write_if_changed "ClusterName=medldm
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerParameters=bf_interval=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 ${hw}RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=2
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=1" "$CONF"
    write_if_changed "NodeName=$HOST Name=gpu File=$DIR/fakegpu0" "$DIR/gres.conf"

    # Client commands (sbatch, squeue, sinfo) read /etc/slurm; point it at ours,
    # but never overwrite a real cluster's configuration.
    mkdir -p /etc/slurm
    local f
    for f in slurm.conf gres.conf; do
        if [[ -e /etc/slurm/$f || -L /etc/slurm/$f ]] \
            && [[ "$(readlink /etc/slurm/$f || true)" != "$DIR/$f" ]]; then
            die "/etc/slurm/$f exists and is not ours; refusing to replace it"
        fi
        ln -sfn "$DIR/$f" "/etc/slurm/$f"
    done
}

stop_pid() {  # stop_pid NAME PIDFILE
    alive "$2" || return 0
    local pid i
    pid="$(cat "$2")"
    kill "$pid"
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    log "$1 did not stop, killing it"
    kill -9 "$pid" 2>/dev/null || true
}

wait_idle() {
    local state i
    for i in $(seq 120); do
        state="$(sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1 || true)"
        case "$state" in
            idle | mixed | allocated) return 0 ;;
            *drain* | *inval* | *down*)
                # e.g. left drained by an earlier bad config
                scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node $HOST not idle after 60 s (state: '${state:-unknown}'); logs in $DIR/log"
}

cmd_up() {
    preflight
    local t0=$SECONDS
    install_packages
    start_munge
    write_config
    if [[ $CHANGED == 1 ]] && { alive "$DIR/slurmctld.pid" || alive "$DIR/slurmd.pid"; }; then
        log "configuration changed, restarting slurm daemons"
        stop_pid slurmd "$DIR/slurmd.pid"
        stop_pid slurmctld "$DIR/slurmctld.pid"
    fi
    alive "$DIR/slurmctld.pid" || SLURM_CONF="$CONF" slurmctld -f "$CONF"
    alive "$DIR/slurmd.pid" || SLURM_CONF="$CONF" slurmd -f "$CONF"
    wait_idle
    log "up in $((SECONDS - t0)) s: node $HOST, partitions cpu (default) and gpu, 1 fake GPU; dir $DIR"
}

cmd_down() {
    stop_pid slurmd "$DIR/slurmd.pid"
    stop_pid slurmctld "$DIR/slurmctld.pid"
    stop_pid munged "$MUNGE_PID"
    log "down"
}

cmd_status() {
    local ok=0 name pidfile
    for name in munged slurmctld slurmd; do
        pidfile="$DIR/$name.pid"
        [[ $name == munged ]] && pidfile=$MUNGE_PID
        if alive "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"
        else echo "$name: stopped"; ok=1; fi
    done
    [[ $ok == 0 ]] && sinfo -N -o '%N %P %T %G'
    return $ok
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
