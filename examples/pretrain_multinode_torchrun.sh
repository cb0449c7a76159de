#!/usr/bin/env bash
# Multi-node pretraining with torchrun and its c10d rendezvous, no scheduler: run this script once on
# every node (same environment everywhere except NODE_RANK). torchrun starts NPROC_PER_NODE ranks per
# node; the nodes find each other through a TCP store on MASTER_ADDR:MASTER_PORT.
#
# Needs: the package's requirements on every node, the same repository path (or MEGATRON_ROOT), the data
# and the tokenizer readable at the same paths on every node (shared filesystem), and MASTER_ADDR:MASTER_PORT
# (node 0's address) reachable from every node. GPUs use NCCL; on CPUs the ranks use gloo.
#
# Environment (defaults in brackets):
#   NNODES [2]            number of nodes (torchrun invocations)
#   NODE_RANK [0]         0 on the node whose address is MASTER_ADDR, 1..NNODES-1 elsewhere
#   NPROC_PER_NODE [2]    ranks per node (GPUs per node; 8 on a DGX)
#   MASTER_ADDR [127.0.0.1]  address of node 0, which hosts the rendezvous store
#   MASTER_PORT [29500]   TCP port of the rendezvous store (free on node 0)
#   RDZV_ID [megatron-$MASTER_PORT]  rendezvous id, the same on every node of one job, new per job
#   RDZV_JOIN_TIMEOUT [600]  seconds to wait for all NNODES nodes to join before giving up
#   RDZV_READ_TIMEOUT [60]   seconds per attempt to reach the store: a node that cannot reach MASTER_ADDR
#                            gives up after one attempt and one retry after a random delay, 1-2 x this
#                            (measured with start-up: 5 -> 12 s, 10 -> 25 s, 60 -> 88-113 s)
#   CONFIG [tiny-cpu]     preset from configs/ (tiny-cpu, starcoderbase-1b, starcoderbase-15b) or a YAML path
#   TP, PP [the config's] tensor / pipeline parallel sizes; data parallel = NNODES x NPROC_PER_NODE / (TP x PP)
#   DATA_PATH [$ROOT/quickstart/data/stdlib_content_document]  dataset prefix; set DATA_PATH= (empty) and
#                         pass --train-weighted-split-paths-path FILE ... as arguments for a weighted blend
#   TOKENIZER_FILE [$ROOT/quickstart/tokenizer.json]  tokenizers JSON file
#   PYTHON [python]       interpreter with the requirements installed
#   TORCHRUN_ARGS []      extra torchrun flags (e.g. --max-restarts 3, --redirects 3 --log-dir DIR)
#   MEGATRON_ROOT [this script's repository]
# Arguments are appended to the megatron.pretrain command line (the last of a repeated flag wins).
#
# Try it on one machine with two shells (CPU, the tiny preset; run examples/quickstart_cpu.sh once first
# for the data and the tokenizer; TP 2 x DP 2 over 2 "nodes" x 2 ranks):
#   shell 1:  TP=2 NODE_RANK=0 bash examples/pretrain_multinode_torchrun.sh --train-iters 20
#   shell 2:  TP=2 NODE_RANK=1 bash examples/pretrain_multinode_torchrun.sh --train-iters 20
# StarCoderBase-1B on 2 nodes x 8 GPUs (data parallel 16), node 0 is 10.0.0.1:
#   CONFIG=starcoderbase-1b NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 NODE_RANK=<0|1> \
#     DATA_PATH=/data/python_content_document TOKENIZER_FILE=/data/tokenizer.json \
#     bash examples/pretrain_multinode_torchrun.sh --save /ckpt/sc1b --load /ckpt/sc1b
# StarCoderBase-15B, BigCode's run (64 nodes x 8 GPUs; TP 4 x PP 4 from the config,
# data parallel 32); prefer examples/pretrain_starcoderbase_15b.slurm under SLURM:
#   CONFIG=starcoderbase-15b NNODES=64 NPROC_PER_NODE=8 MASTER_ADDR=node000 NODE_RANK=<0..63> DATA_PATH= \
#     TOKENIZER_FILE=/data/tokenizer.json bash examples/pretrain_multinode_torchrun.sh \
#     --train-weighted-split-paths-path /data/train.txt --valid-weighted-split-paths-path /data/valid.txt \
#     --save /ckpt/sc15b --load /ckpt/sc15b
# Check the memory and time plan of a shape first, on any machine (no GPU, no data):
#   python -m megatron.pretrain --config starcoderbase-15b --data-parallel-size 32 --dry-run
#
# Rendezvous notes (torchrun's c10d backend):
# - torchrun ignores --node-rank under c10d (it only logs a warning): node ranks, and so which global ranks
#   a node gets, are assigned when the nodes meet (sorted by address and process id). NODE_RANK is used
#   here to say which invocation hosts the rendezvous store (is_host=true on node 0, false elsewhere):
#   left to itself torchrun lets every invocation whose own address is MASTER_ADDR try to host it, which
#   with several "nodes" on one machine (MASTER_ADDR=127.0.0.1) makes the host whichever bound the port
#   first. With is_host set, node 0 fails at once if the port is taken, and the others wait for node 0
#   (at least RDZV_READ_TIMEOUT) whatever order the nodes start in.
# - A node that cannot reach MASTER_ADDR:MASTER_PORT fails with RendezvousConnectionError after 1-2 x
#   RDZV_READ_TIMEOUT (RDZV_JOIN_TIMEOUT does not apply: it starts once the store is reached); a store that
#   is up but never sees all NNODES nodes fails every waiting node with RendezvousTimeoutError after
#   RDZV_JOIN_TIMEOUT. Both exit non-zero; nothing hangs. Once training runs, a lost rank is caught by
#   the collectives' --distributed-timeout-minutes.
# - At the end each torchrun waits (up to 300 s, fixed in torchrun) in an exit barrier for the other nodes;
#   a node whose agent died leaves the others there that long before they exit.
# - Change RDZV_ID for every new job: a rendezvous id reused while an old store is alive joins the old run.
set -euo pipefail

