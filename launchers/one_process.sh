#!/usr/bin/env bash
# One process on this machine (one GPU, or the CPU): the plain entry point, with its outputs in Hydra's run dir.
#   launchers/one_process.sh [hydra overrides...]        e.g. experiment=ms1mv3_r50_onegpu dataset.root=/data/ms1m
set -euo pipefail
exec python -m arcface.train "$@"
