#!/usr/bin/env bash
# A throw-away but REAL multi-node Slurm cluster on this one machine, for tests and CI.
#
#   local-cluster.sh install   # apt-get the Slurm/munge/MariaDB packages (root, Debian/Ubuntu)
#   local-cluster.sh start     # fresh cluster: 4 nodes n[1-4] x 4 fake GPUs, partition "debug"
#   local-cluster.sh stop      # cancel jobs, stop every daemon of this cluster
#   local-cluster.sh status    # daemons, nodes, queue
#   local-cluster.sh env       # prints: export SLURM_CONF=<dir>/slurm.conf
#
# Everything (configs, state, spool, logs, pid files, database, munge key/socket) lives under
# one directory: $AREAL_SLURM_DIR (default /tmp/areal-slurm). `start` always begins from
# scratch: it stops a cluster left there (even one whose owner was killed) and wipes state
# AND database together (job ids would otherwise restart at 1 and collide in accounting).
#
# Environment knobs: AREAL_SLURM_DIR, AREAL_SLURM_NODES (4), AREAL_SLURM_GPUS (4 per node),
# AREAL_SLURM_PORT_BASE (17000: slurmctld=+0, slurmd nK=+K, slurmdbd=+90, mariadb=+91),
# AREAL_SLURM_TIMEOUT (seconds each wait may take, default 120: the machine may be busy).
set -euo pipefail

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

DIR="${AREAL_SLURM_DIR:-/tmp/areal-slurm}"
DIR="${DIR%/}"
NNODES="${AREAL_SLURM_NODES:-4}"
NGPUS="${AREAL_SLURM_GPUS:-4}"
PORT_BASE="${AREAL_SLURM_PORT_BASE:-17000}"
TIMEOUT="${AREAL_SLURM_TIMEOUT:-120}"
CLUSTER_NAME="areal"
CPUS_PER_NODE=16
MEM_PER_NODE=16000   # MB, advertised; SlurmdParameters=config_overrides makes slurmd trust it

CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCK="$MUNGE_DIR/munge.socket"
DB_DIR="$DIR/mysql"
DB_SOCK="$DIR/run/mysqld.sock"
CTLD_PORT=$((PORT_BASE))
DBD_PORT=$((PORT_BASE + 90))
DB_PORT=$((PORT_BASE + 91))
MARKER="$DIR/.areal-local-slurm"   # proves a directory is ours before we rm -rf it

# Every Slurm command (ours and the caller's) must see this; otherwise Slurm tries a
# DNS SRV lookup for the controller and fails.
export SLURM_CONF="$CONF"

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
BINARIES=(slurmctld slurmd slurmdbd sbatch srun sacct sacctmgr scontrol munged mungekey
          mariadbd mariadb-install-db mariadb)

T0="$EPOCHREALTIME"
elapsed() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'; }
log() { printf '[local-slurm %5ss] %s\n' "$(elapsed)" "$*" >&2; }
STARTING=0
die() {
    printf '[local-slurm] ERROR: %s\n' "$*" >&2
    ((STARTING)) && printf '[local-slurm] daemons started so far keep running; stop them: %s stop\n' "$0" >&2
    exit 1
}

# wait_for DESCRIPTION COMMAND... : poll (not a fixed sleep) until COMMAND succeeds.
wait_for() {
    local what="$1"; shift
    local deadline=$((SECONDS + TIMEOUT)) delay=0.05
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${TIMEOUT}s waiting for: $what"
            return 1
        fi
        sleep "$delay"
        [[ $delay == 0.05 ]] && delay=0.1 || delay=0.2
    done
}

