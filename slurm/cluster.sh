#!/usr/bin/env bash
# A real single-machine SLURM cluster from Debian's packages: 4 emulated nodes n1..n4
# (one slurmd each), slurmctld, slurmdbd + a private MariaDB for accounting, and munged.
#
#   slurm/cluster.sh start    install what is missing, start what is not running, wait for the nodes
#   slurm/cluster.sh stop     cancel the cluster's jobs, stop what `start` started (by PID file);
#                             host services are left alone
#   slurm/cluster.sh restart  stop + start
#   slurm/cluster.sh status   daemons, nodes and partitions; exit 0 all up, 1 some, 3 none
#   slurm/cluster.sh env      print `export SLURM_CONF=...`
#
# All state lives under $IMGCLS_SLURM_DIR (default /tmp/imgcls-slurm). Run as root.
# Clients need SLURM_CONF=$IMGCLS_SLURM_DIR/etc/slurm.conf (or `source slurm/env.sh`).
set -euo pipefail

D=${IMGCLS_SLURM_DIR:-/tmp/imgcls-slurm}
CTLD_PORT=${IMGCLS_SLURM_CTLD_PORT:-16817}
DBD_PORT=${IMGCLS_SLURM_DBD_PORT:-16819}
DB_PORT=${IMGCLS_SLURM_DB_PORT:-16306}
NODE_PORT0=${IMGCLS_SLURM_NODE_PORT0:-17000}   # n1 listens on NODE_PORT0+1, ... n4 on +4
START_TIMEOUT=${IMGCLS_SLURM_START_TIMEOUT:-120}
NODES=(n1 n2 n3 n4)
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

ETC=$D/etc LOG=$D/log RUN=$D/run SPOOL=$D/spool DB=$D/mysql MUNGE=$D/munge
CONF=$ETC/slurm.conf
DBD_CONF=$ETC/slurmdbd.conf
# The default socket: sacctmgr/sacct ignore AuthInfo=socket= on their slurmdbd connection.
MUNGE_SOCK=/run/munge/munge.socket.2
DB_SOCK=$DB/mysqld.sock
DB_PID=$DB/mariadb.pid
MUNGE_PID=$MUNGE/munged.pid
export SLURM_CONF=$CONF

log() { echo "[slurm/cluster.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- process helpers
# pid_alive PIDFILE NAME: the PID in PIDFILE is running and its command is NAME.
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc 0-9 <"$1")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && ! proc_gone "$pid"
}

# proc_gone PID: exited (a zombie counts: our daemons' parent is init, which reaps lazily).
proc_gone() {
    local st
    st=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 0
    [ -z "$st" ] || [ "$st" = Z ]
}

# stop_pids NAME PIDFILE...: TERM each live one, wait up to 20 s, then KILL.
# Only PIDs from our own PID files whose command is NAME.
stop_pids() {
    local name=$1 f pid pids=()
    shift
    for f in "$@"; do
        if pid_alive "$f" "$name"; then
            pid=$(tr -dc 0-9 <"$f")
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 200); do
            proc_gone "$pid" && break
            sleep 0.1
        done
        if ! proc_gone "$pid"; then
            log "$name (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$@"
}

# wait_for DESCRIPTION TIMEOUT LOGFILE COMMAND...: poll COMMAND every 0.2 s.
wait_for() {
    local what=$1 timeout=$2 logfile=$3 deadline
    shift 3
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            log "timed out after ${timeout}s waiting for $what; last lines of $logfile:"
            tail -n 20 "$logfile" >&2 2>/dev/null || true
            die "$what did not come up; see the logs in $LOG"
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------- install
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and there is no apt-get"
    [ "$(id -u)" = 0 ] || die "packages missing (${missing[*]}); run as root"
    log "installing ${missing[*]}"
    # No daemon may be started by the packages' maintainer scripts: we start our own.
    local own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -q -y)
    local ok=
    # Lists may be missing or stale: update only if the first attempt cannot find/fetch a package.
    if DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends "${missing[@]}" \
            >"$LOG/apt.log" 2>&1; then
        ok=1
    else
        log "apt-get install failed; running apt-get update and retrying"
        if "${apt[@]}" update >>"$LOG/apt.log" 2>&1 &&
           DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends "${missing[@]}" \
               >>"$LOG/apt.log" 2>&1; then
            ok=1
        fi
    fi
    [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
    [ -n "$ok" ] || { tail -n 20 "$LOG/apt.log" >&2; die "apt-get install failed; see $LOG/apt.log"; }
}

