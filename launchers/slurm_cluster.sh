#!/usr/bin/env bash
# Install and start a real SLURM cluster on this machine (Debian/Ubuntu, root only) for the SLURM tests:
# munge -> mariadb -> slurmdbd (so sacct and submitit see job states) -> slurmctld -> slurmd.
#
#   sudo launchers/slurm_cluster.sh          # one node (this machine, partition 'debug', the default); idempotent:
#                                            # a no-op when a cluster already answers (with an outdated slurm.conf:
#                                            # rewrites it and runs scontrol reconfigure)
#   launchers/slurm_cluster.sh --check       # exit 0 when a cluster answers, 1 otherwise (no changes)
#   sudo launchers/slurm_cluster.sh nodes=2  # plus two more nodes, bigdit-n1 and bigdit-n2, in partition 'two'
#   launchers/slurm_cluster.sh nodes=2 --check   # exit 0 when both answer (idle, mixed or allocated)
#   sudo launchers/slurm_cluster.sh nodes=2 down # stop those two and remove their namespaces and bridge
#
# The daemons are started directly (no systemd: containers and CI runners often lack it). The node is this
# machine (`hostname -s`) with its real CPU count and memory; the partition oversubscribes its CPUs so a
# 2-task CPU job fits on a 2-core box. Logs: /var/log/slurm/. Nothing here is needed on a real cluster.
#
# The two extra nodes are two more slurmd, each in its own network, UTS, mount and IPC namespace: its own
# hostname, its own address on a bridge this script creates (bigdit-br, 10.231.0.1/24; the nodes are .2 and .3),
# its own /dev/shm (what is per node on real nodes: shared memory), and the same file system, munge key and
# slurmctld (reached at the bridge address) as this machine. Inside them /etc/hosts is a copy that also names
# the nodes and this machine's bridge address; nothing outside the namespaces and the bridge changes.
# The nodes are always in slurm.conf, in state FUTURE (invisible to sinfo, never contacted) when they are not up,
# so both forms write the same slurm.conf: bringing them up or down touches neither the 'debug' partition nor
# its running jobs, and the one-node form run later (`make test` does) leaves them as they are.
set -euo pipefail

answers() { command -v sinfo >/dev/null 2>&1 && timeout 10 sinfo -h -p debug -o %T 2>/dev/null | grep -Eq 'idle|mix|alloc'; }

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

# The two namespace nodes: names, bridge, addresses (a private /24 nothing else here uses).
NODES=(bigdit-n1 bigdit-n2)
BRIDGE=bigdit-br
NET=10.231.0
NODES_DIR=/run/bigdit-nodes  # the namespaces' /etc/hosts

# The slurm.conf of this cluster. JobRequeue lets batch jobs requeue. KillWait (SIGTERM to SIGKILL) is SLURM's
# default 30 s: the tasks of a cancelled or requeued job finish their step and write a checkpoint in that time
# (bigdit catches SIGTERM); the old 5 s could cut that checkpoint short. Spool, pid and log files are per node
# (%n): three slurmd share this file system. SlurmdTimeout 30 s: a lost node is marked down within it.
slurm_conf() {
  cat <<CONF
ClusterName=bigdit
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  local i
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeAddr=$NET.$((i + 2)) NodeHostname=${NODES[$i]} CPUs=$cpus RealMemory=4000 State=FUTURE"
  done
  echo "PartitionName=two Nodes=$(IFS=,; echo "${NODES[*]}") MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
}

# How many of the two namespace nodes answer (idle, mixed or allocated).
nodes_answering() {
  timeout 10 sinfo -h -N -p two -o '%N %T' 2>/dev/null | grep -Ec ' (idle|mixed|allocated)$' || true
}

# The pid of node $1's slurmd when it runs (a killed one can linger as a zombie until reaped: not running).
slurmd_pid() {
  local f=/run/slurmd-$1.pid pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  [[ -r /proc/$pid/stat && $(awk '{print $3}' "/proc/$pid/stat") != Z ]] && echo "$pid"
  return 0
}

