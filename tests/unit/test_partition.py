"""Pipeline stage layout: which decoder layers each pipeline rank holds, and the errors for splits that
do not work (pure functions, no torch)."""

from __future__ import annotations

import itertools

import pytest

from megatron.config import ConfigError, ParallelConfig
from megatron.model.partition import (
    all_pipeline_layer_ranges,
    pipeline_layer_ranges,
    pipeline_layout,
    pipeline_stage_layer_counts,
)


def test_even_split():
    assert pipeline_layer_ranges(8, 1, 0) == [(0, 8)]
    assert all_pipeline_layer_ranges(8, 2) == [[(0, 4)], [(4, 8)]]
    assert all_pipeline_layer_ranges(8, 4) == [[(0, 2)], [(2, 4)], [(4, 6)], [(6, 8)]]
    assert all_pipeline_layer_ranges(4, 4) == [[(0, 1)], [(1, 2)], [(2, 3)], [(3, 4)]]


def test_uneven_split_fixes_the_first_and_last_stage():
    assert pipeline_stage_layer_counts(10, 4, 1) == [1, 3, 3, 3]
    assert pipeline_stage_layer_counts(10, 4, None, 1) == [3, 3, 3, 1]
    assert pipeline_stage_layer_counts(10, 4, 2, 2) == [2, 3, 3, 2]
    assert pipeline_stage_layer_counts(8, 2, 3) == [3, 5]
    assert pipeline_stage_layer_counts(8, 2, 3, 5) == [3, 5]
    assert all_pipeline_layer_ranges(10, 4, first_stage_layers=1) == [[(0, 1)], [(1, 4)], [(4, 7)], [(7, 10)]]
    assert pipeline_layer_ranges(10, 4, 3, first_stage_layers=2, last_stage_layers=2) == [(8, 10)]


def test_interleaved_order_is_megatrons():
    """Virtual stage c * pp + r is rank r's chunk c."""
    assert all_pipeline_layer_ranges(8, 2, layers_per_virtual_stage=2) == [
        [(0, 2), (4, 6)],
        [(2, 4), (6, 8)],
    ]
    assert all_pipeline_layer_ranges(8, 4, layers_per_virtual_stage=1) == [
        [(0, 1), (4, 5)],
        [(1, 2), (5, 6)],
        [(2, 3), (6, 7)],
        [(3, 4), (7, 8)],
    ]
    assert pipeline_layer_ranges(12, 2, 1, layers_per_virtual_stage=2) == [(2, 4), (6, 8), (10, 12)]
    assert pipeline_layer_ranges(8, 2, 0, layers_per_virtual_stage=4) == [(0, 4)]  # one chunk


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
def test_every_valid_layout_holds_each_layer_once_in_order(pp):
    """Over many layouts: every split that is accepted gives each layer to exactly one rank, each rank's
    chunks in increasing order, and (uneven) stages without a fixed count the same number of layers."""
    for num_layers in range(1, 25):
        firsts = [None] + list(range(1, num_layers + 1)) if pp > 1 else [None]
        virtuals = [None] + list(range(1, 5)) if pp > 1 else [None]
        layouts = [
            dict(first_stage_layers=f, last_stage_layers=la) for f, la in itertools.product(firsts, firsts)
        ]
        layouts += [dict(layers_per_virtual_stage=v) for v in virtuals if v is not None]
        for layout in layouts:
            try:
                ranges = all_pipeline_layer_ranges(num_layers, pp, **layout)  # asserts each layer once
            except ConfigError:
                continue
            for chunks in ranges:
                assert all(start < end for start, end in chunks)
                assert chunks == sorted(chunks)
            if "layers_per_virtual_stage" in layout:
                v = layout["layers_per_virtual_stage"]
                assert all(end - start == v for chunks in ranges for start, end in chunks)
                assert len({len(chunks) for chunks in ranges}) == 1
            else:
                counts = [end - start for [(start, end)] in ranges]
                middle = counts[
                    int(layout["first_stage_layers"] is not None) : pp
                    - int(layout["last_stage_layers"] is not None)
                ]
                assert len(set(middle)) <= 1
                assert layout["first_stage_layers"] in (None, counts[0])
                assert layout["last_stage_layers"] in (None, counts[-1])


def test_accepted_splits_match_the_rule():
    """An even split is accepted exactly when pp divides the layers."""
    for num_layers, pp in itertools.product(range(1, 17), range(1, 6)):
        accepted = True
        try:
            all_pipeline_layer_ranges(num_layers, pp)
        except ConfigError:
            accepted = False
        assert accepted == (num_layers % pp == 0), (num_layers, pp)


ERRORS = [
    # (args, keywords, words in the message)
    (
        (10, 4, 0),
        {},
        [
            "--num-layers 10",
            "--pipeline-model-parallel-size 4",
            "2.5",
            "such as 8 or 12",
            "first-pipeline-num-layers 1",
        ],
    ),
    ((3, 4, 0), {}, ["--num-layers 3", "--pipeline-model-parallel-size 4", "such as 4"]),
    (
        (10, 4, 0),
        dict(first_stage_layers=2),
        ["--decoder-first-pipeline-num-layers 2", "leaves 8 layers for the 3 other", "values here: 1, 4, 7"],
    ),
    (
        (10, 4, 0),
        dict(last_stage_layers=2),
        ["--decoder-last-pipeline-num-layers 2", "valid --decoder-last-pipeline-num-layers values"],
    ),
    ((8, 2, 0), dict(first_stage_layers=8), ["leaves 0 layers", "at least 1"]),
    ((8, 2, 0), dict(first_stage_layers=3, last_stage_layers=3), ["3 + ", "= 6 layers", "add up to 8"]),
    ((8, 2, 0), dict(first_stage_layers=0), ["--decoder-first-pipeline-num-layers 0 must be >= 1"]),
    ((8, 1, 0), dict(last_stage_layers=8), ["need --pipeline-model-parallel-size >= 2, got 1"]),
    (
        (8, 2, 0),
        dict(first_stage_layers=2, layers_per_virtual_stage=2),
        ["cannot be combined with --num-layers-per-virtual-pipeline-stage 2"],
    ),
    (
        (8, 2, 0),
        dict(layers_per_virtual_stage=3),
        [
            "--num-layers 8 is not divisible by",
            "x --num-layers-per-virtual-pipeline-stage 3 = 6",
            ": 1, 2, 4",
        ],
    ),
    ((8, 1, 0), dict(layers_per_virtual_stage=2), ["needs --pipeline-model-parallel-size >= 2, got 1"]),
    ((8, 2, 2), {}, ["pipeline rank 2 is not in [0, --pipeline-model-parallel-size 2)"]),
]


@pytest.mark.parametrize("args, keywords, words", ERRORS)
def test_splits_that_do_not_work_name_the_flags_and_numbers(args, keywords, words):
    with pytest.raises(ValueError) as info:  # ConfigError is a ValueError
        pipeline_layer_ranges(*args, **keywords)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_layout_from_the_parallel_config():
    config = ParallelConfig(pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=1)
    assert (
        pipeline_layout(config)
        == config.pipeline_layout
        == dict(first_stage_layers=1, last_stage_layers=None, layers_per_virtual_stage=None)
    )
    assert pipeline_layout(None) == dict(
        first_stage_layers=None, last_stage_layers=None, layers_per_virtual_stage=None
    )
