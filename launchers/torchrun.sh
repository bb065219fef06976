#!/usr/bin/env bash
# One node, NPROC processes (one per GPU, or gloo processes on a CPU):
#   launchers/torchrun.sh NPROC [hydra overrides...]
# All ranks must share one output directory, so it is fixed here unless hydra.run.dir is given.
set -euo pipefail
nproc=${1:?usage: launchers/torchrun.sh NPROC [hydra overrides...]}
shift
run_dir="hydra.run.dir=outputs/$(date +%Y-%m-%d/%H-%M-%S)"
case " $* " in *" hydra.run.dir="*) run_dir="" ;; esac
exec torchrun --standalone --nproc_per_node="$nproc" -m arcface.train ${run_dir:+"$run_dir"} "$@"