# Bridge, namespaces, veths (idempotent), then one slurmd per namespace, then the nodes out of FUTURE.
nodes_up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  [[ $(ip addr show dev "$BRIDGE") == *"inet $NET.1/"* ]] || ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  mkdir -p "$NODES_DIR"
  # Inside the namespaces this machine's name must mean its bridge address (slurmctld), not 127.0.0.1.
  { grep -vwE "$host|$(IFS='|'; echo "${NODES[*]}")" /etc/hosts
    echo "$NET.1 $host"
    for i in "${!NODES[@]}"; do echo "$NET.$((i + 2)) ${NODES[$i]}"; done; } >"$NODES_DIR/hosts.tmp"
  mv "$NODES_DIR/hosts.tmp" "$NODES_DIR/hosts"
  local i n ns veth
  for i in "${!NODES[@]}"; do
    n=${NODES[$i]} ns=${NODES[$i]} veth=bigdit-v$((i + 1))
    [[ -e /var/run/netns/$ns ]] || ip netns add "$ns"
    if ! ip link show "$veth" >/dev/null 2>&1; then
      ip link add "$veth" type veth peer name eth0 netns "$ns"
    fi
    ip link set "$veth" master "$BRIDGE" up
    [[ $(ip -n "$ns" addr show dev eth0) == *"inet $NET.$((i + 2))/"* ]] || ip -n "$ns" addr add "$NET.$((i + 2))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    mkdir -p "/var/spool/slurmd/$n"
    if [[ -z $(slurmd_pid "$n") ]]; then
      # nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, and slurmd refuses to start.
      # The mount namespace gets its own /dev/shm and /etc/hosts; everything else is this machine's.
      nsenter --net="/var/run/netns/$ns" unshare --uts --ipc --mount --propagation private sh -c \
        "hostname $n && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && mount --bind $NODES_DIR/hosts /etc/hosts && exec slurmd -N $n"
    fi
  done
  # FUTURE -> in service (a node set down, e.g. a lost one, is resumed alike once its slurmd is back).
  local state
  for _ in $(seq 60); do
    for n in "${NODES[@]}"; do
      state=$(scontrol -o --future show node "$n" 2>/dev/null | grep -o 'State=[A-Z+_]*' || true)
      case $state in
        *FUTURE*|*DOWN*|*DRAIN*) scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
      esac
    done
    [[ $(nodes_answering) == "${#NODES[@]}" ]] && return 0
    sleep 0.5
  done
  echo "slurm: the namespace nodes do not answer; see /var/log/slurm/slurmd-bigdit-n*.log" >&2
  sinfo -N >&2 || true
  return 1
}

# Stop the two slurmd (and whatever still runs in their namespaces: job steps of a lost node), put the nodes
# back to FUTURE, remove the namespaces (their veth ends go with them) and the bridge.
nodes_down() {
  local n pids
  for n in "${NODES[@]}"; do
    scontrol update nodename="$n" state=down reason="slurm_cluster.sh nodes=2 down" >/dev/null 2>&1 || true
    if [[ -e /var/run/netns/$n ]]; then
      pids=$(ip netns pids "$n" 2>/dev/null || true)
      [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
      ip netns delete "$n"
    fi
    rm -f "/run/slurmd-$n.pid"
    scontrol update nodename="$n" state=future >/dev/null 2>&1 || true
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE"
  rm -rf "$NODES_DIR"
  echo "slurm: namespace nodes ${NODES[*]} stopped and removed (partition 'debug' untouched)"
}

nodes=1 action=up
for arg in "$@"; do
  case $arg in
    --check) action=check ;;
    down) action=down ;;
    nodes=1|nodes=2) nodes=${arg#nodes=} ;;
    *) echo "usage: $0 [nodes=1|nodes=2] [--check|down]   (unknown argument '$arg')" >&2; exit 2 ;;
  esac
done
if [[ $action == check ]]; then
  answers || exit 1
  [[ $nodes == 1 || $(nodes_answering) == "${#NODES[@]}" ]]; exit
fi
if [[ $action == down && $nodes == 1 ]]; then
  echo "slurm: only the namespace nodes come down ('$0 nodes=2 down'); the one-node cluster stays" >&2; exit 2
fi
if [[ $(id -u) != 0 ]] && { [[ $nodes == 2 ]] || ! answers; }; then
  echo "slurm: this needs root: run 'sudo $0 $*'" >&2; exit 1
