"""Which decoder layers each pipeline stage holds: pure functions of the layer count and the layout.

    pipeline_layer_ranges(num_layers, pp_size, pp_rank, *, first_stage_layers=None,
                          last_stage_layers=None, layers_per_virtual_stage=None) -> [(start, end), ...]

Even split by default; --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers fix the
first / last stage's count and the other stages split the rest evenly; with
--num-layers-per-virtual-pipeline-stage v each rank holds several chunks, virtual stage `c * pp + r` being
rank r's chunk c (Megatron's interleaved order):

    num_layers 8, pp 2, v 2:  rank 0 -> [(0, 2), (4, 6)],  rank 1 -> [(2, 4), (6, 8)]

A split that does not work raises a ValueError (`ConfigError`) naming the flags and the numbers; no
layer is ever dropped. The functions live in `megatron.config.parallel` (config validation runs them for
every rank and must not import torch, which importing `megatron.model` does) and are the same objects
here.
"""

from __future__ import annotations

from megatron.config.parallel import (
    all_pipeline_layer_ranges,
    pipeline_layer_ranges,
    pipeline_stage_layer_counts,
)

__all__ = [
    "all_pipeline_layer_ranges",
    "pipeline_layer_ranges",
    "pipeline_layout",
    "pipeline_stage_layer_counts",
]


def pipeline_layout(parallel_config=None) -> dict[str, int | None]:
    """The layout keywords of `pipeline_layer_ranges` read from a `ParallelConfig` (or any object with
    its three attribute names; None: an even split without interleaving)."""
    return {
        "first_stage_layers": getattr(parallel_config, "decoder_first_pipeline_num_layers", None),
        "last_stage_layers": getattr(parallel_config, "decoder_last_pipeline_num_layers", None),
        "layers_per_virtual_stage": getattr(parallel_config, "num_layers_per_virtual_pipeline_stage", None),
    }
