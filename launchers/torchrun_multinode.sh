#!/usr/bin/env bash
# Several nodes: run this once on every node with the same MASTER_ADDR/MASTER_PORT and RUN_DIR (a shared path):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=ip0 MASTER_PORT=29500 RUN_DIR=/shared/runs/x launchers/torchrun_multinode.sh 8 experiment=...
set -euo pipefail
nproc=${1:?usage: launchers/torchrun_multinode.sh NPROC_PER_NODE [hydra overrides...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${RUN_DIR:?set RUN_DIR}"
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$nproc" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" -m arcface.train "hydra.run.dir=$RUN_DIR" "$@"