fi
# One change at a time (two pytest workers may both bring the nodes up); --check above never waits. The lock is
# held by a flock process around this script (re-run under it), not by an fd of the script: every daemon started
# below would inherit such an fd and hold the lock for its whole life, and the next change would wait forever.
lock=/run/bigdit-slurm-cluster.lock
if [[ -z ${BIGDIT_SLURM_LOCKED:-} ]]; then
  BIGDIT_SLURM_LOCKED=1 flock --close --wait 300 --conflict-exit-code 75 "$lock" "$0" "$@" && exit 0 || rc=$?
  [[ $rc == 75 ]] && echo "slurm: another '$0' has held $lock for 5 minutes; see 'fuser -v $lock'" >&2
  exit "$rc"
fi
if [[ $action == down ]]; then nodes_down; exit; fi

if answers; then
  if [[ "$(slurm_conf)" != "$(cat /etc/slurm/slurm.conf 2>/dev/null)" ]]; then
    # A cluster started by an older version of this script: apply the current slurm.conf. New nodes and
    # per-node spool/pid files need the daemons restarted (running jobs survive: state is saved, steps stay).
    if [[ $(id -u) != 0 ]]; then
      echo "slurm: /etc/slurm/slurm.conf is outdated: run 'sudo $0' to update it" >&2; exit 1
    fi
    old_pid=$(cat /run/slurmd.pid 2>/dev/null || true)
    slurm_conf >/etc/slurm/slurm.conf
    mkdir -p "/var/spool/slurmd/$host"
    kill "$(cat /run/slurmctld.pid)" 2>/dev/null || true
    for _ in $(seq 60); do pgrep -x slurmctld >/dev/null || break; sleep 0.5; done
    slurmctld
    if [[ -n $old_pid ]] && kill -0 "$old_pid" 2>/dev/null; then
      kill "$old_pid"; for _ in $(seq 60); do kill -0 "$old_pid" 2>/dev/null || break; sleep 0.5; done
    fi
    [[ -n $(slurmd_pid "$host") ]] || slurmd
    for _ in $(seq 60); do answers && break; sleep 0.5; done
    echo "slurm: cluster answers; updated /etc/slurm/slurm.conf (daemons restarted)"
  else
    echo "slurm: a cluster already answers (sinfo); nothing to do"
  fi
  if [[ $nodes == 2 ]]; then
    nodes_up && echo "slurm: nodes ${NODES[*]} up in partition 'two' (bridge $BRIDGE $NET.1/24)"
  fi
  exit
fi
command -v apt-get >/dev/null || { echo "slurm: apt-get not found; this script supports Debian/Ubuntu only" >&2; exit 1; }
need=()
for pair in sbatch:slurm-wlm slurmctld:slurm-wlm slurmdbd:slurmdbd munged:munge mariadbd:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  echo "slurm: installing $(printf '%s\n' "${need[@]}" | sort -u | tr '\n' ' ')(apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d 101: the packages' postinst must not try to start services (no init system here).
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server mariadb-client >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

mkdir -p /etc/slurm /var/spool/slurmctld "/var/spool/slurmd/$host" /var/log/slurm /run/munge /var/lib/slurm
chown munge:munge /run/munge 2>/dev/null || true

# munge: one key, shared by every daemon and client of this one-machine cluster.
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged

# mariadb + slurmdbd: job accounting, which sacct (and so submitit's job states) reads.
if ! pgrep -x mariadbd >/dev/null; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
  (mariadbd --user=mysql >/var/log/slurm/mariadb.log 2>&1 &)
  for _ in $(seq 60); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
fi
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
CONF
chmod 600 /etc/slurm/slurmdbd.conf
slurm_conf >/etc/slurm/slurm.conf

pgrep -x slurmdbd >/dev/null || slurmdbd
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -n list cluster format=cluster | grep -qw bigdit || sacctmgr -i add cluster bigdit >/dev/null
pgrep -x slurmctld >/dev/null || slurmctld
[[ -n $(slurmd_pid "$host") ]] || slurmd
for _ in $(seq 60); do answers && break; sleep 0.5; done
scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
if answers; then
  echo "slurm: cluster 'bigdit' up on $host ($cpus CPUs); logs in /var/log/slurm/"
else
  echo "slurm: daemons started but sinfo does not show an idle node; see /var/log/slurm/*.log" >&2
  sinfo >&2 || true
  exit 1
fi
if [[ $nodes == 2 ]]; then
  nodes_up && echo "slurm: nodes ${NODES[*]} up in partition 'two' (bridge $BRIDGE $NET.1/24)"
fi
