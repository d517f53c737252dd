#!/usr/bin/env bash
# Fill .whl/ with the wheels the GPU machine lacks, for bench/gpu/run.sh to install there (run this HERE, where
# pip reaches a registry; the GPU machine reaches none). Versions are the ones this checkout's .venv runs the tests
# with. deepspeed ships as an sdist, so its wheel is built here (DS_BUILD_OPS=0: no compiled ops; ZeRO-2 with the
# package's torch AdamW needs none). The bitsandbytes wheel (43 MB, one native library per CUDA/ROCm/XPU version)
# is cut to the libraries the GPU's torch (CUDA 13.0) loads, so the whole carry fits the device tool's 64 MiB.
#
# Usage: bash bench/gpu/prepare.sh            (then: the `run` call in bench/gpu/README.md)
# Env:   VENV_PY (default .venv/bin/python)   PIP_PY (default: VENV_PY)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
VENV_PY=${VENV_PY:-$ROOT/.venv/bin/python}
PIP_PY=${PIP_PY:-$VENV_PY}
WHEELS=$ROOT/.whl

git check-ignore -q .whl/x.whl || { echo "prepare.sh: .whl/ is not git-ignored; add /.whl/ to .gitignore" >&2; exit 2; }

# What the GPU image lacks (bench/gpu/README.md, "What travels"): the project's pins, read from this .venv.
version() { "$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PURE=(transformers peft hjson pydantic annotated-types typing-inspection typing-extensions)
BINARY=(pydantic-core regex bitsandbytes)
specs=()
for name in "${PURE[@]}" "${BINARY[@]}"; do specs+=("$name==$(version "$name")"); done
DEEPSPEED="deepspeed==$(version deepspeed)"

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
platform_flags=()
for platform in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$platform"); done
echo "downloading ${specs[*]}"
"$PIP_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_flags[@]}" -d "$WHEELS" "${specs[@]}"

echo "building $DEEPSPEED (DS_BUILD_OPS=0) from its sdist"
DS_BUILD_OPS=0 "$PIP_PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir --no-binary=deepspeed \
    -w "$WHEELS" "$DEEPSPEED"

echo "cutting bitsandbytes to the CUDA 13.0/13.2 and CPU libraries"
"$VENV_PY" bench/gpu/wheels.py slim-bitsandbytes "$WHEELS"/bitsandbytes-*.whl --keep cuda130 --keep cuda132 --keep cpu

required=()
for name in "${PURE[@]}" "${BINARY[@]}" deepspeed; do required+=(--require "$name"); done
"$VENV_PY" bench/gpu/wheels.py manifest "$WHEELS" "${required[@]}" \
    --note "deepspeed=built here from the sdist with DS_BUILD_OPS=0 (no compiled ops)" \
    --note "bitsandbytes=repacked here: only libbitsandbytes_cuda130/cuda132/cpu kept, RECORD rewritten" \
    --note "transformers=the package needs >= 5.21 (boolean logits_to_keep); the image has 5.17"
echo "wrote $WHEELS/manifest.json"
