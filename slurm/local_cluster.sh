#!/usr/bin/env bash
# Start and stop a real, local, multi-node SLURM cluster on this single machine.
#
# One slurmctld and N slurmd daemons (nodes n1..nN) run on loopback, each slurmd
# with its own port, spool, pid and log file. Nodes advertise fake GPUs
# (symlinks to /dev/null used as gres devices) so that production request shapes such as
# `--gpus-per-node=8 --ntasks-per-node=8` are scheduled for real. Meant for
# developers and CI; needs root (it installs packages, starts munge, and edits
# /etc/hosts and /etc/slurm). See `--help`.
set -euo pipefail

readonly PROG="local_cluster"
readonly ETC_SLURM="/etc/slurm"
readonly HOSTS_FILE="/etc/hosts"
readonly HOSTS_BEGIN="# BEGIN imret local slurm cluster (managed by slurm/local_cluster.sh)"
readonly HOSTS_END="# END imret local slurm cluster"
readonly BACKUP_SUFFIX=".imret-local-backup"
readonly MUNGE_KEY="/etc/munge/munge.key"
readonly MUNGE_PIDFILE="/run/munge/munged.pid"

# Defaults (overridable by options).
NODES=2
GPUS=8
CPUS=8
MEM_MB=16000
PORT=6817          # SlurmctldPort; slurmd of node i listens on PORT+i
DIR="/tmp/imret-slurm"
TIMEOUT=60         # seconds `up` waits for every node to become idle
RESET=0            # `up --reset`: cancel every job and wipe the state even when the shape is the same

log() { echo "$PROG: $*"; }
warn() { echo "$PROG: warning: $*" >&2; }
# While `up` repairs a cluster, every error also says how to start afresh.
FAIL_HINT=""
die() { echo "$PROG: error: $*${FAIL_HINT}" >&2; exit 1; }

