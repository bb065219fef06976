#!/usr/bin/env bash
# An MLflow tracking server that training runs on this machine or on cluster nodes log to:
#   launchers/mlflow_server.sh start DIR [--host ADDR] [--port N] [--backend-store-uri URI] [--workers N]
#                                        [--allowed-hosts LIST]
#   launchers/mlflow_server.sh stop DIR
# DIR holds everything: the sqlite store (DIR/mlflow.db, unless --backend-store-uri names another one, e.g.
# postgresql://user:password@dbhost/mlflow with psycopg2 installed), the artifacts the server stores for its
# clients (DIR/artifacts), its log (DIR/server.log), its process group (DIR/server.pgid) and URI (DIR/uri).
# It binds to 127.0.0.1 (port 5000) unless --host says otherwise. Bound to any other address it turns on MLflow's
# basic authentication (--app-name basic-auth): the admin user (MLFLOW_AUTH_ADMIN_USERNAME, default admin) is
# created on the first start with the password in MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more; MLflow has no
# default; later starts do not need it), and clients log in with MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD.
# The users live in DIR/auth/basic_auth.db.
# `start` prints `export MLFLOW_TRACKING_URI=...` once /health answers; starting a running server again just
# prints it. Needs `mlflow` on PATH (or this checkout's .venv).
set -euo pipefail

