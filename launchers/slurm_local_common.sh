# Sourced by slurm_local_up.sh and slurm_local_down.sh: the state directory and the daemon checks they share.

# The state directory: the first argument, else $ARCFACE_SLURM_DIR, else /tmp/arcface-slurm; made absolute.
slurm_state_dir() {
  local dir=${1:-${ARCFACE_SLURM_DIR:-/tmp/arcface-slurm}}
  case "$dir" in
    /*) echo "$dir" ;;
    *) echo "$PWD/$dir" ;;
  esac
}

# alive PIDFILE NAME: the pid file names a running process called NAME (a stale file, a reused pid or a zombie
# waiting to be reaped does not count).
alive() {
  local pid stat
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ "$stat" == "$pid ($2) "[!Z]* ]] # /proc/PID/stat: "PID (NAME) STATE ..."
}
