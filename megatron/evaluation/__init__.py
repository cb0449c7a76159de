"""Code evaluation of a checkpoint: HumanEval and FIM infilling tasks, sandboxed execution, pass@k.

Generation goes through `megatron.inference`; `tools/evaluate.py` is the command line. See docs/evaluation.md.
"""