usage() {
    cat <<EOF
Usage: slurm/local_cluster.sh COMMAND [OPTIONS]

Start/stop a real multi-node SLURM cluster (slurmctld + one slurmd per node,
all on 127.0.0.1) on this machine. Must run as root.

Commands:
  up      Install slurm-wlm/munge if missing, write configs, start munge (if
          not running), slurmctld and one slurmd per node, then wait until all
          nodes are idle/alloc/mix. If a cluster of the same shape is already
          in DIR, 'up' repairs it and keeps its jobs: it starts only the
          daemons that are not running (munge, slurmctld, single slurmd's),
          resumes nodes left DOWN/DRAIN, and says "already up and healthy"
          when nothing was missing. A cluster of a different shape (or with a
          config this script would not write) is restarted from scratch: its
          jobs are cancelled and its state is wiped.
  up --reset
          Start from scratch even when the shape is the same: cancel every
          job, stop the daemons, wipe the state, spool and logs, start afresh.
  down    Stop this cluster's daemons (and any job processes they started),
          remove the /etc/hosts block, restore /etc/slurm, stop munge if 'up'
          started it. Exits 0 when nothing is up.
  status  Print daemon state, 'sinfo' and 'squeue'. Exit 0 when up and every
          node is idle/alloc/mix, 1 when up but unhealthy, 3 when not up.

Options:
  --nodes N            number of nodes n1..nN            (up; default $NODES)
  --gpus-per-node G    fake GPUs per node, 0 for none    (up; default $GPUS)
  --cpus-per-node C    CPUs per node                     (up; default $CPUS)
  --mem-mb M           RealMemory per node in MB         (up; default $MEM_MB)
  --port P             SlurmctldPort; slurmd i uses P+i  (up; default $PORT)
  --timeout S          seconds to wait for idle nodes    (up; default $TIMEOUT)
  --reset              cancel all jobs, wipe, start afresh (up)
  --dir DIR            runtime directory: configs, fake GPU files, state,
                       spool, logs, pid files            (default $DIR)
  -h, --help           show this help

After 'up', /etc/slurm/slurm.conf is a symlink to DIR/slurm.conf, so sbatch,
squeue, sinfo, scontrol and srun find the cluster; 'export SLURM_CONF=DIR/slurm.conf'
works as well. Logs: DIR/log/slurmctld.log and DIR/log/slurmd-nI.log.
EOF
}

# ---------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

parse_args() {
    local cmd="$1"; shift
    while (($#)); do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
            --dir=*) DIR="${1#*=}"; shift ;;
            --reset)
                [[ "$cmd" == up ]] || die "--reset is only valid for 'up' ('down' always stops everything)"
                RESET=1; shift ;;
            --nodes|--gpus-per-node|--cpus-per-node|--mem-mb|--port|--timeout)
                [[ "$cmd" == up ]] || die "$1 is only valid for 'up'"
                (($# >= 2)) || die "$1 needs a value"
                set_numeric_option "$1" "$2"; shift 2 ;;
            --nodes=*|--gpus-per-node=*|--cpus-per-node=*|--mem-mb=*|--port=*|--timeout=*)
                [[ "$cmd" == up ]] || die "${1%%=*} is only valid for 'up'"
                set_numeric_option "${1%%=*}" "${1#*=}"; shift ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
    done
    [[ "$DIR" == /* ]] || DIR="$(pwd)/$DIR"
    DIR="${DIR%/}"
    [[ -n "$DIR" && "$DIR" != "/" ]] || die "--dir must not be /"
    CONF="$DIR/slurm.conf"
    STATE="$DIR/cluster.state"
}

set_numeric_option() {
    local opt="$1" val="$2"
    is_uint "$val" || die "$opt expects a non-negative integer, got '$val'"
    case "$opt" in
        --nodes) NODES="$val"; ((NODES >= 1)) || die "--nodes must be >= 1" ;;
        --gpus-per-node) GPUS="$val" ;;
        --cpus-per-node) CPUS="$val"; ((CPUS >= 1)) || die "--cpus-per-node must be >= 1" ;;
        --mem-mb) MEM_MB="$val"; ((MEM_MB >= 1)) || die "--mem-mb must be >= 1" ;;
        --port) PORT="$val"; ((PORT >= 1024 && PORT <= 65000)) || die "--port must be in 1024..65000" ;;
        --timeout) TIMEOUT="$val" ;;
    esac
}

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

require_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (it starts munge/slurm and edits /etc/hosts, /etc/slurm)"
}

node_names() {  # n1 n2 ... nN
    local i; for ((i = 1; i <= NODES; i++)); do printf 'n%d ' "$i"; done
}

shape() { echo "nodes=$NODES gpus=$GPUS cpus=$CPUS mem_mb=$MEM_MB port=$PORT"; }

# The state file is KEY=VALUE lines written by this script; read it without
# `source` so that a corrupt file cannot execute anything.
state_get() {
    local key="$1"
    [[ -f "$STATE" ]] || return 0
    sed -n "s/^${key}=//p" "$STATE" | tail -n 1
}

state_set() {
    local key="$1" val="$2" tmp
    mkdir -p "$DIR"
    tmp="$(mktemp "$DIR/.state.XXXXXX")"
    { [[ -f "$STATE" ]] && grep -v "^${key}=" "$STATE" || true; echo "${key}=${val}"; } >"$tmp"
    mv -f "$tmp" "$STATE"
}

# A pid counts as ours only if it is alive AND runs the expected program, so a
# recycled pid from a stale pid file is never signalled.
pid_is() {
    local pid="$1" comm="$2"
    [[ -n "$pid" ]] && is_uint "$pid" && proc_alive "$pid" \
        && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]]
}

# Alive = exists and is not a zombie (daemons exit as zombies until init reaps them).
proc_alive() {
    local st
    st="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

any_alive() {
    local pid
    for pid in "$@"; do proc_alive "$pid" && return 0; done
    return 1
}

pid_from_file() { [[ -f "$1" ]] && tr -dc '0-9' <"$1" || true; }

ctld_pidfile() { echo "$DIR/run/slurmctld.pid"; }

# Pids of this cluster's daemons that are alive, one per line. Reads
# every slurmd pid file in DIR/run, not just n1..nN, because the running
# cluster may have a different shape than the one requested now.
our_daemon_pids() {
    local f pid
    pid="$(pid_from_file "$(ctld_pidfile)")"
    pid_is "$pid" slurmctld && echo "$pid"
    for f in "$DIR"/run/slurmd-*.pid; do
        [[ -f "$f" ]] || continue
        pid="$(pid_from_file "$f")"
        pid_is "$pid" slurmd && echo "$pid"
    done
    return 0
}

# slurmstepd (one per job step) detaches from slurmd (its parent becomes init)
# and rewrites its environment, so it is recognised by where it lives: its
# working directory is slurmd's log directory DIR/log and it holds
# DIR/log/slurmd-<node>.log open.
our_stepd_pids() {
    local pid fd
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
        proc_alive "$pid" || continue
        if [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$DIR/"* ]]; then
            echo "$pid"; continue
        fi
        for fd in /proc/"$pid"/fd/*; do
            if [[ "$(readlink "$fd" 2>/dev/null)" == "$DIR/log/slurmd-"* ]]; then
                echo "$pid"; break
            fi
        done
    done
    return 0
}

# All descendants (children, grandchildren, ...) of the given pids: the job
# scripts and tasks under our slurmstepds, slurmctld's slurmscriptd.
descendants_of() {
    (($#)) || return 0
    ps -e -o pid= -o ppid= | awk -v roots="$*" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) mark[r[i]] = 1
            changed = 1
            while (changed) {
                changed = 0
                for (i in pids) { p = pids[i]
                    if (!(p in mark) && (parent[p] in mark)) { mark[p] = 1; out[p] = 1; changed = 1 } }
            }
            for (p in out) print p
        }'
}

port_in_use() {
    local p="$1"
    if command -v ss >/dev/null 2>&1; then
        [[ -n "$(ss -Htln "sport = :$p" 2>/dev/null)" ]]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null
    fi
}

# Run a slurm client command against this cluster's config, whatever /etc says.
sl() { SLURM_CONF="$CONF" "$@"; }

# "NAME STATE" per node; STATE is sinfo's compact state (idle, alloc, down*, ...).
node_states() { sl sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }

# True when every node of the cluster is idle, allocated or mixed (a trailing
# '*' = not responding, '~' = powered off, etc. make a node unhealthy).
all_nodes_healthy() {
    local states
    states="$(node_states)" || return 1
    [[ -n "$states" ]] || return 1
    ! awk '$2 !~ /^(idle|alloc|mix)$/ { bad = 1 } END { exit !bad }' <<<"$states"
}

# ---------------------------------------------------------------------------
# Packages and munge
# ---------------------------------------------------------------------------

ensure_packages() {
    local missing=0 b
    for b in slurmctld slurmd munged munge sbatch srun sinfo; do
        command -v "$b" >/dev/null 2>&1 || missing=1
    done
    if ((missing)); then
        log "installing slurm-wlm and munge with apt-get (slurmctld/slurmd/munged missing)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q slurm-wlm munge >/dev/null
    fi
    command -v slurmctld >/dev/null 2>&1 || die "slurmctld still missing after install"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# pgrep also lists a just-stopped munged that init has not reaped yet.
munge_running() {
    local pid
    for pid in $(pgrep -x munged 2>/dev/null || true); do
        proc_alive "$pid" && return 0
    done
    return 1
}

# Start munged unless one is already running. Records in the state file whether
# we started it, so that `down` leaves a pre-existing munged alone.
ensure_munge() {
    if munge_running; then
        munge_works || die "munged is running but 'munge -n | unmunge' fails; fix munge first"
        [[ -n "$(state_get MUNGE_STARTED)" ]] || state_set MUNGE_STARTED 0
        return 0
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null \
            || dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
    log "starting munged"
    su -s /bin/sh munge -c munged
    local i
    for ((i = 0; i < 50; i++)); do munge_works && break; sleep 0.2; done
    munge_works || die "munged started but 'munge -n | unmunge' fails (see /var/log/munge/munged.log)"
    state_set MUNGE_STARTED 1
}

stop_munge_if_ours() {
    [[ "$(state_get MUNGE_STARTED)" == 1 ]] || { munge_running && log "leaving munged running (it was running before 'up')"; return 0; }
    local pid i
    pid="$(pid_from_file "$MUNGE_PIDFILE")"
    if pid_is "$pid" munged; then
        log "stopping munged (pid $pid, started by 'up')"
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do pid_is "$pid" munged || break; sleep 0.1; done
        pid_is "$pid" munged && kill -9 "$pid" 2>/dev/null || true
    fi
}

# ---------------------------------------------------------------------------
# Configuration files
# ---------------------------------------------------------------------------

# Slurm host-list style range: "prefix[lo-hi]", or "prefixlo" when lo == hi.
range_expr() { if (($2 == $3)); then echo "$1$2"; else echo "$1[$2-$3]"; fi; }

# Job ids must not repeat across fresh starts (which wipe the state):
# submitit names its files after the job id, so a reused id could pick up a
# previous run's pickles. Start after the highest id the last controller log
# mentions, and never below a clock-derived id (in case DIR was deleted).
pick_first_job_id() {
    local by_time last
    by_time=$(( ($(date +%s) % 600000) * 100 + 1 ))
    last="$(grep -ho 'JobId=[0-9]*' "$DIR/log/slurmctld.log" 2>/dev/null | tr -dc '0-9\n' | sort -n | tail -n 1 || true)"
    last="${last:-0}"
    if ((last + 1 > by_time)); then by_time=$((last + 1)); fi
    ((by_time < 60000000)) || by_time=1   # MaxJobId is 67043328
    echo "$by_time"
}

# The directories and fake GPU devices the daemons need. Idempotent, and it
# never removes anything, so `up` can also run it to repair a cluster.
make_dirs() {
    local i
    mkdir -p "$DIR"/{state,spool,log,run,gpus}
    chmod 0755 "$DIR"

    # Fake GPU devices. A GPU gres without File= is dropped by slurmd ("Removing
    # file-less GPU") and the node goes INVAL. With empty regular files the
    # node schedules gpu:G, but slurmd discards them as "not a valid character
    # or block device", so jobs get SLURM_GPUS_ON_NODE=G and an EMPTY
    # CUDA_VISIBLE_DEVICES. Symlinks to /dev/null stat as character devices,
    # and slurmd takes the device number from the trailing digits of the name,
    # so jobs get CUDA_VISIBLE_DEVICES=0,1,... as on a real GPU node.
    for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$DIR/gpus/nvidia$i"; done
    for ((i = 1; i <= NODES; i++)); do mkdir -p "$DIR/spool/n$i"; done
}

# slurm.conf of the requested shape, on stdout.
slurm_conf_text() {
    local host i first_job_id="$1"
    host="$(hostname -s)"
    {
        cat <<EOF
# Generated by slurm/local_cluster.sh -- do not edit; rerun 'up' instead.
# Shape: $(shape)
ClusterName=imret-local
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start
# again (default 120 s): keep requeue tests (scontrol requeue, submitit
# preemption/timeout) fast.
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$(ctld_pidfile)
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups on CI machines/containers: track processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Nodes may be larger than this machine (8 CPUs each on a 2-core box).
SlurmdParameters=config_overrides
# A node that was DOWN becomes usable again as soon as its slurmd registers.
ReturnToService=2
# submitit requeues jobs on preemption/timeout with 'scontrol requeue'.
JobRequeue=1
FirstJobId=$first_job_id
# The grace period between SIGTERM and SIGKILL: imret's ranks save at the end of
# their current step when SIGTERM comes (scancel, scontrol requeue), and on a
# busy 2-core test machine one step of the tests' tiny models took up to 5 s
# (SLURM's default is 30 s). Processes that end on SIGTERM do not wait for it.
# Finished jobs stay visible to squeue/scontrol for 5 minutes.
KillWait=15
MinJobAge=300
InactiveLimit=0
# Debian's default MailProg (/usr/bin/mail) is usually absent: avoid the log error.
MailProg=/bin/true
Waittime=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
GresTypes=gpu
EOF
        for ((i = 1; i <= NODES; i++)); do
            printf 'NodeName=n%d NodeHostname=%s NodeAddr=127.0.0.1 Port=%d CPUs=%d RealMemory=%d%s State=UNKNOWN\n' \
                "$i" "$host" $((PORT + i)) "$CPUS" "$MEM_MB" "$( ((GPUS > 0)) && echo " Gres=gpu:$GPUS")"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    }
}

# gres.conf of the requested shape, on stdout.
gres_conf_text() {
    local i
    echo "# Generated by slurm/local_cluster.sh: fake GPUs (symlinks to /dev/null)."
    echo "AutoDetect=off"
    if ((GPUS > 0)); then
        for ((i = 1; i <= NODES; i++)); do
            echo "NodeName=n$i Name=gpu File=$(range_expr "$DIR/gpus/nvidia" 0 $((GPUS - 1)))"
        done
    fi
}

write_configs() {
    make_dirs
    slurm_conf_text "$1" >"$CONF"
    gres_conf_text >"$DIR/gres.conf"
    chmod 0644 "$CONF" "$DIR/gres.conf"
}

# True when DIR holds exactly the configs this script writes for the requested
# shape (FirstJobId aside, which is picked at each fresh start). A cluster whose
# config was edited, or written by another version of this script or on another
# host name, is not repaired in place: its saved state belongs to that config.
configs_are_current() {
    local first
    [[ -f "$CONF" && -f "$DIR/gres.conf" ]] || return 1
    first="$(sed -n 's/^FirstJobId=//p' "$CONF")"
    [[ -n "$first" ]] || return 1
    [[ "$(slurm_conf_text "$first")" == "$(cat "$CONF")" ]] && [[ "$(gres_conf_text)" == "$(cat "$DIR/gres.conf")" ]]
}

# Make /etc/slurm/{slurm,gres}.conf point at DIR so that every slurm command
# (and srun inside jobs) finds this cluster without SLURM_CONF. A real file (or
# foreign symlink) that is there already is moved aside and restored by `down`.
link_etc_slurm() {
    local f dst
    mkdir -p "$ETC_SLURM"
    for f in slurm.conf gres.conf; do
        dst="$ETC_SLURM/$f"
        if [[ -L "$dst" && "$(readlink "$dst")" == "$DIR/$f" ]]; then
            continue
        fi
        if [[ -e "$dst" || -L "$dst" ]]; then
            [[ -e "$dst$BACKUP_SUFFIX" || -L "$dst$BACKUP_SUFFIX" ]] \
                && die "$dst exists and so does its backup $dst$BACKUP_SUFFIX; resolve by hand"
            log "backing up existing $dst to $dst$BACKUP_SUFFIX"
            mv "$dst" "$dst$BACKUP_SUFFIX"
            state_set "BACKUP_${f%.conf}" 1
        fi
        ln -s "$DIR/$f" "$dst"
    done
}

unlink_etc_slurm() {
    local f dst
    for f in slurm.conf gres.conf; do
        dst="$ETC_SLURM/$f"
        if [[ -L "$dst" && "$(readlink "$dst")" == "$DIR/$f" ]]; then
            rm -f "$dst"
        fi
        if [[ "$(state_get "BACKUP_${f%.conf}")" == 1 ]] && [[ -e "$dst$BACKUP_SUFFIX" || -L "$dst$BACKUP_SUFFIX" ]]; then
            if [[ -e "$dst" || -L "$dst" ]]; then
                warn "not restoring $dst$BACKUP_SUFFIX: $dst exists again"
            else
                log "restoring $dst from $dst$BACKUP_SUFFIX"
                mv "$dst$BACKUP_SUFFIX" "$dst"
            fi
        fi
    done
}

# /etc/hosts may be a bind mount (containers), where sed -i / mv fail: rewrite
# it in place instead of replacing the file.
hosts_without_block() {
    awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '
        $0 == b { skip = 1; next }
        $0 == e { skip = 0; next }
        !skip' "$HOSTS_FILE"
}

add_hosts_block() {
    local content
    content="$(hosts_without_block)"
    printf '%s\n%s\n127.0.0.1 %s\n%s\n' "$content" "$HOSTS_BEGIN" "$(node_names | sed 's/ $//')" "$HOSTS_END" >"$HOSTS_FILE"
}

remove_hosts_block() {
    grep -qxF "$HOSTS_BEGIN" "$HOSTS_FILE" 2>/dev/null || return 0
    local content
    content="$(hosts_without_block)"
    printf '%s\n' "$content" >"$HOSTS_FILE"
}

# ---------------------------------------------------------------------------
# Daemons
# ---------------------------------------------------------------------------

show_logs() {
    local f
    echo "$PROG: ---- sinfo -R (reasons) ----" >&2
    sl sinfo -R >&2 2>&1 || true
    for f in "$DIR/log/slurmctld.log" "$DIR"/log/slurmd-*.log; do
        [[ -f "$f" ]] || continue
        echo "$PROG: ---- tail of $f ----" >&2
        tail -n 25 "$f" >&2
    done
}

check_ports_free() {
    local p
    for ((p = PORT; p <= PORT + NODES; p++)); do
        if port_in_use "$p"; then
            ss -Htlnp "sport = :$p" 2>/dev/null >&2 || true
            die "port $p is already in use; pick another base with --port (cluster needs $PORT..$((PORT + NODES)))"
        fi
    done
}

check_port_free() {
    local p="$1" what="$2"
    port_in_use "$p" || return 0
    ss -Htlnp "sport = :$p" 2>/dev/null >&2 || true
    die "port $p, which $what of $DIR needs, is in use by another process (listed above);" \
        "stop it, or run '$0 down --dir $DIR' and 'up' again"
}

# Without -c, slurmctld recovers the jobs and node states saved in DIR/state.
start_slurmctld() {
    local deadline
    log "starting slurmctld (port $PORT)"
    slurmctld -f "$CONF" || { show_logs; die "slurmctld failed to start"; }
    deadline=$((SECONDS + 20))
    until sl scontrol ping 2>/dev/null | grep -q 'is UP'; do
        if ((SECONDS > deadline)); then show_logs; die "slurmctld did not answer 'scontrol ping' within 20 s"; fi
        sleep 0.3
    done
}

# A restarted slurmd finds the job steps (slurmstepd) that outlived the old one
# through the sockets in its spool directory, so running jobs keep running.
start_slurmd() {
    local i="$1"
    log "starting slurmd n$i (port $((PORT + i)))"
    slurmd -f "$CONF" -N "n$i" || { show_logs; die "slurmd n$i failed to start"; }
}

start_daemons() {
    local i
    start_slurmctld
    for ((i = 1; i <= NODES; i++)); do start_slurmd "$i"; done
}

# When slurmctld last heard node $1's slurmd start, in seconds since the epoch
# (0 when it never did).
slurmd_start_time() {
    local t
    t="$(sl scontrol show node "$1" -o 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2 || true)"
    [[ "$t" == [0-9]* ]] && date -d "$t" +%s 2>/dev/null || echo 0
}

# Until a restarted slurmd registers, slurmctld still reports its node as it was
# before the old slurmd died (e.g. idle), so node states alone prove nothing.
wait_for_registration() {
    local since="$1" node deadline=$((SECONDS + TIMEOUT)); shift
    for node in "$@"; do
        until (($(slurmd_start_time "$node") >= since)); do
            if ((SECONDS > deadline)); then
                show_logs; die "slurmd $node did not register with slurmctld within ${TIMEOUT} s"
            fi
            sleep 0.3
        done
    done
}

# Wait until every node is idle. Nodes whose slurmd registered but that are
# stuck in INVAL/DRAIN/DOWN are resumed once, a node at a time (slurm 22.05
# refuses INVAL->RESUME, and one refusal would fail a whole node list; an
# INVAL node needs a config fix, see 'sinfo -R' in the error output).
wait_for_idle() {
    local deadline=$((SECONDS + TIMEOUT)) resumed=0 states stuck
    while :; do
        if all_nodes_healthy; then return 0; fi
        states="$(node_states || true)"
        # Only resume nodes whose slurmd responds (no '*' suffix): resuming a
        # node that has not registered yet would just set it DOWN again.
        stuck="$(awk '$2 ~ /^(inval|drain|drng|down|fail)$/ { print $1 }' <<<"$states")"
        if ((!resumed)) && [[ -n "$stuck" ]] && ((SECONDS > deadline - TIMEOUT + 3)); then
            log "resuming nodes stuck down/drained/invalid: $(paste -sd' ' - <<<"$stuck")"
            local node
            for node in $stuck; do
                sl scontrol update nodename="$node" state=resume || true
            done
            resumed=1
        fi
        if ((SECONDS > deadline)); then
            echo "$PROG: ---- sinfo ----" >&2
            sl sinfo -N >&2 || true
            show_logs
            die "nodes not all idle after ${TIMEOUT} s (cluster left running for inspection; '$0 down --dir $DIR' cleans up)"
        fi
        sleep 0.5
    done
}

# Stop this cluster: cancel its jobs, `scontrol shutdown`, then kill whatever
# is left of the processes recorded in DIR/run (and their job processes).
stop_daemons() {
    local daemons=() stepds=() children=() pid i
    mapfile -t daemons < <(our_daemon_pids)
    mapfile -t stepds < <(our_stepd_pids)
    ((${#daemons[@]} + ${#stepds[@]})) || return 0

    local ctld; ctld="$(pid_from_file "$(ctld_pidfile)")"
    if pid_is "$ctld" slurmctld; then
        local jobs; jobs="$(sl squeue -h -o %i 2>/dev/null | paste -sd' ' - || true)"
        if [[ -n "$jobs" ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            sl scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 20; i++)); do
                [[ -z "$(sl squeue -h -t R,CG -o %i 2>/dev/null)" ]] && break; sleep 0.5
            done
        fi
        log "scontrol shutdown"
        sl scontrol shutdown >/dev/null 2>&1 || true
        # The daemons remove their pid files on shutdown, so wait on the pids.
        for ((i = 0; i < 75; i++)); do
            any_alive "${daemons[@]}" || break; sleep 0.2
        done
    fi
    # Whatever is left: daemons that ignored the shutdown, and job steps (with
    # their tasks) that outlived it, e.g. when slurmctld had died before `down`.
    mapfile -t stepds < <(our_stepd_pids)
    mapfile -t children < <(descendants_of "${daemons[@]}" "${stepds[@]}")
    local leftover=()
    for pid in "${daemons[@]}" "${stepds[@]}" "${children[@]}"; do
        if proc_alive "$pid"; then
            log "killing leftover pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null || echo '?'))"
            kill "$pid" 2>/dev/null || true
            leftover+=("$pid")
        fi
    done
    ((${#leftover[@]})) || return 0
    for ((i = 0; i < 25; i++)); do
        any_alive "${leftover[@]}" || return 0; sleep 0.2
    done
    for pid in "${leftover[@]}"; do
        proc_alive "$pid" && kill -9 "$pid" 2>/dev/null || true
    done
    return 0
}

# Full teardown. With keep_munge=1 (restart on shape change) munge stays up and
# the record of whether we started it is kept for the final `down`.
teardown() {
    local keep_munge="${1:-0}"
    stop_daemons
    remove_hosts_block
    unlink_etc_slurm
    ((keep_munge)) || stop_munge_if_ours
    rm -f "$DIR"/run/*.pid
    if ((keep_munge)); then
        local m; m="$(state_get MUNGE_STARTED)"
        rm -f "$STATE"; [[ -z "$m" ]] || state_set MUNGE_STARTED "$m"
    else
        rm -f "$STATE"
    fi
}

# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

print_hint() {
    log "sinfo:"
    sl sinfo -N -o '%N %P %t %c %m %G' | sed 's/^/  /'
    log "the slurm commands use /etc/slurm/slurm.conf -> $CONF; in other shells you may also"
    echo "export SLURM_CONF=$CONF"
}

# The daemons of a same-shape cluster that are not running: "slurmctld" and/or
# node names, one per line.
missing_daemons() {
    local i pid
    pid="$(pid_from_file "$(ctld_pidfile)")"
    pid_is "$pid" slurmctld || echo slurmctld
    for ((i = 1; i <= NODES; i++)); do
        pid="$(pid_from_file "$DIR/run/slurmd-n$i.pid")"
        pid_is "$pid" slurmd || echo "n$i"
    done
    return 0
}

# Bring a cluster of the requested shape back to health and keep its jobs:
# start only the daemons that are not running, wait until the restarted slurmd's
# have registered, and resume nodes left DOWN/DRAIN (wait_for_idle).
repair_cluster() {
    local t0=$SECONDS missing=() restarted=() node since problems=""
    mapfile -t missing < <(missing_daemons)
    ((${#missing[@]} == 0)) || problems+="; not running: ${missing[*]}"
    munge_running || problems+="; munged is not running"
    if [[ "${missing[0]:-}" != slurmctld ]]; then
        local states; states="$(node_states || true)"
        if [[ -z "$states" ]]; then
            problems+="; sinfo shows no nodes"
        else
            problems+="$(awk '$2 !~ /^(idle|alloc|mix)$/ { printf "; node %s is %s", $1, $2 }' <<<"$states")"
        fi
    fi
    if [[ -z "$problems" ]]; then
        log "cluster in $DIR is already up and healthy ($(shape))"
        return 0
    fi
    log "cluster in $DIR is not healthy (${problems#; }); repairing it, keeping its jobs and state"
    FAIL_HINT=" ('$0 up --reset --dir $DIR' starts afresh, cancelling every job)"
    ensure_munge
    make_dirs
    link_etc_slurm
    add_hosts_block
    if [[ "${missing[0]:-}" == slurmctld ]]; then
        check_port_free "$PORT" slurmctld
        start_slurmctld
        missing=("${missing[@]:1}")
    fi
    since="$(date +%s)"
    for node in "${missing[@]}"; do
        check_port_free $((PORT + ${node#n})) "slurmd $node"
        start_slurmd "${node#n}"
        restarted+=("$node")
    done
    wait_for_registration "$since" "${restarted[@]}"
    log "waiting up to ${TIMEOUT} s for $NODES node(s) to become idle/alloc/mix"
    wait_for_idle
    FAIL_HINT=""
    log "cluster repaired in $((SECONDS - t0)) s; $(sl squeue -h -o %i 2>/dev/null | wc -l) job(s) kept in the queue"
}

cmd_up() {
    require_root
    ensure_packages
    local t0=$SECONDS wipe=""
    if [[ -f "$STATE" ]]; then
        local running_shape; running_shape="$(state_get SHAPE)"
        if ((RESET)); then
            wipe="--reset asks for it"
        elif [[ "$running_shape" != "$(shape)" ]]; then
            wipe="it has a different shape ($running_shape)"
        elif ! configs_are_current; then
            wipe="its config in $DIR is not what this script writes for $(shape)"
            wipe+=" (edited by hand, or written by another version of the script or on another host name)"
        else
            repair_cluster
            print_hint
            return 0
        fi
        log "restarting the cluster in $DIR from scratch as $(shape): $wipe; every job is cancelled and the state is wiped"
        teardown 1
    elif [[ -n "$(our_daemon_pids)" ]]; then
        log "stale daemons from $DIR are running without a state file; stopping them"
        stop_daemons
    fi
    check_ports_free

    # A fresh start: saved state from another shape or config could bring back
    # stale jobs or node states.
    local first_job_id; first_job_id="$(pick_first_job_id)"
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/gpus" "$DIR/log"
    mkdir -p "$DIR"
    state_set SHAPE "$(shape)"
    ensure_munge
    write_configs "$first_job_id"
    link_etc_slurm
    add_hosts_block
    start_daemons
    log "waiting up to ${TIMEOUT} s for $NODES node(s) to become idle"
    wait_for_idle
    log "cluster up in $((SECONDS - t0)) s: $NODES node(s) x $CPUS CPUs, $GPUS fake GPU(s), ${MEM_MB} MB, partition 'debug'"
    print_hint
}

cmd_down() {
    require_root
    if [[ ! -f "$STATE" && -z "$(our_daemon_pids)" && -z "$(our_stepd_pids)" ]]; then
        # Still clean up leftovers of an interrupted `up` that point at DIR.
        remove_hosts_block
        unlink_etc_slurm
        log "nothing is up in $DIR"
        return 0
    fi
    teardown 0
    local left; left="$(our_daemon_pids | paste -sd' ' -)"
    [[ -z "$left" ]] || die "daemons still running after down: $left"
    log "cluster in $DIR is down (logs kept in $DIR/log)"
}

cmd_status() {
    if [[ ! -f "$STATE" ]]; then
        log "not up (no state in $DIR)"
        return 3
    fi
    local ctld n_slurmd
    ctld="$(pid_from_file "$(ctld_pidfile)")"
    if ! pid_is "$ctld" slurmctld; then
        log "DOWN: slurmctld of $DIR is not running"
        return 3
    fi
    n_slurmd=$(($(our_daemon_pids | wc -l) - 1))
    local shape_now n_expected
    shape_now="$(state_get SHAPE)"
    n_expected="$(sed -n 's/^nodes=\([0-9]*\) .*/\1/p' <<<"$shape_now")"
    log "slurmctld pid $ctld; $n_slurmd of ${n_expected:-?} slurmd(s) running; shape: $shape_now"
    log "sinfo:"
    sl sinfo -N -o '%N %P %t %c %m %G' | sed 's/^/  /' || true
    log "squeue:"
    sl squeue | sed 's/^/  /' || true
    # slurmctld notices a dead slurmd only after SlurmdTimeout, so count them too.
    if [[ "$n_slurmd" != "$n_expected" ]]; then
        log "UNHEALTHY: expected $n_expected slurmd(s), $n_slurmd running"
        return 1
    fi
    if all_nodes_healthy; then
        log "UP: all nodes idle/alloc/mix"
        return 0
    fi
    log "UNHEALTHY: some nodes are not idle/alloc/mix"
    return 1
}

main() {
    (($#)) || { usage >&2; exit 2; }
    local cmd="$1"; shift
    case "$cmd" in
        -h|--help|help) usage; exit 0 ;;
        up|down|status) ;;
        *) echo "$PROG: error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
    esac
    parse_args "$cmd" "$@"
    # Debian puts the daemons in /usr/sbin, which is not always on PATH in CI.
    case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
    "cmd_$cmd"
}

main "$@"
