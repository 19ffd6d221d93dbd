#!/usr/bin/env bash
# A real single-node SLURM cluster (with accounting) for tests, entirely under one directory.
#
#   tests/slurm/cluster.sh install        # apt-get the Debian packages if a command is missing (root)
#   tests/slurm/cluster.sh start DIR      # start munged, mariadbd, slurmdbd, slurmctld, slurmd under DIR
#   source DIR/env.sh                     # exports SLURM_CONF (every client needs it)
#   tests/slurm/cluster.sh stop DIR       # cancel our jobs, stop the daemons by their PID files
#
# Runs as root (the daemons run as root, no systemd). All keys, sockets, state, databases and
# logs live in DIR; nothing in /etc, /run or /var is used. Ports are picked free at start.
# Accounting (slurmdbd + MariaDB) is what lets submitit notice cancelled/timed-out jobs: it polls
# `sacct` only.
#
# Every daemon listens on loopback only. MariaDB: --bind-address=127.0.0.1, and its `slurm` user may
# touch only slurmdbd's own database (slurm_acct_db). SLURM: CommunicationParameters=NoCtldInAddrAny,
# NoInAddrAny makes slurmctld, slurmd and slurmdbd bind the address the host name resolves to instead
# of INADDR_ANY (slurm_setup_addr in SchedMD/slurm src/common/slurm_protocol_api.c uses gethostname()),
# so the cluster uses that address when it is a loopback one (127.0.0.0/8, as in containers and Debian's
# /etc/hosts). When the host name resolves elsewhere, SLURM cannot be held on loopback: start refuses
# unless BENCH_SLURM_ANY_ADDR=1 accepts daemons listening on all interfaces (they still authenticate
# every request with this cluster's private munge key).
set -euo pipefail

PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
CMDS=(munged slurmctld slurmd sbatch sacct sacctmgr slurmdbd mariadbd mariadb-install-db)
CLUSTER=benchtest

die() { echo "cluster.sh: $*" >&2; exit 1; }

missing_cmds() {
    local c out=()
    for c in "${CMDS[@]}"; do command -v "$c" >/dev/null 2>&1 || out+=("$c"); done
    echo "${out[@]:-}"
}

