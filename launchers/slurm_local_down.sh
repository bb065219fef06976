#!/usr/bin/env bash
# Stops the single-node SLURM that launchers/slurm_local_up.sh brought up, and removes its state directory:
#   launchers/slurm_local_down.sh [--keep] [STATE_DIR]    (default: $ARCFACE_SLURM_DIR, else /tmp/arcface-slurm)
# Jobs still queued or running are cancelled first. Only the daemons named by the pid files in STATE_DIR are
# stopped (a system munged or another cluster is left alone). --keep keeps STATE_DIR (logs, job completion log).
set -euo pipefail

keep=0
if [ "${1:-}" = --keep ]; then
  keep=1
  shift
fi
# shellcheck source=launchers/slurm_local_common.sh
. "$(dirname "$0")/slurm_local_common.sh"
dir=$(slurm_state_dir "${1:-}")
conf=$dir/etc/slurm.conf
export SLURM_CONF=$conf

if [ ! -f "$conf" ] || ! grep -q '^# Written by launchers/slurm_local_up.sh' "$conf"; then
  echo "slurm_local_down: $dir holds no cluster of launchers/slurm_local_up.sh (no $conf); nothing to stop." >&2
  exit 0
fi

# stop PIDFILE NAME: SIGTERM, up to 20 s to exit, then SIGKILL. The pid is read once: a daemon may remove its
# pid file before it has exited.
stop() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  [[ "$pid" =~ ^[0-9]+$ ]] && is_running "$pid" "$2" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 40; i++)); do
    is_running "$pid" "$2" || return 0
    sleep 0.5
  done
  echo "slurm_local_down: $2 (pid $pid) ignored SIGTERM for 20 s; killing it." >&2
  kill -KILL "$pid" 2>/dev/null || true
}

if alive "$dir/run/slurmctld.pid" slurmctld && alive "$dir/run/slurmd.pid" slurmd; then
  # Cancelled jobs get SIGTERM and SIGKILL only KillWait (30 s) later, and submitit's tasks ignore SIGTERM: after
  # the cancel, the processes SLURM lists for each job are killed at once. Then wait until no job is left, so that
  # no job process outlives slurmd.
  jobs=$(squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086  # one argument per job id
    scancel $jobs 2>/dev/null || true
    for job in $jobs; do
      scontrol listpids "$job" 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}' |
        xargs -r kill -KILL 2>/dev/null || true
    done
    for ((i = 0; i < 45; i++)); do
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
      sleep 1
    done
  fi
fi
stop "$dir/run/slurmd.pid" slurmd
stop "$dir/run/slurmctld.pid" slurmctld
stop "$dir/munge/munged.pid" munged

if [ "$keep" = 1 ]; then
  echo "slurm_local_down: stopped; state kept in $dir." >&2
else
  rm -rf "$dir"
  echo "slurm_local_down: stopped; removed $dir." >&2
fi
