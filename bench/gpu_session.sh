#!/usr/bin/env bash
# The one prepared GPU session: the GPU tests, then bench/gpu_train_step.py at both StarCoder shapes
# (ours, transformers and Megatron-core side by side), within about 9 minutes, logs and JSON under $OUT.
#
# Here, once (the GPU machine has no network; this fetches what its image lacks into .whl/, ignored by
# git, about 5 MB: the megatron-core wheel for its Python 3.12, and torchao for --fp8-format in our process; torch, numpy, packaging and transformers
# are already there):
#     bash bench/gpu_session.sh --download
# Then the device call, from the repository root:
#     run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# It writes to $OUT (at most 8 files): env.txt (GPU, driver, versions), pytest_gpu.log,
# bench_1b.log/.json and bench_15b_layer.log/.json. Each step has its own time limit and prints its rows
# as they come, so a step that runs out still leaves its partial numbers; the JSON files are rewritten
# after every peer. Elsewhere (a GPU box of your own) OUT defaults to ./gpu_session_out.
set -uo pipefail
cd "$(dirname "$0")/.."

MCORE_VERSION=0.16.1
TORCHAO_VERSION=0.18.0
WHEEL_DIR=.whl

if [[ "${1:-}" == "--download" ]]; then
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/$WHEEL_DIR/" "$exclude" 2>/dev/null || echo "/$WHEEL_DIR/" >>"$exclude"
    python=python3
    [[ -x .venv/bin/python ]] && python=.venv/bin/python
    # megatron-core's own needs (torch, numpy, packaging) are in the GPU image: --no-deps
    "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$WHEEL_DIR" "megatron-core==$MCORE_VERSION" || exit 1
    # torchao for our own process (--fp8-format and its gpu test), kept apart from megatron-core's site
    "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEEL_DIR/ours" "torchao==$TORCHAO_VERSION" || exit 1
    ls -l "$WHEEL_DIR"
    exit 0
fi

OUT="${OUT:-$PWD/gpu_session_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/site
if ! ls "$WHEEL_DIR"/megatron_core-*.whl >/dev/null 2>&1; then
    echo "no $WHEEL_DIR/megatron_core-*.whl: run 'bash bench/gpu_session.sh --download' first and carry .whl"
    echo "(the Megatron-core peer is skipped)"
    MCORE=()
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEEL_DIR"/*.whl || exit 1
    MCORE=(--mcore-path "$SITE")
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    # from / : `python -c` puts the current directory first on sys.path, and this checkout's megatron
    # would shadow megatron-core's (the name collision)
    (cd / && PYTHONPATH="$SITE" python3 -c 'import megatron.core as c; print("megatron-core", c.__version__)' 2>&1 | tail -1)
    git log -1 --format='commit %H %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# our package is not installed there: this checkout on PYTHONPATH (gpu_train_step.py keeps it away from
# the Megatron-core peer's processes, whose package is also named megatron)
export PYTHONPATH="$PWD"
if ls "$WHEEL_DIR"/ours/*.whl >/dev/null 2>&1; then  # torchao: our process only, never megatron-core's
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_ours \
        "$WHEEL_DIR"/ours/*.whl && export PYTHONPATH="$PWD:/tmp/site_ours"
fi

echo "== pytest -m gpu"
mapfile -t gpu_tests < <(grep -rlE "mark\.gpu|pytestmark = .*gpu" tests --include='test_*.py' | sort)
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider "${gpu_tests[@]}" 2>&1 | tee "$OUT/pytest_gpu.log"

echo "== 1b"
timeout 170 python3 bench/gpu_train_step.py --shape 1b "${MCORE[@]}" --worker-timeout 100 \
    --json "$OUT/bench_1b.json" 2>&1 | tee "$OUT/bench_1b.log"

echo "== 15b-layer"
timeout 220 python3 bench/gpu_train_step.py --shape 15b-layer "${MCORE[@]}" --worker-timeout 120 \
    --json "$OUT/bench_15b_layer.json" 2>&1 | tee "$OUT/bench_15b_layer.log"
date -u