do_install() {
    local miss; miss=$(missing_cmds)
    [[ -z "$miss" ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "missing commands ($miss) and not root: cannot apt-get install ${PKGS[*]}"
    command -v apt-get >/dev/null || die "missing commands ($miss) and no apt-get: install ${PKGS[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d 101: the packages' maintainer scripts must not start system daemons
    local policy=/usr/sbin/policy-rc.d created=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; created=1; fi
    local rc=0 apt=(apt-get -q -o DPkg::Lock::Timeout=300)  # wait for a concurrent apt/dpkg
    { "${apt[@]}" install -y --no-install-recommends "${PKGS[@]}" >/dev/null 2>&1 ||
      { "${apt[@]}" update >/dev/null 2>&1 && "${apt[@]}" install -y --no-install-recommends "${PKGS[@]}" >/dev/null; }; } || rc=$?
    [[ $created -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || die "apt-get install ${PKGS[*]} failed (rc=$rc)"
    miss=$(missing_cmds)
    [[ -z "$miss" ]] || die "still missing after install: $miss"
}

free_ports() {  # N free TCP ports on 127.0.0.1
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

host_addr() {  # the IPv4 address the host name resolves to (what SLURM's NoInAddrAny binds)
    python3 -c 'import socket; print(socket.gethostbyname(socket.gethostname()))' 2>/dev/null || echo unresolved
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || { echo "cluster.sh: timed out waiting for $what; logs in $D/log" >&2; tail -n 20 "$D"/log/*.log >&2 || true; return 1; }
        sleep 0.3
    done
}

bg() {  # bg NAME COMMAND... : start a foreground daemon in the background, record its PID
    local name=$1; shift
    "$@" >>"$D/log/$name.out" 2>&1 </dev/null &
    echo $! >"$D/pid/$name.pid"
}

alive() { [[ -f "$D/pid/$1.pid" ]] && kill -0 "$(cat "$D/pid/$1.pid")" 2>/dev/null; }

do_start() {
    [[ $(id -u) -eq 0 ]] || die "start must run as root (daemons run as root here)"
    local miss; miss=$(missing_cmds)
    [[ -z "$miss" ]] || die "missing commands: $miss (run: $0 install)"
    mkdir -p "$D"; D=$(cd "$D" && pwd)
    [[ -f "$D/pid/slurmctld.pid" ]] && alive slurmctld && die "a cluster already runs in $D"
    chmod 0755 "$D"
    mkdir -p "$D"/{log,pid,state,spool,munge,mysql,run}
    chmod 0700 "$D/munge"; chmod 0755 "$D/run"
    read -r P_CTLD P_SLURMD P_DBD P_SQL <<<"$(free_ports 4)"
    local sock="$D/run/munge.socket" host; host=$(hostname -s)
    local addr comm; addr=$(host_addr)  # what NoInAddrAny binds: the host name's address
    if [[ $addr == 127.* ]]; then
        comm="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
    elif [[ ${BENCH_SLURM_ANY_ADDR:-0} == 1 ]]; then
        echo "cluster.sh: warning: $(hostname) resolves to $addr, not loopback: the SLURM daemons listen on all interfaces (BENCH_SLURM_ANY_ADDR=1)" >&2
        addr=127.0.0.1 comm=""
    else
        die "$(hostname) resolves to '$addr', not a loopback address, so SLURM cannot bind loopback only: map the host name to 127.0.0.1 in /etc/hosts, or set BENCH_SLURM_ANY_ADDR=1 to let the daemons listen on all interfaces"
    fi

    # munge: key 0400 root, socket dir 0755, all under DIR
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$D/munge/munge.key"
    bg munged munged -F --force --key-file="$D/munge/munge.key" --socket="$sock" \
        --pid-file="$D/run/munged.pid" --seed-file="$D/munge/seed" --log-file="$D/log/munged.log"
    wait_for 15 munged test -S "$sock"

    # MariaDB on a private datadir, TCP on a free loopback port
    [[ -d "$D/mysql/mysql" ]] ||  # a restart in the same DIR keeps the accounting database
    mariadb-install-db --no-defaults --user=root --datadir="$D/mysql" --auth-root-authentication-method=normal \
        --skip-test-db >"$D/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $D/log/mariadb-install.log"
    bg mariadbd mariadbd --no-defaults --user=root --datadir="$D/mysql" --socket="$D/run/mysql.sock" \
        --pid-file="$D/run/mysql.pid" --bind-address=127.0.0.1 --port="$P_SQL" --skip-name-resolve \
        --log-error="$D/log/mariadbd.log" --innodb-buffer-pool-size=32M --innodb-log-file-size=8M \
        --performance-schema=OFF
    wait_for 30 mariadbd mariadb --no-defaults -uroot --socket="$D/run/mysql.sock" -e "SELECT 1"
    mariadb --no-defaults -uroot --socket="$D/run/mysql.sock" -e \
        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
         GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

    cat >"$D/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$sock
DbdHost=localhost
DbdAddr=$addr
DbdPort=$P_DBD
$comm
SlurmUser=root
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$P_SQL
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 0600 "$D/slurmdbd.conf"

    local node; node=$(slurmd -C | head -n 1)
    cat >"$D/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost($addr)
SlurmctldPort=$P_CTLD
$comm
SlurmdPort=$P_SLURMD
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd-%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=100000,bf_interval=2
JobRequeue=1
KillWait=5
MinJobAge=60
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$addr
AccountingStoragePort=$P_DBD
AccountingStoragePass=$sock
$node NodeAddr=$addr State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$D/env.sh" <<EOF
export SLURM_CONF=$D/slurm.conf
EOF
    export SLURM_CONF="$D/slurm.conf"

    bg slurmdbd slurmdbd -D   # reads slurmdbd.conf next to $SLURM_CONF
    wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/$addr/$P_DBD"
    bg slurmctld slurmctld -D -i -f "$D/slurm.conf"
    wait_for 30 slurmctld scontrol ping
    bg slurmd slurmd -D -N "$host" -f "$D/slurm.conf"
    wait_for 30 "node idle" bash -c "sinfo -h -N -o %T | grep -qx idle"
    wait_for 30 "cluster in accounting" bash -c "sacctmgr -n -P show cluster format=cluster | grep -qx $CLUSTER"
    echo "cluster up: SLURM_CONF=$D/slurm.conf (logs: $D/log)"
}

do_stop() {
    [[ -d "$D" ]] || return 0
    D=$(cd "$D" && pwd)
    if [[ -f "$D/slurm.conf" ]] && alive slurmctld; then
        export SLURM_CONF="$D/slurm.conf"
        scancel --full --quiet --user=root 2>/dev/null || true   # every job of this (private) cluster
        local end=$((SECONDS + 15))
        while [[ -n "$(squeue -h -o %i 2>/dev/null)" ]] && ((SECONDS < end)); do sleep 0.5; done
    fi
    # TERM in dependency order, each group at once; KILL what outlives 15 s
    local group name pid end pids
    for group in "slurmd slurmctld" "slurmdbd" "mariadbd munged"; do
        pids=()
        for name in $group; do
            [[ -f "$D/pid/$name.pid" ]] || continue
            pid=$(cat "$D/pid/$name.pid")
            kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
            rm -f "$D/pid/$name.pid"
        done
        end=$((SECONDS + 15))
        for pid in "${pids[@]}"; do
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < end)); do sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        done
    done
    echo "cluster stopped ($D)"
}

cmd=${1:-}; D=${2:-}
case "$cmd" in
    install) do_install ;;
    start) [[ -n "$D" ]] || die "usage: $0 start DIR"; do_start ;;
    stop) [[ -n "$D" ]] || die "usage: $0 stop DIR"; do_stop ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
