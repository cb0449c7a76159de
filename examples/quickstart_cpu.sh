#!/usr/bin/env bash
# CPU quickstart: the whole pipeline on a corpus that exists on any machine with Python.
#
#   make quickstart            (from the repository root; sets up .venv first)
#   bash examples/quickstart_cpu.sh [WORKDIR]     (with the package's requirements already installed)
#
# Steps: (1) a JSONL corpus in The Stack's shape from this interpreter's standard library,
# (2) a StarCoder-recipe tokenizer trained on it, (3) Megatron-format .bin/.idx, (4) the tiny-cpu preset
# trained with FIM and validation, saved under WORKDIR/checkpoints, (5) a greedy completion of a prompt,
# then WORKDIR/metrics.png, a picture of the run's metrics (with matplotlib installed).
# About 5-10 minutes on 2 cores. Each step is skipped when its output already exists (outputs are
# written atomically, so an existing file is complete); delete WORKDIR to start over.
# Change the model or run length by editing configs/tiny-cpu.yaml or appending flags to TRAIN_ARGS,
# e.g. TRAIN_ARGS="--train-iters 100" bash examples/quickstart_cpu.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$ROOT/quickstart}"
PYTHON="${PYTHON:-python}"
VOCAB_SIZE="${VOCAB_SIZE:-4096}"
mkdir -p "$WORK"
cd "$ROOT"

step() { printf '\n=== %s ===\n' "$*"; }

step "1/5 demo corpus (Python standard library) -> $WORK/corpus.jsonl"
if [ ! -f "$WORK/corpus.jsonl" ]; then
  "$PYTHON" tools/make_demo_corpus.py --output "$WORK/corpus.jsonl"
else
  echo "exists, skipped"
fi

step "2/5 tokenizer (byte-level BPE, vocab $VOCAB_SIZE) -> $WORK/tokenizer.json"
if [ ! -f "$WORK/tokenizer.json" ]; then
  "$PYTHON" tools/train_tokenizer.py --input "$WORK/corpus.jsonl" --output "$WORK/tokenizer.json" \
    --vocab-size "$VOCAB_SIZE"
else
  echo "exists, skipped"
fi

step "3/5 preprocessing -> $WORK/data/stdlib_content_document.{bin,idx}"
if [ ! -f "$WORK/data/stdlib_content_document.idx" ]; then
  mkdir -p "$WORK/data"
  "$PYTHON" tools/preprocess_data.py --input "$WORK/corpus.jsonl" --json-keys content \
    --output-prefix "$WORK/data/stdlib" --tokenizer-type TokenizerFromFile \
    --tokenizer-file "$WORK/tokenizer.json" --append-eod --workers 2 --overwrite
else
  echo "exists, skipped"
fi

step "4/5 training configs/tiny-cpu.yaml with FIM and validation -> $WORK/checkpoints"
# --load the same directory: a rerun resumes (or finds the run finished) instead of being refused for
# writing over the checkpoints of an earlier run
# shellcheck disable=SC2086
"$PYTHON" -m megatron.pretrain --config configs/tiny-cpu.yaml \
  --data-path "$WORK/data/stdlib_content_document" \
  --tokenizer-type TokenizerFromFile --tokenizer-file "$WORK/tokenizer.json" \
  --save "$WORK/checkpoints" --load "$WORK/checkpoints" --metrics-jsonl "$WORK/metrics.jsonl" ${TRAIN_ARGS:-}

step "5/5 greedy completion"
"$PYTHON" tools/generate.py --load "$WORK/checkpoints" --tokenizer-file "$WORK/tokenizer.json" \
  --prompt 'def fibonacci(n):' --max-new-tokens 64

"$PYTHON" - "$WORK/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
valid = [r["valid_lm_loss"] for r in rows if "valid_lm_loss" in r]
if len(valid) >= 2:
    print(f"\nvalidation loss: first {valid[0]:.3f} -> last {valid[-1]:.3f} "
          f"({100 * valid[-1] / valid[0]:.0f}% of the first)")
PY
# the picture: loss against tokens, learning rate, grad norm, throughput (needs matplotlib, the `plot`
# extra; without it the quickstart still succeeds and says how to draw it later)
PICTURE=""
if ! "$PYTHON" -c "import matplotlib" 2>/dev/null; then
  echo "no metrics plot: matplotlib is not installed; pip install -e .[plot], then"
  echo "  $PYTHON tools/plot_metrics.py $WORK/metrics.jsonl --output $WORK/metrics.png"
elif "$PYTHON" tools/plot_metrics.py "$WORK/metrics.jsonl" --output "$WORK/metrics.png"; then
  PICTURE="$WORK/metrics.png"
else
  echo "WARNING: the metrics plot failed (above); the run itself is complete"
fi
echo "done: metrics in $WORK/metrics.jsonl, checkpoints in $WORK/checkpoints"
if [ -n "$PICTURE" ]; then
  echo "picture of the run: $PICTURE"
fi
