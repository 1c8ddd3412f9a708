#!/usr/bin/env bash
# stop-slurm.sh - stop the daemons that start-slurm.sh started, by their recorded PIDs only.
#
# Usage: sudo tests/slurm/stop-slurm.sh
# Leaves packages and /etc/slurm in place, so the next start-slurm.sh takes ~2 s.
# Note: with slurm-client installed but no controller, every snakemake start waits ~9 s
# (the SLURM plugin runs `scontrol show config`), so stop the cluster after the tests.
set -uo pipefail
BASE=${SLURM_CI_DIR:-/tmp/emmito-slurm}
stopped=0
for daemon in slurmd slurmctld munged; do
  pid_file="$BASE/$daemon.pid"
  [ -s "$pid_file" ] || continue
  pid=$(cat "$pid_file")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$daemon ($pid) ignored SIGTERM for 10 s: sending SIGKILL" >&2
      kill -9 "$pid" 2>/dev/null || true
    fi
    echo "stopped $daemon ($pid)"
    stopped=$((stopped + 1))
  fi
  rm -f "$pid_file" "$BASE/$daemon.daemon.pid"
done
[ "$stopped" -gt 0 ] || echo "no SLURM daemons recorded under $BASE were running"
