# Sourced by slurm_local_up.sh and slurm_local_down.sh: the state directory and the daemon checks they share.

# The state directory: the first argument, else $ARCFACE_SLURM_DIR, else /tmp/arcface-slurm; made absolute.
slurm_state_dir() {
  local dir=${1:-${ARCFACE_SLURM_DIR:-/tmp/arcface-slurm}}
  case "$dir" in
    /*) echo "$dir" ;;
    *) echo "$PWD/$dir" ;;
  esac
}

# is_running PID NAME: process PID runs and is called NAME (not a reused pid, not a zombie waiting to be reaped).
is_running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  [[ "$stat" == "$1 ($2) "[!Z]* ]] # /proc/PID/stat: "PID (NAME) STATE ..."
}

# alive PIDFILE NAME: the pid file names a running process called NAME.
alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && is_running "$pid" "$2"
}
