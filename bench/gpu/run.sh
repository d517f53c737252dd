#!/usr/bin/env bash
# GPU proof kit, the one command (bench/gpu/README.md). On a bare GPU machine whose Python has CUDA torch and an old
# transformers, it installs the wheels bench/gpu/prepare.sh put in .whl/ (no registry needed), then runs the
# full-size backbones through the real stage runner within a hard time budget (bench/gpu/kit.py) and writes
# gpu.json + gpu.md after every case into $OUT when the device tool sets it (else bench/results/), so whatever was
# measured comes back even if the command is cut off; logs.txt (set-up and every run's log) follows at the end.
#
#   bash bench/gpu/run.sh                                  the GPU run
#   bash bench/gpu/run.sh --cpu-smoke --out DIR            the CPU mode, results under DIR: the wheel set checked
#        and installed by the same pip command into a scratch directory (cross-install flags for the GPU's Python),
#        the GPU cases as a dry run (full size, every step but the CUDA ones), the tiny models through the launcher
#
# Options: --budget-s S   seconds for all cases (default 480: the device tool allows 600 per command)
#          --cases A,B    a subset of the cases (names in bench/gpu/kit.py)
#          --wheels DIR   the wheel set (default .whl)
# Env:     PYTHON (default .venv/bin/python if present, else python3)   RMPL_COMMIT (the commit measured: the tree
#          that travels has no .git)   RMPL_GPU_SITE (where the wheels go, default /tmp/rmpl-gpu-site)
#          RMPL_GPU_WORK (scratch: model directories, shards, runs; default /tmp/rmpl-gpu-kit, emptied first)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
export RMPL_KIT_COMMAND="bash bench/gpu/run.sh $*"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

mode=gpu out="" wheels=$ROOT/.whl budget=480 cases=""
while [ $# -gt 0 ]; do
    case $1 in
        --cpu-smoke) mode=cpu-smoke ;;
        --out) out=${2:?--out needs a directory}; shift ;;
        --wheels) wheels=${2:?--wheels needs a directory}; shift ;;
        --budget-s) budget=${2:?--budget-s needs seconds}; shift ;;
        --cases) cases=${2:?--cases needs names}; shift ;;
        -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $budget =~ ^[0-9]+$ ]] || { echo "run.sh: --budget-s: expected whole seconds, got $budget" >&2; exit 2; }
case_args=()
if [ -n "$cases" ]; then case_args=(--cases "$cases"); fi

if [ "$mode" = cpu-smoke ]; then
    [ -n "$out" ] || { echo "run.sh: --cpu-smoke needs --out DIR (its results are not measurements)" >&2; exit 2; }
    mkdir -p "$out"
    install_args=()
    if [ -f "$wheels/manifest.json" ]; then
        "$PYTHON" bench/gpu/wheels.py install "$wheels" --site "$out/unused-site" --dry-run --json "$out/install.json"
        install_args=(--install-json "$out/install.json")
    else
        echo "run.sh: no $wheels/manifest.json: the install step is not checked (bench/gpu/prepare.sh makes one)"
    fi
    "$PYTHON" bench/gpu/kit.py --dry-run --out "$out/dry-run" --budget-s "$budget" \
        ${install_args[@]+"${install_args[@]}"} ${case_args[@]+"${case_args[@]}"}
    # --cases names GPU cases; the tiny cases always run in full.
    exec "$PYTHON" bench/gpu/kit.py --cpu-smoke --out "$out/cpu-smoke" --budget-s "$budget" \
        ${install_args[@]+"${install_args[@]}"}
fi

out=${out:-${OUT:-$ROOT/bench/results}}
site=${RMPL_GPU_SITE:-/tmp/rmpl-gpu-site}
work=${RMPL_GPU_WORK:-/tmp/rmpl-gpu-kit}
rm -rf "$work"
mkdir -p "$work" "$out"

setup() {
    echo "run.sh: installing $wheels into $site"
    timeout 120 "$PYTHON" bench/gpu/wheels.py install "$wheels" --site "$site" --json "$work/install.json" || return
    PYTHONPATH="$site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import sys

import torch
import transformers

for name in ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "huggingface_hub", "tokenizers"):
    print(f"run.sh: {name} {metadata.version(name)}")
print(f"run.sh: CUDA available: {torch.cuda.is_available()}, torch CUDA {torch.version.cuda}")
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 21):
    sys.exit(f"run.sh: transformers {transformers.__version__} from {transformers.__file__}; the package needs >= 5.21")
EOF
}

set +e
setup 2>&1 | tee "$work/setup.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -eq 0 ]; then
    export PYTHONPATH="$site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$site/bin:$PATH"
    # The kit keeps to its budget; this is the backstop, short enough that the device tool's 600 s are not reached
    # (set-up ~40 s + budget + 45 + 15).
    timeout --kill-after=15 $((budget + 45)) "$PYTHON" bench/gpu/kit.py --out "$out" --work "$work" \
        --budget-s "$budget" --install-json "$work/install.json" ${case_args[@]+"${case_args[@]}"} || rc=$?
else
    echo "run.sh: the set-up failed (exit $rc): no case ran; see $work/setup.log" >&2
fi
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    if [ "$out" != "$OUT" ]; then cp "$out/gpu.json" "$out/gpu.md" "$OUT/" 2>/dev/null || true; fi
    # The set-up and every run's log, the last 8 MB of them: enough to see why something failed.
    for log in "$work/setup.log" "$work"/cases/*/*.log; do
        if [ -f "$log" ]; then echo "===== $log"; cat "$log"; fi
    done | tail -c 8000000 >"$OUT/logs.txt"
fi
exit "$rc"
