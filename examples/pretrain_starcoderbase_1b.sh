#!/usr/bin/env bash
# StarCoderBase-1B (1.14B parameters: 24 layers, hidden 2048, 16 query heads with one shared K/V head,
# 8192 tokens of context) on ONE node of 8 GPUs, configs/starcoderbase-1b.yaml: data parallel 8 with the
# distributed optimizer (no tensor or pipeline parallelism: the model fits one GPU), bf16, flash attention,
# FIM 0.5, micro-batch 2 x 8 ranks x 32 accumulation steps = the 15.5B run's 512 x 8192 tokens per step.
# Plan (DRY_RUN=1): about 36 GB per GPU on an A100 80GB, ~49 s per step at 40% MFU on A100.
# Measured with NPROC_PER_NODE=1 on one H100 80GB (torch 2.11, SDPA: flash-attn not installed), micro-batch
# 2 x 8192 tokens: 46,400 tokens/s, 54% MFU; saving a checkpoint (16 GB with the optimizer) took 51 s.
#
# Needs: 8 A100/H100 (40 GB is too little at micro-batch 2: use MICRO_BATCH=1 or TP=2), the package's
# requirements (plus flash-attn; tensorboard and wandb for those logs), and:
#   TOKENIZER_FILE  the StarCoder tokenizer.json                        [$DATA_ROOT/tokenizer.json]
#   DATA_PATH       Megatron dataset prefix(es), '/d/python_content_document' or 'W1 P1 W2 P2 ...'
#                                                                       [$DATA_ROOT/python_content_document]
#   or TRAIN_SPLITS (and VALID_SPLITS): BigCode weighted-split-paths files instead of DATA_PATH
#   DATA_ROOT       default location of the above                      [/data/starcoderdata]
#   CHECKPOINT_DIR  --save and --load (resumes from the newest checkpoint) [$ROOT/runs/starcoderbase-1b]
#   TP [1], PP [1]  layout; data parallel = 8 / (TP x PP); NPROC_PER_NODE [8] GPUs to use
#   MICRO_BATCH []  --micro-batch-size override (the global batch stays 512: more accumulation steps)
#   PYTHON [python], MEGATRON_ROOT [this script's repository]
#
# Run (from anywhere):
#   DRY_RUN=1 bash examples/pretrain_starcoderbase_1b.sh           # memory/time plan, no GPU needed
#   DATA_ROOT=/data/sc bash examples/pretrain_starcoderbase_1b.sh
#   bash examples/pretrain_starcoderbase_1b.sh --train-iters 20 --save-interval 10 --log-interval 1  # smoke
# Arguments are appended to the training command line (the last of a repeated flag wins).
#
# How to change it:
#   - Run length: the preset trains 250k steps (1T tokens, months on one node); e.g. --train-iters 20000
#     is 84B tokens (~11 days at 40% MFU on A100s); the lr decays over --train-iters.
#   - Layout: TP=2 (tensor parallel 2 x data parallel 4, add --sequence-parallel) halves the weights and
#     activations per GPU; or --recompute-granularity selective / full if memory is short.
#   - Several nodes: examples/pretrain_multinode_torchrun.sh with CONFIG=starcoderbase-1b.
set -euo pipefail

ROOT="${MEGATRON_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$ROOT"

PYTHON="${PYTHON:-python}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
TP="${TP:-1}"
PP="${PP:-1}"
DATA_ROOT="${DATA_ROOT:-/data/starcoderdata}"
TOKENIZER_FILE="${TOKENIZER_FILE:-$DATA_ROOT/tokenizer.json}"
DATA_PATH="${DATA_PATH:-$DATA_ROOT/python_content_document}"
TRAIN_SPLITS="${TRAIN_SPLITS:-}"
VALID_SPLITS="${VALID_SPLITS:-}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-$ROOT/runs/starcoderbase-1b}"

# One hardware queue per GPU so that communication kernels start in issue order (overlap); a failed or
# timed-out collective ends the process instead of hanging the others (see the 15B SLURM script).
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

ARGS=(
  --config starcoderbase-1b
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --bf16 --use-flash-attn --use-distributed-optimizer
  --tokenizer-type TokenizerFromFile --tokenizer-file "$TOKENIZER_FILE"
  --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR"
)
if [ -n "${MICRO_BATCH:-}" ]; then ARGS+=(--micro-batch-size "$MICRO_BATCH"); fi
if [ -n "$TRAIN_SPLITS" ]; then
  ARGS+=(--train-weighted-split-paths-path "$TRAIN_SPLITS")
  if [ -n "$VALID_SPLITS" ]; then ARGS+=(--valid-weighted-split-paths-path "$VALID_SPLITS"); fi
else
  # shellcheck disable=SC2206  # DATA_PATH may be a weighted list 'W1 P1 W2 P2'
  ARGS+=(--data-path $DATA_PATH)
fi

if [ "${DRY_RUN:-0}" = 1 ]; then
  exec env -u WORLD_SIZE -u RANK "$PYTHON" -m megatron.pretrain "${ARGS[@]}" \
    --data-parallel-size "$((NPROC_PER_NODE / (TP * PP)))" --dry-run "$@"
fi

mkdir -p "$CHECKPOINT_DIR"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE" \
  -m megatron.pretrain "${ARGS[@]}" --data-parallel-size "$((NPROC_PER_NODE / (TP * PP)))" "$@"
