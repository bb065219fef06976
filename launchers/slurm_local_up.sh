#!/usr/bin/env bash
# A real single-node SLURM on this machine (Debian's slurm-wlm + munge), for tests and demos:
#   launchers/slurm_local_up.sh [STATE_DIR]        (default: $ARCFACE_SLURM_DIR, else /tmp/arcface-slurm)
# Needs root. Installs the apt packages when they are missing, writes STATE_DIR/etc/slurm.conf for this machine's
# CPUs and memory, starts munged, slurmctld and slurmd with every pid, log, socket and spool file under STATE_DIR,
# and waits until the node takes jobs. Running it again while the cluster is up changes nothing.
# On success it prints the two exports a shell needs (also in STATE_DIR/env.sh):
#   SLURM_CONF (the commands find the cluster through it) and PATH with STATE_DIR/bin first, where an `sacct`
#   stand-in answers from slurmctld (accounting is off, and submitit polls sacct for job states).
# Stop it with launchers/slurm_local_down.sh [STATE_DIR].
# Exit status: 0 up; 3 SLURM cannot be installed here (not root, no apt, packages unavailable); 1 anything else.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launchers/slurm_local_common.sh
. "$here/slurm_local_common.sh"
dir=$(slurm_state_dir "${1:-}")
wait_s=60

die() { # die STATUS MESSAGE: one line on stderr
  echo "slurm_local_up: $2" >&2
  exit "$1"
}

[[ "$dir" =~ ^[A-Za-z0-9_./+-]+$ ]] ||
  die 1 "state directory '$dir' may hold only letters, digits and ._+-/ (it goes into slurm.conf and PATH)."
[ "$(id -u)" = 0 ] || die 3 "needs root (it installs packages and runs slurmctld/slurmd as root); rerun as root."

conf=$dir/etc/slurm.conf
munge_dir=$dir/munge
mkdir -p "$dir"/{etc,bin,run,log,spool/ctld,spool/d} "$munge_dir"

# --- packages -----------------------------------------------------------------------------------------------------
packages=(slurm-wlm munge)
[ -x /usr/bin/python3 ] || packages+=(python3-minimal) # runs the sacct stand-in
missing=0
for exe in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/sbatch /usr/bin/scontrol /usr/bin/python3; do
  [ -x "$exe" ] || missing=1
done
if [ "$missing" = 1 ]; then
  command -v apt-get >/dev/null || die 3 "SLURM is not installed and there is no apt-get to install it."
  apt_log=$dir/log/apt.log
  echo "slurm_local_up: installing ${packages[*]} (log: $apt_log)" >&2
  apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}" >>"$apt_log" 2>&1
  }
  # The package lists are refreshed only when installing from the present ones fails (absent or stale lists).
  apt_install || { apt-get update >>"$apt_log" 2>&1 && apt_install; } ||
    die 3 "could not install ${packages[*]} with apt-get; see $apt_log."
fi

export SLURM_CONF=$conf
host=$(hostname -s)

# --- munge --------------------------------------------------------------------------------------------------------
# A munged of our own on a socket inside STATE_DIR: a system munged (if any) is left alone.
chown munge:munge "$munge_dir"
chmod 0755 "$munge_dir"
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
fi
if ! alive "$munge_dir/munged.pid" munged; then
  runuser -u munge -- /usr/sbin/munged --socket="$munge_dir/munge.socket" --pid-file="$munge_dir/munged.pid" \
    --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" ||
    die 1 "munged did not start; see $munge_dir/munged.log."
fi
munge -n -S "$munge_dir/munge.socket" | unmunge -S "$munge_dir/munge.socket" >/dev/null ||
  die 1 "munge does not answer on $munge_dir/munge.socket; see $munge_dir/munged.log."

# --- slurm.conf ---------------------------------------------------------------------------------------------------
# slurmd -C reports this machine's CPUs, sockets, cores, threads and memory exactly as slurmd will count them: a
# node declared with more than it has would be drained at registration.
node_line=$(/usr/sbin/slurmd -C | head -n 1)
[[ "$node_line" == "NodeName=$host "* ]] || die 1 "slurmd -C printed '$node_line', not a line for node '$host'."
tmp_conf=$(mktemp "$dir/etc/.slurm.conf.XXXXXX")
cat >"$tmp_conf" <<EOF
# Written by launchers/slurm_local_up.sh: a one-node cluster on $host, all state under $dir.
ClusterName=arcface-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$munge_dir/munge.socket,cred_expire=30
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Without accounting, finished jobs are known to slurmctld for MinJobAge seconds and to the job completion log
# after that: the sacct stand-in reads both.
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
MinJobAge=3600
SchedulerType=sched/backfill
# A batch job is scheduled when it is submitted, not up to 3 s later (the default suits high submission rates),
# and waiting jobs (a requeued one whose delay has passed) are looked at every 5 s, not every 30 to 60 s.
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
# FORCE:2 lets two jobs share each CPU, so two small jobs run side by side on a 2-CPU machine.
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
EOF
chmod 0644 "$tmp_conf"
changed=0
cmp -s "$tmp_conf" "$conf" || changed=1
mv -f "$tmp_conf" "$conf"

# The stand-in is copied, not linked: the cluster keeps working if this checkout moves. Replaced by a rename, so
# that a caller never finds it missing.
if ! cmp -s "$here/sacct_standin.py" "$dir/bin/sacct"; then
  install -m 0755 "$here/sacct_standin.py" "$dir/bin/.sacct.tmp"
  mv -f "$dir/bin/.sacct.tmp" "$dir/bin/sacct"
fi

# --- daemons ------------------------------------------------------------------------------------------------------
if ! alive "$dir/run/slurmctld.pid" slurmctld; then
  /usr/sbin/slurmctld -f "$conf" -i || die 1 "slurmctld did not start; see $dir/log/slurmctld.log."
elif [ "$changed" = 1 ]; then
  # Running daemons read slurm.conf only when told to (a newer version of this script wrote a different one).
  scontrol reconfigure || die 1 "scontrol reconfigure failed for the new $conf; see $dir/log/slurmctld.log."
fi
if ! alive "$dir/run/slurmd.pid" slurmd; then
  /usr/sbin/slurmd -f "$conf" || die 1 "slurmd did not start; see $dir/log/slurmd.log."
fi

# Up = the node answers (no '*' suffix) and is idle, or busy with jobs of an earlier bring-up.
up_states="idle mixed allocated completing"
state=""
for ((i = 0; i < wait_s; i++)); do
  state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
  [[ " $up_states " == *" $state "* ]] && break
  sleep 1
done
if [[ " $up_states " != *" $state "* ]]; then
  reason=$(sinfo -h -n "$host" -o %E 2>/dev/null || true)
  die 1 "node $host is '${state:-not listed}' (${reason:-no reason given}) after ${wait_s}s, not idle; \
see $dir/log/slurm*.log."
fi

printf 'export SLURM_CONF=%s\nexport PATH=%s/bin:$PATH\n' "$conf" "$dir" >"$dir/env.sh.tmp"
mv -f "$dir/env.sh.tmp" "$dir/env.sh"
echo "slurm_local_up: node $host is $state (state in $dir); use it with:" >&2
cat "$dir/env.sh"