# ---------------------------------------------------------------- configuration
ensure_hosts() {
    # slurmd -N nX and srun resolve the node names; they all live on 127.0.0.1.
    local missing=() n
    for n in "${NODES[@]}"; do
        grep -qE "^[[:space:]]*127\.0\.0\.1([[:space:]].*)?[[:space:]]$n([[:space:]]|$)" /etc/hosts || missing+=("$n")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "adding '127.0.0.1 ${missing[*]}' to /etc/hosts"
        # Append in place (/etc/hosts may be a bind mount); mind a missing final newline.
        [ -z "$(tail -c 1 /etc/hosts)" ] || echo >>/etc/hosts
        printf '127.0.0.1 %s  # imgcls slurm/cluster.sh\n' "${missing[*]}" >>/etc/hosts
    fi
}

# write_if_changed FILE MODE: content from stdin; returns 0 if the file changed.
write_if_changed() {
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    chmod "$2" "$tmp"
    if [ -f "$1" ] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$1"
}

DB_PASS_FILE=$ETC/db.pass

write_configs() {
    local host cores mem_mb
    host=$(hostname -s)
    cores=$(nproc)
    # Every slurmd sees the whole machine; a node may not claim more memory than it has.
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    [ -s "$DB_PASS_FILE" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$DB_PASS_FILE")

    write_if_changed "$CONF" 644 <<EOF && CONF_CHANGED=1 || true
# Generated by slurm/cluster.sh; edits are overwritten at the next start.
ClusterName=imgcls
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 (default 120) shortens the wait before a requeued job may start again.
AuthInfo=cred_expire=5

StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups here: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true

# Accounting: without sacct, submitit's job.result() never returns for a cancelled job.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none

SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=60

# Preemption: jobs in 'urgent' requeue jobs in 'debug'; the victim first gets its --signal
# (submitit: USR2) and then GraceTime seconds before it is killed and requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal

NodeName=n[1-4] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((NODE_PORT0 + 1))-$((NODE_PORT0 + 4))] Sockets=1 CoresPerSocket=$cores ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=n[1-4] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=15
PartitionName=urgent Nodes=n[1-4] Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF

    write_if_changed "$DBD_CONF" 600 <<EOF || true
# Generated by slurm/cluster.sh.
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$host
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$DB_PASS_FILE")
StorageLoc=slurm_acct_db
EOF

    write_if_changed "$ETC/env.sh" 644 <<EOF || true
export SLURM_CONF=$CONF
EOF
}

# ---------------------------------------------------------------- daemons
munge_works() { munge -n -S "$MUNGE_SOCK" 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }

start_munge() {
    if pid_alive "$MUNGE_PID" munged; then return 0; fi
    if munge_works; then
        # Someone else's munged (e.g. the host's munge service) serves the default socket:
        # use it (every daemon here talks to the same munged), and never stop it.
        log "using the munged already serving $MUNGE_SOCK (not ours: stop leaves it alone)"
        return 0
    fi
    install -d -o munge -g munge -m 0755 "$MUNGE" /run/munge
    if [ ! -s "$MUNGE/munge.key" ]; then
        log "creating munge key"
        dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE/munge.key"
    chmod 0400 "$MUNGE/munge.key"
    touch "$LOG/munged.log"
    chown munge:munge "$LOG/munged.log"
    log "starting munged"
    # --force: replace a stale socket left by a munged that died without cleaning up.
    runuser -u munge -- /usr/sbin/munged --force \
        --socket="$MUNGE_SOCK" --key-file="$MUNGE/munge.key" --pid-file="$MUNGE_PID" \
        --log-file="$LOG/munged.log" --seed-file="$MUNGE/munged.seed" \
        || { tail -n 20 "$LOG/munged.log" >&2; die "munged failed to start; see $LOG/munged.log"; }
    wait_for "munged" 20 "$LOG/munged.log" munge_works
}

