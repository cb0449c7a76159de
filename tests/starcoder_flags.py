"""The Megatron-style flag set of BigCode's published StarCoderBase training run, verbatim, with the
placeholders PATH, DIR, NAME, FILE for its paths and names: the config tests parse it, the
examples test runs it at tiny shapes and checks the 15B recipe repeats it."""

STARCODER_FLAGS = """
--tensor-model-parallel-size 4 --pipeline-model-parallel-size 4 --sequence-parallel
--num-layers 40 --hidden-size 6144 --num-attention-heads 48 --attention-head-type multiquery
--init-method-std 0.01275 --seq-length 8192 --max-position-embeddings 8192
--attention-dropout 0.1 --hidden-dropout 0.1
--micro-batch-size 1 --global-batch-size 512
--lr 0.0003 --min-lr 0.00003 --train-iters 250000 --lr-decay-iters 250000
--lr-decay-style cosine --lr-warmup-iters 2000
--weight-decay .1 --adam-beta2 .95 --clip-grad 1.0
--bf16 --use-flash-attn --fim-rate 0.5
--log-interval 10 --save-interval 2500 --eval-interval 2500 --eval-iters 2
--use-distributed-optimizer
--tokenizer-type TokenizerFromFile --tokenizer-file PATH
--save DIR --load DIR --tensorboard-dir DIR
--wandb-entity-name NAME --wandb-project-name NAME
--train-weighted-split-paths-path FILE --valid-weighted-split-paths-path FILE
"""
