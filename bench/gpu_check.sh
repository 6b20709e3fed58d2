#!/usr/bin/env bash
# The GPU check of long-context DPO (bench/gpu_check.py says what it runs), for a GPU machine that
# reaches no network: nothing is downloaded there. Results: $OUT/gpu-check.json (OUT defaults to
# bench/results/gpu-check), within 8 minutes.
#
#   bench/gpu_check.sh --prepare   # here, where a package registry answers: fill .whl/ (see below)
#   bench/gpu_check.sh             # on the GPU machine, with .whl/ carried beside the working tree
#   bench/gpu_check.sh --dry-run   # on a CPU: the same steps, tiny sizes, 20 optimiser steps in all
#
# .whl/ (ignored by git, at most 64 MiB with the working tree) holds the wheels of the packages the
# check imports that the GPU image lacks, for its Python 3.12, and the embedded model's tokenizer
# files (the GGUF package they come from is too large to carry).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

# Imported by the check, absent from the GPU image's package list (at this environment's versions).
MISSING="trl deepspeed datasets dill multiprocess xxhash pydantic pydantic-core annotated-types typing-inspection
polars polars-runtime-32 orjson hjson aiolimiter tenacity qdrant-client jieba rouge fuzzywuzzy sniffio tornado"

if [ "${1:-}" = "--prepare" ]; then
    rm -rf .whl && mkdir -p .whl
    for name in $MISSING; do
        spec="$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
        # Binary wheels for the GPU image's CPython 3.12; a package published as source only is built
        # here into a pure-Python wheel.
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$spec" 2>/dev/null || "$PY" -m pip wheel -q --no-deps -w .whl "$spec"
    done
    cp -r "$("$PY" -c "from longreward_core.models.smollm2 import embedded_tokenizer_dir; print(embedded_tokenizer_dir())")" .whl/
    du -sh .whl
    exit 0
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false LITELLM_LOCAL_MODEL_COST_MAP=True
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/longreward-site .whl/*.whl
    export PYTHONPATH="/tmp/longreward-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d .whl/smollm2-135m-instruct-tokenizer ]; then
    export LONGREWARD_CACHE="$PWD/.whl"  # where the embedded tokenizer's files are looked for
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results/gpu-check}"
mkdir -p "$OUT"
LIMIT=480  # the GPU run's 8 minutes; the dry run on a few shared CPU cores takes longer
[ "${1:-}" = "--dry-run" ] && LIMIT=1800
timeout "$LIMIT" "$PY" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-check.log"
