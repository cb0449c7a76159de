"""The distributed optimizer's fragments as chunks of logical tensors (megatron/checkpoint/fragments.py):
the flat-range-to-boxes cut, the tensor-parallel block offsets, and DCP save/load of such chunks in one
process (any saved cut read back under any other, bytes counted). The multi-rank checkpoints built on
them are tested in tests/distributed/test_checkpoint.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron.checkpoint.dcp_io import dcp_load, dcp_save
from megatron.checkpoint.fragments import (
    CHECKPOINT_BYTES,
    LogicalChunks,
    block_offsets,
    flat_range_boxes,
    fragment_chunks,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.mark.parametrize("shape", [(7,), (3, 5), (1, 6), (6, 1), (4, 3, 2)])
def test_every_flat_range_is_its_boxes_in_order(shape):
    numel = math.prod(shape)
    index = torch.arange(numel).view(shape)
    for start in range(numel + 1):
        for stop in range(start, numel + 1):
            boxes = flat_range_boxes(start, stop, shape)
            assert len(boxes) <= 2 * (len(shape) - 1) + 1
            covered = []
            for flat, offsets, sizes in boxes:
                region = index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
                assert region.reshape(-1).tolist() == list(range(flat, flat + math.prod(sizes)))
                covered += region.reshape(-1).tolist()
            assert covered == list(range(start, stop)), boxes


def test_a_matrix_range_is_a_partial_row_full_rows_and_a_partial_row():
    assert flat_range_boxes(3, 17, (4, 5)) == [(3, (0, 3), (1, 2)), (5, (1, 0), (2, 5)), (15, (3, 0), (1, 2))]
    assert flat_range_boxes(5, 15, (4, 5)) == [(5, (1, 0), (2, 5))]


def _param(shape, *, full_shape=None, partition_dim=None):
    param = torch.nn.Parameter(torch.zeros(shape))
    if partition_dim is not None:
        param.tensor_model_parallel, param.partition_dim, param.full_shape = True, partition_dim, full_shape
    return param


def test_block_offsets_follow_the_split_dimension():
    assert block_offsets(_param((4, 6), full_shape=(8, 6), partition_dim=0), 1) == (4, 0)
    assert block_offsets(_param((4, 3), full_shape=(4, 12), partition_dim=1), 3) == (0, 9)
    assert block_offsets(_param((5,)), 2) == (0,)  # replicated over TP: the whole tensor


def _save(tmp_path, name, chunks: LogicalChunks):
    directory = tmp_path / name
    directory.mkdir()
    dcp_save({"optimizer/exp_avg/w": chunks}, directory, None)
    return directory


def test_fragments_saved_under_one_cut_load_exactly_under_another(tmp_path):
    """A 6 x 4 parameter split over TP 2 along dim 1: both TP blocks saved as 3 fragments each (two DP
    cuts), read back as plain full tensors, as the other cut's fragments, and as one TP block."""
    full = torch.arange(24, dtype=torch.float32).view(6, 4)
    blocks = [full[:, :2].contiguous(), full[:, 2:].contiguous()]
    param = _param((6, 2), full_shape=(6, 4), partition_dim=1)

    def chunks(cut, targets=None):
        out = LogicalChunks((6, 4), torch.float32)
        for tp, block in enumerate(blocks):
            pieces = [(lo, block.view(-1)[lo:hi].clone()) for lo, hi in zip(cut, cut[1:], strict=False)]
            if targets is not None:
                pieces = [
                    (lo, targets.setdefault((tp, lo), torch.zeros(values.numel()))) for lo, values in pieces
                ]
            out.boxes += fragment_chunks(param, tp, pieces).boxes
        return out

    directory = _save(tmp_path, "cut", chunks([0, 3, 8, 12]))
    whole = torch.empty(6, 4)
    dcp_load({"optimizer/exp_avg/w": whole}, directory, None)
    assert torch.equal(whole, full)
    targets = {}
    CHECKPOINT_BYTES.reset()
    dcp_load({"optimizer/exp_avg/w": chunks([0, 5, 12], targets)}, directory, None)
    for (tp, lo), values in targets.items():
        assert torch.equal(values, blocks[tp].view(-1)[lo : lo + values.numel()])
    assert (
        CHECKPOINT_BYTES.read["optimizer"] >= 24 * 4
    )  # every wanted element, from the saved chunks it is in
    CHECKPOINT_BYTES.reset()
    same = {}
    dcp_load({"optimizer/exp_avg/w": chunks([0, 3, 8, 12], same)}, directory, None)
    assert CHECKPOINT_BYTES.read == {"optimizer": 24 * 4}  # the same cut: exactly the saved bytes
    assert all(torch.equal(v, blocks[tp].view(-1)[lo : lo + v.numel()]) for (tp, lo), v in same.items())


def _global_plan(cuts):
    """DCP's global save plan for one 2 x 3 parameter whose fragments on each (simulated) rank are `cuts`."""
    from megatron.checkpoint.fragments import chunk_save_planner

    param = _param((2, 3))
    plans = []
    for lo, hi in cuts:
        planner = chunk_save_planner()
        planner.set_up_planner(
            {"optimizer/exp_avg/w": fragment_chunks(param, 0, [(lo, torch.ones(hi - lo))])}
        )
        plans.append(planner.create_local_plan())
    return chunk_save_planner().create_global_plan(plans)


def test_fragments_must_tile_each_tensor_at_save():
    """DCP checks at every save that the ranks' chunks of a tensor tile it: [0, 4) and [4, 6) do; [0, 4)
    and [1, 3) cover as many elements but overlap."""
    _, metadata = _global_plan([(0, 4), (4, 6)])
    assert len(metadata.state_dict_metadata["optimizer/exp_avg/w"].chunks) == 3
    with pytest.raises(ValueError, match="validate global plan"):
        _global_plan([(0, 4), (1, 3)])
