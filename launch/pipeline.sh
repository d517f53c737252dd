#!/usr/bin/env bash
# Every stage of a recipe, then evaluation and the report; finished stages are not run again.
#   launch/pipeline.sh launch/recipes/rmpl_qwen2vl_7b.yaml [--gpus 2] [--out runs/x]
set -euo pipefail
recipe=${1:?usage: pipeline.sh RECIPE [args...]}
shift
exec rmpl-ds pipeline "$recipe" "$@"
