#!/usr/bin/env bash
# start-slurm.sh - a throw-away one-node SLURM cluster for CI and for running tests/test_slurm.py.
#
# Usage: sudo tests/slurm/start-slurm.sh        (stop it with: sudo tests/slurm/stop-slurm.sh)
#
# Two partitions on one node: `cpu` (default) and `gpu`, with two stand-in GPUs so that
# `--gpus=1` jobs schedule on machines without one. Memory (--mem) and time (-t) limits are
# enforced, so jobs die of them as on a real cluster (tests/test_slurm_faults.py).
# No accounting database: clients must query job states with squeue (tests/slurm/profile
# sets slurm-status-command: squeue).
# Idempotent: when the cluster from $SLURM_CI_DIR already answers, it says so and exits 0.
# Tested on Debian 12 (SLURM 22.05) as root without systemd; only the daemons need root,
# jobs run as whoever submits them (root included).
set -euo pipefail

BASE=${SLURM_CI_DIR:-/tmp/emmito-slurm}   # state, spool, logs and pid files
export DEBIAN_FRONTEND=noninteractive

# timeout: without a controller, sinfo retries for ~10 s.
node_state() { timeout 5 sinfo -h -N -o %T 2>/dev/null | head -n 1; }

# Already started from $BASE and healthy: nothing to do (any user may ask).
if [ -s "$BASE/slurmctld.pid" ] && kill -0 "$(cat "$BASE/slurmctld.pid")" 2>/dev/null; then
  state=$(node_state)
  case "$state" in
    idle|mixed|allocated|completing)
      echo "SLURM from $BASE is already running:"
      sinfo
      exit 0 ;;
  esac
  echo "SLURM from $BASE is running but its node is '$state': run tests/slurm/stop-slurm.sh, then start again" >&2
  exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "start-slurm.sh must run as root (it installs packages and starts daemons): sudo $0" >&2
  exit 1
fi

# 1. Packages (~9 s). --no-install-recommends: 8 packages instead of ~84 (*-dev, plugins).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
fi
# On systemd hosts (e.g. GitHub runners) apt may have started its own units; we run our own copies.
if [ -d /run/systemd/system ]; then systemctl stop slurmctld slurmd 2>/dev/null || true; fi

# Begin from a clean state: old state can keep the node DRAINED or INVAL.
rm -rf "$BASE/ctld" "$BASE/d" "$BASE/log"
mkdir -p "$BASE"/{ctld,d,log}
chown -R slurm:slurm "$BASE"

# 2. munge: a key (the Debian postinst normally makes it) and the daemon, as user munge.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged   # daemonizes; its PID lands in /run/munge/munged.pid
  for _ in $(seq 20); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$BASE/munged.pid"   # recorded only when we started it
fi
munge -n | unmunge >/dev/null   # fail fast when authentication is broken

