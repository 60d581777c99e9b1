#!/usr/bin/env bash
# Install and start a real single-node SLURM cluster on this machine (Debian/Ubuntu, root only) for the
# SLURM tests: munge -> mariadb -> slurmdbd (so sacct and submitit see job states) -> slurmctld -> slurmd.
#
#   sudo launchers/slurm_cluster.sh          # idempotent: a no-op when a cluster already answers (with an
#                                            # outdated slurm.conf: rewrites it and runs scontrol reconfigure)
#   launchers/slurm_cluster.sh --check       # exit 0 when a cluster answers, 1 otherwise (no changes)
#
# The daemons are started directly (no systemd: containers and CI runners often lack it). The node is this
# machine (`hostname -s`) with its real CPU count and memory; the partition oversubscribes its CPUs so a
# 2-task CPU job fits on a 2-core box. Logs: /var/log/slurm/. Nothing here is needed on a real cluster.
set -euo pipefail

answers() { command -v sinfo >/dev/null 2>&1 && timeout 10 sinfo -h -o %T 2>/dev/null | grep -Eq 'idle|mix|alloc'; }

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

# The slurm.conf of this one-node cluster. JobRequeue lets batch jobs requeue. KillWait (SIGTERM to SIGKILL)
# is SLURM's default 30 s: the tasks of a cancelled or requeued job finish their step and write a checkpoint
# in that time (bigdit catches SIGTERM); the old 5 s could cut that checkpoint short.
slurm_conf() {
  cat <<CONF
ClusterName=bigdit
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
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
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

if [[ ${1:-} == --check ]]; then answers; exit; fi
if answers; then
  if [[ "$(slurm_conf)" == "$(cat /etc/slurm/slurm.conf 2>/dev/null)" ]]; then
    echo "slurm: a cluster already answers (sinfo); nothing to do"; exit 0
  fi
  # A cluster started by an older version of this script: apply the current slurm.conf in place.
  if [[ $(id -u) != 0 ]]; then
    echo "slurm: /etc/slurm/slurm.conf is outdated: run 'sudo $0' to update it" >&2; exit 1
  fi
  slurm_conf >/etc/slurm/slurm.conf
  scontrol reconfigure
  echo "slurm: cluster answers; updated /etc/slurm/slurm.conf (scontrol reconfigure)"; exit 0
fi
if [[ $(id -u) != 0 ]]; then
  echo "slurm: no cluster answers and installing one needs root: run 'sudo $0'" >&2
  exit 1
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

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/slurm
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
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do answers && break; sleep 0.5; done
scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
if answers; then
  echo "slurm: cluster 'bigdit' up on $host ($cpus CPUs); logs in /var/log/slurm/"
else
  echo "slurm: daemons started but sinfo does not show an idle node; see /var/log/slurm/*.log" >&2
  sinfo >&2 || true
  exit 1
fi
