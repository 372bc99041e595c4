#!/usr/bin/env bash
# Stop the single-node SLURM that start.sh started under $PTYINR_SLURM_ROOT, by its pid files
# only (never by process name): cancel its jobs, then slurmd, slurmctld and munged.
set -uo pipefail
ROOT="${PTYINR_SLURM_ROOT:-/tmp/ptyinr-slurm}"
export SLURM_CONF="$ROOT/slurm.conf"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$ROOT/run/slurmctld.pid" && [ -f "$SLURM_CONF" ]; then
  timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
  # Let slurmd reap the jobs' processes (KillWait=5) before it goes away.
  for _ in $(seq 1 40); do
    [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.25
  done
fi
# SIGTERM to a group of daemons at once, wait for each (SIGKILL after 15 s), drop the pid files.
stop_group() {
  local pf pid pids=()
  for pf in "$@"; do
    [ -s "$pf" ] || continue
    pid="$(cat "$pf")"
    kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  done
  rm -f "$@"
}
stop_group "$ROOT/run/slurmd.pid" "$ROOT/run/slurmctld.pid"
stop_group "$ROOT/munge/munged.pid"   # last: the SLURM daemons authenticate through it
echo "slurm under $ROOT stopped"