# 3. Config. CPUs/RealMemory above what slurmd detects would make the node INVAL.
DETECTED=$(slurmd -C)
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$DETECTED")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$DETECTED")
MEM=$(( MEM * 85 / 100 ))   # leave room for the daemons and the submitting snakemake
CPU_FACTOR=${SLURM_CI_CPU_FACTOR:-8}
mkdir -p /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
# Written by emmito tests/slurm/start-slurm.sh: one-node CI cluster, no cgroups, no slurmdbd;
# memory and time limits enforced (see below).
ClusterName=emmito-ci
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# The node offers CPU_FACTOR x its real CPUs (config_overrides stops slurmd from marking it
# INVAL for that), so a 2-core CI runner runs several short jobs at once, as a cluster would,
# and the fault tests' five runs at once (their held jobs sleep, but each holds its CPUs).
SlurmdParameters=config_overrides
# No accounting DB, so sacct fails ("Slurm accounting storage is disabled"); squeue shows
# finished jobs for MinJobAge seconds, which must be >= 3x the plugin's first status delay.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
# Limits enforced as on a real cluster (tests/test_slurm_faults.py kills jobs with them).
# Memory: slurmstepd samples the RSS of each job step's processes every second (task=1) and
# kills the step (SIGKILL) once their sum passes the job's --mem: "StepId=N.0 exceeded memory
# limit (...), being killed" / "Exceeded job memory limit" in the job's log. The job then ends
# FAILED (its batch script exits non-zero), not OUT_OF_MEMORY as under cgroups.
# Not used: TaskPlugin=task/cgroup + ConstrainRAMSpace=yes (cgroup.conf), what real clusters
# run. This VM has no systemd; its cgroup v2 tree (/sys/fs/cgroup/unified) offers only the
# hugetlb controller, and the memory controller is cgroup v1, where SLURM's cgroup/v1 puts its
# slurm/ tree at the hierarchy's root: each job would leave the cgroup that the machine's own
# process manager keeps this session's processes in. So it was not tried here.
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
# Time: a job past its -t is killed with no grace minutes (OverTimeLimit=0): SIGTERM, then
# SIGKILL KillWait s later (the default 30 s would only slow the tests); it ends TIMEOUT and
# its log says "CANCELLED AT ... DUE TO TIME LIMIT". slurmctld checks time limits every 30 s
# (fixed in its code) and -t counts whole minutes, so a 1-minute limit fires 60-90 s in.
OverTimeLimit=0
KillWait=5
StateSaveLocation=$BASE/ctld
SlurmdSpoolDir=$BASE/d
SlurmctldPidFile=$BASE/slurmctld.daemon.pid
SlurmdPidFile=$BASE/slurmd.daemon.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
# Two stand-in GPUs so that --gpus=1 / --gres=gpu:1 jobs can be scheduled (see gres.conf),
# two at a time: a fault test's held infer job does not hold up the other tests' infer jobs.
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(( CPUS * CPU_FACTOR )) RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
CONF
cat > /etc/slurm/gres.conf <<'CONF'
# SLURM 22.05 drops a GPU without a device file ("Removing file-less GPU") and the node goes
# INVAL; /dev/null and /dev/zero are harmless stand-ins because TaskPlugin=task/none confines
# no devices. One file per GPU: each --gpus=1 job gets its own (CUDA_VISIBLE_DEVICES=0 or 1).
NodeName=localhost Name=gpu File=/dev/null
NodeName=localhost Name=gpu File=/dev/zero
CONF

# 4. Daemons in the foreground (-D), put in the background by this shell, so $! is the real PID.
#    setsid: they must outlive the shell (and CI step) that started them.
#    slurmd -N localhost: the node name does not depend on the machine's hostname.
setsid /usr/sbin/slurmctld -D >"$BASE/log/slurmctld.out" 2>&1 </dev/null & echo $! >"$BASE/slurmctld.pid"
setsid /usr/sbin/slurmd -D -N localhost >"$BASE/log/slurmd.out" 2>&1 </dev/null & echo $! >"$BASE/slurmd.pid"

# 5. Wait until the node is idle (normally 1-3 s).
for _ in $(seq 60); do
  kill -0 "$(cat "$BASE/slurmctld.pid")" 2>/dev/null || break   # it died: see its log
  [ "$(node_state)" = idle ] && break
  sleep 0.5
done
if [ "$(node_state)" != idle ]; then
  echo "SLURM did not come up (node state '$(node_state)'); logs under $BASE/log:" >&2
  sinfo -N -l >&2 || true
  scontrol show node localhost >&2 || true
  tail -n 30 "$BASE"/log/*.log "$BASE"/log/*.out >&2 || true
  SLURM_CI_DIR="$BASE" "$(dirname "$0")/stop-slurm.sh" >&2 || true
  exit 1
fi
# The daemons' own pid files are authoritative (setsid forks when it runs as a group leader).
for d in slurmctld slurmd; do
  if [ -s "$BASE/$d.daemon.pid" ]; then cp "$BASE/$d.daemon.pid" "$BASE/$d.pid"; fi
done
echo "SLURM is running (state in $BASE; stop it with tests/slurm/stop-slurm.sh):"
sinfo