ROOT="${MEGATRON_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$ROOT"

NNODES="${NNODES:-2}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-megatron-$MASTER_PORT}"
RDZV_JOIN_TIMEOUT="${RDZV_JOIN_TIMEOUT:-600}"
RDZV_READ_TIMEOUT="${RDZV_READ_TIMEOUT:-60}"
CONFIG="${CONFIG:-tiny-cpu}"
TP="${TP:-}"
PP="${PP:-}"
DATA_PATH="${DATA_PATH-$ROOT/quickstart/data/stdlib_content_document}"
TOKENIZER_FILE="${TOKENIZER_FILE:-$ROOT/quickstart/tokenizer.json}"
PYTHON="${PYTHON:-python}"

if [ "$NODE_RANK" = 0 ]; then IS_HOST=true; else IS_HOST=false; fi

LAUNCHER=(
  "$PYTHON" -m torch.distributed.run
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
  --rdzv-conf "is_host=$IS_HOST,join_timeout=$RDZV_JOIN_TIMEOUT,read_timeout=$RDZV_READ_TIMEOUT"
  --max-restarts 0
)
# shellcheck disable=SC2206  # TORCHRUN_ARGS is a list of words on purpose
LAUNCHER+=(${TORCHRUN_ARGS:-})

ARGS=(--config "$CONFIG" --tokenizer-type TokenizerFromFile --tokenizer-file "$TOKENIZER_FILE")
if [ -n "$DATA_PATH" ]; then ARGS+=(--data-path "$DATA_PATH"); fi
if [ -n "$TP" ]; then ARGS+=(--tensor-model-parallel-size "$TP"); fi
if [ -n "$PP" ]; then ARGS+=(--pipeline-model-parallel-size "$PP"); fi

echo "node $NODE_RANK of $NNODES: $NPROC_PER_NODE ranks, rendezvous $RDZV_ID at $MASTER_ADDR:$MASTER_PORT" \
  "(store host: $IS_HOST), config $CONFIG" >&2
exec "${LAUNCHER[@]}" -m megatron.pretrain "${ARGS[@]}" "$@"
