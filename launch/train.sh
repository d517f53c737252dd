#!/usr/bin/env bash
# One stage on this machine's GPUs (or 2 CPU ranks without a GPU). Every hyperparameter is in the recipe;
# extra arguments are passed on (e.g. --resume none, key.path=value overrides).
#   launch/train.sh launch/recipes/rmpl_qwen2vl_7b.yaml stage1 [--gpus 2] [key.path=value ...]
set -euo pipefail
recipe=${1:?usage: train.sh RECIPE STAGE [args...]}
stage=${2:?usage: train.sh RECIPE STAGE [args...]}
shift 2
exec rmpl-ds train "$recipe" --stage "$stage" "$@"
