"""TIES' and breadcrumbs' whole-tensor thresholds: exact k-th largest magnitudes found block by block, equal to
`torch.kthvalue`, without any whole task vector in memory (the fix for merges of LoRA fine-tunes, whose untouched
embedding has an all-zero task vector)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from merge_helpers import load_state
from safetensors.torch import save_file

from hf_interop import merge_checkpoints
from hf_interop.merge import breadcrumbs_thresholds, merge_state_dicts, merge_tensors, trim_threshold
from hf_interop.merge.methods import KthLargest
from hf_interop.merge.streaming import _SafetensorsCheckpoint


def _kth_largest_reference(values: torch.Tensor, rank: int) -> torch.Tensor:
    flat = values.reshape(-1)
    wide = flat.float() if flat.element_size() < 4 else flat
    return torch.kthvalue(wide, flat.numel() - rank + 1).values.to(values.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "zeros", "mostly_zero_with_ties"])
def test_kth_largest_fed_in_uneven_blocks_equals_kthvalue(dtype, kind):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(20_011, generator=generator, dtype=torch.float64)
    if kind == "zeros":
        values.zero_()
    elif kind == "mostly_zero_with_ties":
        values = (values * 3).round()  # few distinct values, positive and negative, and -0.0
        values[:15_000] = 0.0
    values = values.to(dtype)
    count = values.numel()
    ranks = [1, 2, 17, count // 3, count // 2, count - 1, count]
    selector = KthLargest(ranks, count, dtype)
    while not selector.done:
        for start, end in [(0, 1), (1, 5000), (5000, 5001), (5001, count)]:
            selector.update(values[start:end])
        selector.finish_pass()
    for rank, selected in zip(ranks, selector.values(), strict=True):
        assert selected.dtype == dtype and torch.equal(selected, _kth_largest_reference(values, rank)), rank


def test_whole_tensor_thresholds_equal_kthvalue_and_bad_ranks_are_refused():
    delta = torch.randn(300, 70, generator=torch.Generator().manual_seed(1))
    magnitudes = delta.abs()
    for density in (0.01, 0.5, 0.9, 1.0):
        expected = _kth_largest_reference(magnitudes, max(1, math.ceil(density * delta.numel())))
        assert torch.equal(trim_threshold(delta, density), expected)
        assert torch.equal(trim_threshold(magnitudes, density, magnitudes_given=True), expected)
    low, high = breadcrumbs_thresholds(delta, 0.8, 0.05)
    assert torch.equal(high, _kth_largest_reference(magnitudes, math.floor(0.05 * delta.numel())))
    assert torch.equal(low, _kth_largest_reference(magnitudes, math.floor(0.05 * delta.numel()) + 16_800))
    assert breadcrumbs_thresholds(delta, 0.8, 0.0)[1] == math.inf
    with pytest.raises(ValueError, match=r"ranks \[0\] are outside 1..21000"):
        KthLargest([0], delta.numel(), torch.float32)


@pytest.mark.parametrize(
    "method,options", [("ties", {"density": 0.3}), ("breadcrumbs", {"density": 0.6, "gamma": 0.05})]
)
def test_streamed_thresholds_read_one_block_at_a_time_and_equal_kthvalue_merges(
    merge_family, tmp_path, monkeypatch, method, options
):
    """A child whose embedding is the base's (a LoRA fine-tune leaves it untouched) made TIES copy the whole
    tensor several times; now every read is one block, and the merge equals the kthvalue-threshold merge."""
    base, children = merge_family["base"], list(merge_family["children"])
    untouched = tmp_path / "untouched_embedding"
    shutil.copytree(children[0], untouched)
    state = load_state(untouched)
    state["model.embed_tokens.weight"] = load_state(base)["model.embed_tokens.weight"].clone()
    save_file(state, str(untouched / "model.safetensors"), metadata={"format": "pt"})
    children[0] = untouched
    weights = [1.0, 0.7, 0.5]

    rows_read: dict[str, int] = {}
    original_reader = _SafetensorsCheckpoint.reader

    def recording_reader(self, name):
        read = original_reader(self, name)

        def recorded(start, end):
            rows_read[name] = max(rows_read.get(name, 0), end - start)
            return read(start, end)

        return recorded

    monkeypatch.setattr(_SafetensorsCheckpoint, "reader", recording_reader)
    monkeypatch.setattr("hf_interop.merge.streaming.CHUNK_ELEMENTS", 4096)
    out = merge_checkpoints(children, method, weights, base, output_dir=tmp_path / "m", show_progress=False, **options)
    embedding = "model.embed_tokens.weight"
    num_rows, row_length = load_state(base)[embedding].shape
    assert (
        num_rows > 4096 // row_length and rows_read[embedding] == 4096 // row_length
    )  # several blocks, read one by one

    merged, base_state = load_state(out), load_state(base)
    states = [load_state(child) for child in children]
    assert torch.equal(merged[embedding], merge_state_dicts(states, method, weights, base_state, **options)[embedding])
    deltas = [state[embedding] - base_state[embedding] for state in states]
    density = options["density"]
    if method == "ties":
        keep = math.ceil(density * deltas[0].numel())
        bounds = {"trim_thresholds": [_kth_largest_reference(delta.abs(), keep) for delta in deltas]}
    else:
        outliers = math.floor(options["gamma"] * deltas[0].numel())
        kept = outliers + math.ceil(density * deltas[0].numel())
        bounds = {
            "gamma": options["gamma"],
            "breadcrumbs_bounds": [
                (_kth_largest_reference(d.abs(), kept), _kth_largest_reference(d.abs(), outliers)) for d in deltas
            ],
        }
    reference = merge_tensors(
        method, [state[embedding] for state in states], weights, base_state[embedding], density=density, **bounds
    )
    assert torch.equal(merged[embedding], reference)