# shellcheck disable=SC2120  # wait_for passes -e ...
db() { mariadb --no-defaults --socket="$DB_SOCK" -uroot "$@"; }

start_mariadb() {
    if pid_alive "$DB_PID" mariadbd; then return 0; fi
    install -d -o mysql -g mysql -m 0750 "$DB"
    if [ ! -d "$DB/data/mysql" ]; then
        log "initialising MariaDB data directory $DB/data"
        rm -rf "$DB/data"
        mariadb-install-db --no-defaults --datadir="$DB/data" --user=mysql \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install-db.log" 2>&1 \
            || { tail -n 20 "$LOG/mariadb-install-db.log" >&2; die "mariadb-install-db failed; see $LOG/mariadb-install-db.log"; }
    fi
    touch "$LOG/mariadb.log"
    chown mysql:mysql "$LOG/mariadb.log"
    log "starting mariadbd on 127.0.0.1:$DB_PORT"
    # --no-defaults: never read the host's /etc/mysql config; this server is ours alone.
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB/data" \
        --socket="$DB_SOCK" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$DB_PID" --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=512M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --max-connections=100 \
        </dev/null >>"$LOG/mariadb.log" 2>&1 &
    wait_for "mariadbd" 60 "$LOG/mariadb.log" db -e 'SELECT 1'
    wait_for "mariadbd pid file" 10 "$LOG/mariadb.log" pid_alive "$DB_PID" mariadbd
    local pass
    pass=$(cat "$DB_PASS_FILE")
    db <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurmdbd() {
    if pid_alive "$RUN/slurmdbd.pid" slurmdbd; then return 0; fi
    log "starting slurmdbd on 127.0.0.1:$DBD_PORT"
    /usr/sbin/slurmdbd || die "slurmdbd failed to start; see $LOG/slurmdbd.log"
    wait_for "slurmdbd" 60 "$LOG/slurmdbd.log" sacctmgr -n show cluster
}

ensure_accounting() {
    # The cluster, an account and root's association, so sacct has something to report on.
    if [ -z "$(sacctmgr -n -P show cluster imgcls format=cluster 2>/dev/null)" ]; then
        sacctmgr -i add cluster imgcls >/dev/null
    fi
    if [ -z "$(sacctmgr -n -P show account imgcls format=account 2>/dev/null)" ]; then
        sacctmgr -i add account imgcls cluster=imgcls description=imgcls organization=imgcls >/dev/null
    fi
    if [ -z "$(sacctmgr -n -P show user root format=user 2>/dev/null)" ]; then
        sacctmgr -i add user root account=root cluster=imgcls >/dev/null 2>&1 || true
    fi
}

start_slurmctld() {
    if pid_alive "$RUN/slurmctld.pid" slurmctld; then
        if [ -n "${CONF_CHANGED:-}" ]; then
            log "slurm.conf changed: scontrol reconfigure (node changes need stop + start)"
            scontrol reconfigure || true
        fi
        return 0
    fi
    log "starting slurmctld on 127.0.0.1:$CTLD_PORT"
    /usr/sbin/slurmctld -f "$CONF" || die "slurmctld failed to start; see $LOG/slurmctld.log"
    wait_for "slurmctld" 60 "$LOG/slurmctld.log" scontrol ping
}

start_slurmds() {
    local n
    for n in "${NODES[@]}"; do
        if pid_alive "$RUN/slurmd-$n.pid" slurmd; then continue; fi
        install -d -m 0755 "$SPOOL/slurmd-$n"
        log "starting slurmd -N $n"
        /usr/sbin/slurmd -f "$CONF" -N "$n" || die "slurmd -N $n failed to start; see $LOG/slurmd-$n.log"
    done
}

nodes_up() {
    # Every node answers: idle, or busy with jobs that survived a restart.
    local states
    states=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null | sort -u) || return 1
    [ "$(echo "$states" | grep -cE '^n[1-4] (idle|mixed|allocated|completing)$')" -eq 4 ]
}

