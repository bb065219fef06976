#!/usr/bin/env bash
# A sweep on SLURM, compared in MLflow: backbone x Partial FC rate, one job of NODES nodes per point.
#   launchers/slurm_sweep.sh [hydra overrides...]          e.g. dataset.root=/data/ms1m cluster.partition=gpu
# Logs to $MLFLOW_TRACKING_URI when it is set; otherwise it starts launchers/mlflow_server.sh in ./mlflow-server,
# bound to loopback, which serves jobs running on this machine (a local SLURM: launchers/slurm_local_up.sh). For
# real cluster nodes start the server with --host 0.0.0.0 first (docs/cluster.md) and export its URI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "${MLFLOW_TRACKING_URI:-}" ]; then
  eval "$("$here/mlflow_server.sh" start "$PWD/mlflow-server" | grep '^export MLFLOW_TRACKING_URI=')"
fi
exec python -m arcface.train -m cluster=slurm cluster.nodes="${NODES:-1}" experiment=ms1mv3_r50 \
  backbone=r50,vit_b pfc.rate=0.1,0.3 "$@"