usage="usage: launchers/mlflow_server.sh start DIR [--host ADDR] [--port N] [--backend-store-uri URI]"
usage+=" [--workers N] [--allowed-hosts LIST] | stop DIR"
die() {
  echo "mlflow_server: $1" >&2
  exit "${2:-2}"
}
[ $# -ge 2 ] || die "$usage"
action=$1
dir=$2
shift 2
case "$action" in start | stop) ;; *) die "unknown action '$action'; $usage" ;; esac
# Made absolute without creating it: DIR is made only once the input has been checked.
case "$dir" in /*) ;; *) dir=$PWD/$dir ;; esac
pgid_file=$dir/server.pgid

# running: the process group named in DIR/server.pgid still has a member.
running() {
  local pgid
  pgid=$(cat "$pgid_file" 2>/dev/null) || return 1
  [[ "$pgid" =~ ^[0-9]+$ ]] && kill -0 -- "-$pgid" 2>/dev/null
}

if [ "$action" = stop ]; then
  [ $# -eq 0 ] || die "$usage"
  if running; then
    pgid=$(cat "$pgid_file")
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
      running || break
      sleep 0.5
    done
    if running; then
      echo "mlflow_server: the server in $dir ignored SIGTERM for 15 s; killing it." >&2
      kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
  fi
  rm -f "$pgid_file"
  echo "mlflow_server: stopped the server in $dir." >&2
  exit 0
fi

host=127.0.0.1
port=5000
backend=sqlite:///$dir/mlflow.db
workers=1
allowed_hosts=""
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "option $1 needs a value; $usage"
  case "$1" in
    --host) host=$2 ;;
    --port) port=$2 ;;
    --backend-store-uri) backend=$2 ;;
    --workers) workers=$2 ;;
    --allowed-hosts) allowed_hosts=$2 ;;
    *) die "unknown option '$1'; $usage" ;;
  esac
  shift 2
done
[[ "$port" =~ ^[0-9]+$ ]] || die "--port '$port' is not a port number."

if running; then
  uri=$(cat "$dir/uri" 2>/dev/null) ||
    die "a server runs in $dir, but not its URI (DIR/uri): stop it (launchers/mlflow_server.sh stop $dir) and start \
it again." 1
  echo "mlflow_server: already running in $dir." >&2
  echo "export MLFLOW_TRACKING_URI=$uri"
  exit 0
fi

mlflow=$(command -v mlflow || true)
if [ -z "$mlflow" ]; then
  mlflow=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/mlflow
  [ -x "$mlflow" ] || die "no mlflow on PATH and no $mlflow; install the project (make install) or activate its venv."
fi

args=(server --host "$host" --port "$port" --backend-store-uri "$backend" --workers "$workers"
  --serve-artifacts --artifacts-destination "$dir/artifacts")
case "$host" in
  127.* | localhost | ::1)
    uri_host=$host
    [ "$host" = ::1 ] && uri_host="[::1]"
    ;;
  *)
    # Reachable from other machines: nobody may use it without a password. The admin user is created on the
    # first start; later starts find it in DIR/auth/basic_auth.db.
    if [ ! -s "$dir/auth/basic_auth.db" ]; then
      [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] ||
        die "--host $host exposes the server beyond this machine, so basic authentication is on: set \
MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more) for its admin user, or bind to 127.0.0.1."
      [ "${#MLFLOW_AUTH_ADMIN_PASSWORD}" -ge 12 ] ||
        die "MLFLOW_AUTH_ADMIN_PASSWORD is shorter than the 12 characters MLflow requires; choose a longer one."
    fi
    mkdir -p "$dir/auth"
    chmod 0700 "$dir/auth"
    cat >"$dir/auth/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$dir/auth/basic_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    export MLFLOW_AUTH_CONFIG_PATH=$dir/auth/basic_auth.ini
    # The auth app signs its forms with this key; kept in DIR so a restart does not invalidate them.
    if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
      [ -s "$dir/auth/flask_secret" ] ||
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$dir/auth/flask_secret")
      MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$dir/auth/flask_secret")
      export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    args+=(--app-name basic-auth)
    uri_host=$host
    case "$host" in 0.0.0.0 | :: | "[::]") uri_host=$(hostname -f) ;; esac
    # MLflow rejects requests whose Host header is not allowed (DNS-rebinding protection); clients on other
    # nodes name this machine by its host name or one of its addresses.
    if [ -z "$allowed_hosts" ]; then
      for name in localhost 127.0.0.1 "$(hostname -s)" "$(hostname -f)" $(hostname -I 2>/dev/null) "$host"; do
        allowed_hosts+="${allowed_hosts:+,}$name,$name:*"
      done
    fi
    ;;
esac
[ -z "$allowed_hosts" ] || args+=(--allowed-hosts "$allowed_hosts")
uri=http://$uri_host:$port

# A server that already listens there would answer the health check in place of ours.
if (exec 3<>"/dev/tcp/${uri_host//[\[\]]/}/$port") 2>/dev/null; then
  die "port $port on $uri_host is already in use; pick another with --port." 1
fi

mkdir -p "$dir"
rm -f "$pgid_file"
# Recorded before the server starts, so a start that gives up waiting for it still leaves the URI of what runs.
echo "$uri" >"$dir/uri.tmp" && mv -f "$dir/uri.tmp" "$dir/uri"
log=$dir/server.log
# From DIR: the server imports nothing from the caller's folder (python -m puts it on sys.path).
cd "$dir"
# setsid: the server and its workers form one process group whose id is written first, so `stop` ends them all.
setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pgid_file" "$mlflow" "${args[@]}" >>"$log" 2>&1 </dev/null &
for ((i = 0; i < 120; i++)); do
  [ -s "$pgid_file" ] && break
  sleep 0.25
done

health() {
  local reply
  exec 3<>"/dev/tcp/${uri_host//[\[\]]/}/$port" || return 1
  printf 'GET /health HTTP/1.0\r\nHost: %s:%s\r\n\r\n' "$uri_host" "$port" >&3
  reply=$(cat <&3)
  exec 3<&-
  [[ "$reply" == *$'\r\n\r\n'OK* ]]
}
wait_s=90
for ((i = 0; i < wait_s * 2; i++)); do
  running || die "the server exited during start-up; see $log." 1
  health 2>/dev/null && break
  sleep 0.5
done
health 2>/dev/null ||
  die "no OK from $uri/health after ${wait_s}s; see $log (stop it: launchers/mlflow_server.sh stop $dir)." 1
echo "mlflow_server: serving $backend at $uri (artifacts in $dir/artifacts, log $log)." >&2
echo "export MLFLOW_TRACKING_URI=$uri"