check_dir_is_safe() {
    [[ "$DIR" == /* && "$DIR" != "/" && "$DIR" != "/tmp" && "$DIR" != "/root" ]] \
        || die "refusing to use AREAL_SLURM_DIR=$DIR (must be an absolute, dedicated directory)"
}

# ----------------------------------------------------------------------------- install
binaries_present() {
    local b
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || return 1; done
}

cmd_install() {
    if binaries_present; then
        log "Slurm, munge and MariaDB are already installed"
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "install needs root (apt-get)"
    command -v apt-get >/dev/null || die "install supports apt-based systems only"
    # Package post-install scripts would try to start munge/slurm/mariadb system services
    # (with default configs, competing for ports). policy-rc.d exit 101 forbids that.
    local created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    local apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef
                    -o Dpkg::Options::=--force-confold)
    log "apt-get install ${PACKAGES[*]}"
    # Try with the existing package lists first (fast); refresh them only if that fails.
    if ! apt-get install "${apt_opts[@]}" "${PACKAGES[@]}"; then
        apt-get update -q
        apt-get install "${apt_opts[@]}" "${PACKAGES[@]}"
    fi
    if ((created_policy)); then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
    binaries_present || die "packages installed but some binaries are still missing"
    log "installed"
}

# ----------------------------------------------------------------------------- processes
re_escape() { sed 's/[][\.*^$+?(){}|]/\\&/g' <<<"$1"; }
pidfile_pid() { [[ -s "$1" ]] && tr -dc '0-9' <"$1" || true; }

# PIDs of this cluster's processes, found in /proc rather than in pid files, so that a
# cluster whose starter was killed mid-start (or whose pid files are gone) is still found.
# A process is ours when its name matches NAMES_RE and its command line or environment
# mentions our directory (--datadir=$DIR/mysql, SLURM_CONF=$DIR/slurm.conf, ...).
# Bash builtins for the per-process part: forking per /proc entry is slow on a busy machine.
our_pids() {
    local names_re="$1" p comm candidates=()
    for p in /proc/[0-9]*; do
        { read -r comm <"$p/comm"; } 2>/dev/null || continue
        [[ "$comm" =~ ^($names_re)$ ]] && candidates+=("$p")
    done
    ((${#candidates[@]})) || return 0
    local files=()
    for p in "${candidates[@]}"; do files+=("$p/cmdline" "$p/environ"); done
    # -z: NUL-separated records, so each argument / environment entry is one "line".
    local dir_re; dir_re="$(re_escape "$DIR")"
    grep -lzE -- "^(.*=)?$dir_re/|^SLURM_CONF=$dir_re/slurm\.conf\$" "${files[@]}" 2>/dev/null \
        | sed -E 's#^/proc/([0-9]+)/.*#\1#' | sort -un || true
}

# Leftover job tasks (e.g. a `sleep` whose slurmstepd was killed): processes with a
# SLURM_JOB_ID whose SLURM_CONF is ours. Never our own ancestors (we may run inside a job).
our_job_task_pids() {
    local ancestors=" " p=$$ rest pid
    while [[ "$p" -gt 1 ]]; do
        ancestors+="$p "
        { read -r _ _ _ p rest <"/proc/$p/stat"; } 2>/dev/null || break
    done
    for pid in $(grep -lzxF -- "SLURM_CONF=$CONF" /proc/[0-9]*/environ 2>/dev/null \
                 | sed -E 's#^/proc/([0-9]+)/.*#\1#'); do
        [[ "$ancestors" == *" $pid "* ]] && continue
        if grep -qz '^SLURM_JOB_ID=' "/proc/$pid/environ" 2>/dev/null; then echo "$pid"; fi
    done
    return 0
}

# True while any PID runs. A zombie counts as gone (a container's init may reap it late),
# unless other threads of it still run (a leader thread may exit before the rest).
any_alive() {
    local p stat tasks
    for p in "$@"; do
        { read -r stat <"/proc/$p/stat"; } 2>/dev/null || continue
        stat="${stat##*) }"
        [[ "${stat:0:1}" != Z ]] && return 0
        tasks=("/proc/$p/task/"*)
        ((${#tasks[@]} > 1)) && return 0
    done
    return 1
}

# terminate GRACE_S "what" PID... : SIGTERM, wait up to GRACE_S seconds, then SIGKILL.
terminate() {
    local grace="$1" what="$2"; shift 2
    (($#)) || return 0
    log "stopping $what (pid $*)"
    kill -TERM "$@" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while any_alive "$@" && ((SECONDS < deadline)); do sleep 0.1; done
    if any_alive "$@"; then
        log "$what did not exit on SIGTERM; SIGKILL"
        kill -KILL "$@" 2>/dev/null || true
        sleep 0.2
    fi
}

no_jobs_left() { [[ -z "$(squeue -h -o %A 2>/dev/null)" ]]; }
ctld_answers() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

# ----------------------------------------------------------------------------- stop
cmd_stop() {
    check_dir_is_safe
    local pids
    if [[ -f "$CONF" && -n "$(our_pids slurmctld)" ]] && ctld_answers; then
        # Cancel jobs FIRST: slurmd does not kill running steps when it shuts down, and a
        # slurmstepd whose controller is gone lingers forever.
        local jobs
        jobs="$(squeue -h -o %A 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            log "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            wait_for "jobs to end" no_jobs_left \
                || log "some jobs did not end; killing their processes below"
        fi
        log "scontrol shutdown"
        scontrol shutdown >/dev/null 2>&1 || true
        pids="$(our_pids 'slurmctld|slurmd')"
        if [[ -n "$pids" ]]; then
            local deadline=$((SECONDS + 20))
            # shellcheck disable=SC2086
            while any_alive $pids && ((SECONDS < deadline)); do sleep 0.1; done
        fi
    fi
    # Whatever is left (controller dead, earlier run or its starter killed, ...), by pid, in
    # dependency order. Pids come from /proc (see our_pids), not only from pid files, which a
    # half-finished start may not have written.
    # Steps orphaned by a dead slurmd/slurmctld, with their tasks: nothing can clean them up
    # any more, and the next cluster's nodes would look busy. Short grace: they are orphans.
    # shellcheck disable=SC2046
    terminate 2 "orphaned job steps" $(our_pids 'slurmstepd.*') $(our_job_task_pids)
    # shellcheck disable=SC2046
    terminate 15 "slurmctld/slurmd" $(our_pids 'slurmctld|slurmscriptd|slurmd')
    # The rest together: each takes ~2 s to exit on SIGTERM, and with slurmctld gone nothing
    # needs them any more (job records were flushed to slurmdbd while it was up).
    # shellcheck disable=SC2046
    terminate 15 "slurmdbd, mariadbd, munged" $(our_pids 'slurmdbd|mariadbd|mysqld|munged')
    # Job tasks re-parented when their slurmstepd went away.
    # shellcheck disable=SC2046
    terminate 2 "leftover job tasks" $(our_job_task_pids)
    # The database is never reused (start wipes it with the state); drop its ~100 MB now.
    # Logs stay in $DIR/log.
    if [[ -e "$MARKER" && -d "$DB_DIR" && -z "$(our_pids 'mariadbd|mysqld')" ]]; then
        rm -rf "$DB_DIR"
    fi
    log "stopped"
}

# ----------------------------------------------------------------------------- start
write_configs() {
    local host k g gpu_max=$((NGPUS - 1))
    host="$(hostname -s)"
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/run" "$DIR/spool" "$DIR/fakegpu"

    # Fake GPUs. gres/gpu needs device files that are character devices: symlinks to
    # /dev/null pass (regular files are rejected, File=/dev/null four times is a duplicate,
    # Count= alone is dropped as "file-less GPU").
    for ((k = 1; k <= NNODES; k++)); do
        mkdir -p "$DIR/fakegpu/n$k" "$DIR/spool/n$k"
        for ((g = 0; g < NGPUS; g++)); do ln -sf /dev/null "$DIR/fakegpu/n$k/nvidia$g"; done
    done

    cat >"$CONF" <<EOF
# Generated by tools/slurm/local-cluster.sh -- a local test cluster; do not edit by hand.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
# Everything runs as root on this machine; no system users needed.
SlurmUser=root
SlurmdUser=root
# Our own munged (own key and socket) so a system munge, if any, is irrelevant.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups/systemd here: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true

# Cores, memory and GPUs are consumable, so several jobs/steps share a node exactly.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that does not pass --mem would take the whole node's memory.
DefMemPerCPU=1000
GresTypes=gpu
# Start jobs right away: the default batch_sched_delay and 30 s backfill interval make a
# waiting job wait up to 30 s; tests want sub-second scheduling.
SchedulerParameters=batch_sched_delay=0,bf_interval=1
# Default 30 s between SIGTERM and SIGKILL makes every cancel slow.
KillWait=5
# A node that was DOWN (e.g. a slurmd killed by an earlier run) comes back by registering.
ReturnToService=2
# Keep finished jobs visible to scontrol/squeue for 5 min.
MinJobAge=300
InactiveLimit=0
# The machine may be loaded by other tests: be patient with slow daemons.
MessageTimeout=30
SlurmdTimeout=300
# Advertise the configured CPUs/memory (16 CPUs per node on a 2-core host is fine for
# light test workloads) instead of the detected hardware.
SlurmdParameters=config_overrides

# Accounting through slurmdbd, so sacct works (submitit uses it to see job states).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For slurmdbd connections Slurm reads the munge socket from here, not from AuthInfo
# ("Protocol authentication error" otherwise).
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none

# Several slurmd on one host: same hostname, same address, distinct ports; slurmd -N nK.
EOF
    for ((k = 1; k <= NNODES; k++)); do
        echo "NodeName=n$k NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT_BASE + k))" \
             "CPUs=$CPUS_PER_NODE Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS_PER_NODE" \
             "ThreadsPerCore=1 RealMemory=$MEM_PER_NODE Gres=gpu:$NGPUS State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=debug Nodes=n[1-$NNODES] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"

    {
        echo "AutoDetect=off"
        for ((k = 1; k <= NNODES; k++)); do
            echo "NodeName=n$k Name=gpu File=$DIR/fakegpu/n$k/nvidia[0-$gpu_max]"
        done
    } >"$DIR/gres.conf"

    # slurmdbd.conf is found next to $SLURM_CONF and must be mode 600 (it holds a password).
    cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/slurmdbd.conf"
}

start_munge() {
    # munged insists that the socket's directory and EVERY parent be world-executable
    # (fails under /root), and that key and dirs be private to their owner.
    mkdir -p "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"
    mungekey -c -k "$MUNGE_DIR/munge.key" 2>/dev/null \
        || dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    chmod 600 "$MUNGE_DIR/munge.key"
    munged --force --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCK" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$MUNGE_DIR/munge.seed" </dev/null >>"$DIR/log/munged.log" 2>&1
    wait_for "munged socket" test -S "$MUNGE_SOCK" || die "munged did not start; see $DIR/log/munged.log"
}

start_mariadb() {
    mkdir -p "$DB_DIR"
    # Small InnoDB files: the defaults would put ~180 MB per cluster into /tmp.
    local innodb_files=(--innodb-log-file-size=8M --innodb-data-file-path=ibdata1:4M:autoextend)
    mariadb-install-db --no-defaults --datadir="$DB_DIR" --user=root --skip-test-db \
        --skip-name-resolve --auth-root-authentication-method=socket "${innodb_files[@]}" \
        </dev/null >"$DIR/log/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
    # A throw-away database: durability is irrelevant, startup speed is not.
    # innodb_lock_wait_timeout=900 is what slurmdbd asks for.
    setsid mariadbd --no-defaults --user=root --datadir="$DB_DIR" --socket="$DB_SOCK" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
        --skip-log-bin --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 "${innodb_files[@]}" \
        --innodb-buffer-pool-size=1G --innodb-lock-wait-timeout=900 \
        </dev/null >>"$DIR/log/mariadbd.log" 2>&1 &
    wait_for "mariadbd" mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping \
        || die "mariadbd did not start; see $DIR/log/mariadbd.log"
    mariadb --no-defaults --socket="$DB_SOCK" -uroot -e "
        CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
        || die "could not create the slurm database user"
}

start_slurmdbd() {
    slurmdbd </dev/null >>"$DIR/log/slurmdbd.log" 2>&1 || die "slurmdbd failed; see $DIR/log/slurmdbd.log"
    # Register the cluster before slurmctld comes up, so its first registration and all
    # job records are stored (instead of being queued and retried later).
    wait_for "slurmdbd" sacctmgr -n -P list cluster format=cluster \
        || die "slurmdbd does not answer; see $DIR/log/slurmdbd.log"
    sacctmgr -i -Q add cluster "$CLUSTER_NAME" >/dev/null || die "sacctmgr add cluster failed"
}

start_slurm() {
    slurmctld </dev/null >>"$DIR/log/slurmctld.log" 2>&1 || die "slurmctld failed; see $DIR/log/slurmctld.log"
    local k pids=()
    for ((k = 1; k <= NNODES; k++)); do
        slurmd -N "n$k" </dev/null >>"$DIR/log/slurmd-n$k.log" 2>&1 &
        pids+=($!)
    done
    for k in "${pids[@]}"; do wait "$k" || die "a slurmd failed; see $DIR/log/slurmd-n*.log"; done
}

all_nodes_idle() {
    local out
    out="$(sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
    [[ $(grep -c . <<<"$out") -eq $NNODES ]] || return 1
    # Nodes left DOWN/DRAINED/INVALID (ReturnToService=2 does not cover every case) are
    # resumed. Plain "idle" is the goal ("idle*" means the slurmd does not answer yet).
    local bad
    bad="$(awk '$2 ~ /^(down|drain|drng|inval|fail)/ {print $1}' <<<"$out" | paste -sd, -)"
    if [[ -n "$bad" ]]; then
        scontrol update NodeName="$bad" State=RESUME >/dev/null 2>&1 || true
        return 1
    fi
    [[ -z "$(awk '$2 != "idle"' <<<"$out")" ]]
}

cmd_start() {
    check_dir_is_safe
    [[ $EUID -eq 0 ]] || die "start needs root (the daemons and jobs run as root)"
    binaries_present || die "Slurm/munge/MariaDB binaries missing; run: $0 install"
    cmd_stop || true
    if [[ -e "$DIR" ]]; then
        if [[ -e "$MARKER" || -z "$(ls -A "$DIR")" ]]; then
            rm -rf "$DIR"
        else
            die "$DIR exists and was not made by this script; remove it or set AREAL_SLURM_DIR"
        fi
    fi
    mkdir -p "$DIR"
    chmod 755 "$DIR"   # world-executable: munged checks every parent of its socket
    touch "$MARKER"
    STARTING=1
    write_configs

    log "previous cluster stopped, state wiped"
    start_munge
    start_mariadb
    log "munged, mariadbd up"
    start_slurmdbd
    log "slurmdbd up"
    start_slurm
    wait_for "all $NNODES nodes idle" all_nodes_idle \
        || { sinfo -N >&2 || true; die "nodes not idle; see $DIR/log/slurmd-n*.log, slurmctld.log"; }
    wait_for "sacct" sacct -n -X || die "sacct does not answer; see $DIR/log/slurmdbd.log"

    log "cluster '$CLUSTER_NAME' up: nodes n[1-$NNODES], $NGPUS GPUs each, partition debug;" \
        "logs in $DIR/log"
    cmd_env
}

# ----------------------------------------------------------------------------- status / env
cmd_env() { echo "export SLURM_CONF=$CONF"; }

cmd_status() {
    local name pid f running=0
    echo "state dir: $DIR"
    for f in "$DIR"/run/*.pid; do
        [[ -e "$f" ]] || continue
        name="$(basename "$f" .pid)"; pid="$(pidfile_pid "$f")"
        if kill -0 "$pid" 2>/dev/null; then echo "  $name: running (pid $pid)"; running=1
        else echo "  $name: not running"; fi
    done
    if ((running)) && ctld_answers; then
        sinfo -N -o '%N %t %G %c %m'
        squeue
        return 0
    fi
    echo "cluster not running"
    return 3
}

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