do_start() {
    [ "$(id -u)" = 0 ] || die "must run as root (daemons, apt-get, /etc/hosts)"
    local t0=$SECONDS
    install -d -m 0755 "$D" "$ETC" "$LOG" "$RUN" "$SPOOL" "$SPOOL/slurmctld"
    install_packages
    ensure_hosts
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    ensure_accounting
    start_slurmctld
    start_slurmds
    log "waiting up to ${START_TIMEOUT}s for n1..n4 to be idle"
    local deadline=$((SECONDS + START_TIMEOUT)) resumed=
    until nodes_up; do
        # A node drained or marked down by an earlier run (e.g. "Kill task failed") stays so
        # across restarts: resume it once it answers again.
        local stuck
        stuck=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null |
                awk '$2 ~ /^(drained|draining|down|fail)$/ {print $1}' | sort -u | paste -sd, -)
        if [ -n "$stuck" ] && [ -z "$resumed" ]; then
            log "resuming nodes $stuck"
            scontrol update NodeName="$stuck" State=RESUME || true
            resumed=1
        fi
        if [ $SECONDS -ge $deadline ]; then
            sinfo -N -p debug >&2 || true
            tail -n 10 "$LOG/slurmctld.log" >&2 || true
            die "nodes not idle after ${START_TIMEOUT}s; see $LOG/slurmctld.log and $LOG/slurmd-n*.log"
        fi
        sleep 0.3
    done
    log "cluster up in $((SECONDS - t0))s"
    sinfo >&2
    echo "export SLURM_CONF=$CONF"
}

do_stop() {
    local n
    # Cancel the cluster's jobs first: with proctrack/linuxproc a job's processes would
    # outlive slurmd and be orphaned.
    local jobs=
    pid_alive "$RUN/slurmctld.pid" slurmctld && jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// }" ]; then
        log "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        scancel --quiet $jobs 2>/dev/null || true
        for _ in $(seq 100); do
            [ -z "$(squeue -h -t RUNNING,COMPLETING,SUSPENDED -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    # Reverse order; only PIDs from our own PID files, each checked against its command name.
    local files=()
    for n in "${NODES[@]}"; do files+=("$RUN/slurmd-$n.pid"); done
    stop_pids slurmd "${files[@]}"
    stop_pids slurmctld "$RUN/slurmctld.pid"
    stop_pids slurmdbd "$RUN/slurmdbd.pid"
    stop_pids mariadbd "$DB_PID"
    stop_pids munged "$MUNGE_PID"
    log "stopped (state kept in $D; remove it for a fresh cluster)"
}

# status: exit 0 if every daemon is running, 1 if only some are, 3 if none is.
do_status() {
    local up=0 down=0 n
    show() {
        if pid_alive "$1" "$2"; then
            printf '  %-16s running (pid %s)\n' "$3" "$(tr -dc 0-9 <"$1")"
            up=$((up + 1))
        else
            printf '  %-16s stopped\n' "$3"
            down=$((down + 1))
        fi
    }
    echo "state dir: $D"
    echo "export SLURM_CONF=$CONF"
    if pid_alive "$MUNGE_PID" munged || ! munge_works; then
        show "$MUNGE_PID" munged munged
    else
        printf '  %-16s not ours (a host munged serves %s)\n' munged "$MUNGE_SOCK"
    fi
    show "$DB_PID" mariadbd mariadbd
    show "$RUN/slurmdbd.pid" slurmdbd slurmdbd
    show "$RUN/slurmctld.pid" slurmctld slurmctld
    for n in "${NODES[@]}"; do show "$RUN/slurmd-$n.pid" slurmd "slurmd -N $n"; done
    if pid_alive "$RUN/slurmctld.pid" slurmctld; then
        sinfo || true
    fi
    [ $down -eq 0 ] && return 0
    [ $up -eq 0 ] && return 3
    return 1
}

case "${1:-}" in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop; do_start ;;
    status) do_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|restart|status|env   (state in \$IMGCLS_SLURM_DIR, default /tmp/imgcls-slurm)" >&2; exit 2 ;;
esac
