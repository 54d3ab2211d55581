"""Breadcrumbs, DELLA and Model Stock: naive float64 references, their properties, streamed == in-memory ==
whole-tensor, seeding, and the bad inputs refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest
import torch
from merge_helpers import load_state

from hf_interop import merge_checkpoints
from hf_interop.merge import (
    breadcrumbs_mask,
    della_keep_probabilities,
    della_prune,
    merge_state_dicts,
    merge_tensors,
    model_stock,
    seeded_uniforms,
)

# ---------------------------------------------------------------------------------------------------------------
# Naive float64 references, written from the papers independently of hf_interop.merge
# ---------------------------------------------------------------------------------------------------------------


def _reference_breadcrumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    flat = delta.flatten()
    order = torch.argsort(flat.abs(), descending=True).tolist()
    num_outliers = math.floor(gamma * flat.numel())
    num_kept = math.ceil(density * flat.numel())
    kept = torch.zeros_like(flat)
    for index in order[num_outliers : num_outliers + num_kept]:
        kept[index] = flat[index]
    return kept.view_as(delta)


def _reference_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    probabilities = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        magnitudes = rows[r].abs().tolist()
        for c, value in enumerate(magnitudes):
            rank = sum(1 for other in magnitudes if other < value)  # 0 for the smallest
            probabilities[r, c] = density - epsilon + 2 * epsilon * rank / (len(magnitudes) - 1)
    return probabilities.reshape(delta.shape)


def _reference_disjoint_mean(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    sign = torch.sign(sum(w * d for w, d in zip(weights, deltas, strict=True)))
    numerator = sum(torch.where(d * sign > 0, w * d, 0.0) for w, d in zip(weights, deltas, strict=True))
    denominator = sum(torch.where(d * sign > 0, w, 0.0) for w, d in zip(weights, deltas, strict=True))
    return torch.nan_to_num(numerator / denominator, nan=0.0)


def _reference_model_stock(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    deltas = [(t - base).flatten() for t in tensors]
    cosines = [
        float(deltas[i] @ deltas[j] / (deltas[i].norm() * deltas[j].norm()))
        for i in range(len(deltas))
        for j in range(i + 1, len(deltas))
    ]
    cosine = sum(cosines) / len(cosines)
    n = len(tensors)
    t = n * cosine / (1 + (n - 1) * cosine)
    return t * sum(tensors) / n + (1 - t) * base


def _random_family(shape, count=3, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=dtype)
    return base, [base + 0.1 * torch.randn(shape, generator=generator, dtype=dtype) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,density,gamma", [((7, 13), 0.3, 0.05), ((50,), 0.5, 0.0), ((4, 3, 5), 0.9, 0.1)])
def test_breadcrumbs_matches_float64_reference(shape, density, gamma):
    base, tensors = _random_family(shape)
    weights = [0.7, 1.3, 0.4]
    merged = merge_tensors("breadcrumbs", tensors, weights, base=base, density=density, gamma=gamma)
    reference = base + sum(
        w * _reference_breadcrumbs(t - base, density, gamma) for w, t in zip(weights, tensors, strict=True)
    )
    torch.testing.assert_close(merged, reference, rtol=0, atol=1e-12)
    # density 1 with no outliers removed is plain task arithmetic
    task_arithmetic = merge_tensors("task_arithmetic", tensors, weights, base=base)
    everything = merge_tensors("breadcrumbs", tensors, weights, base=base, density=1.0, gamma=0.0)
    torch.testing.assert_close(everything, task_arithmetic, rtol=0, atol=1e-12)
    # the largest-magnitude entries of each task vector are the ones removed
    delta = tensors[0] - base
    kept = breadcrumbs_mask(delta, density, gamma)
    num_outliers = math.floor(gamma * delta.numel())
    if num_outliers:
        largest = delta.abs().flatten().topk(num_outliers).indices
        assert torch.all(kept.flatten()[largest] == 0)
    assert int((kept != 0).sum()) == math.ceil(density * delta.numel())


def test_della_keep_probabilities_and_prune_match_reference_and_are_unbiased():
    base, tensors = _random_family((6, 11))
    delta = tensors[0] - base
    probabilities = della_keep_probabilities(delta, 0.4, 0.2)
    torch.testing.assert_close(probabilities, _reference_keep_probabilities(delta, 0.4, 0.2), rtol=0, atol=1e-12)
    assert float(probabilities.min()) == pytest.approx(0.2) and float(probabilities.max()) == pytest.approx(0.6)
    # in each row the largest magnitude gets the highest keep probability
    assert torch.equal(probabilities.argmax(dim=1), delta.abs().argmax(dim=1))
    uniforms = seeded_uniforms(delta.shape, 0, "w", 0)
    pruned = della_prune(delta, 0.4, 0.2, uniforms)
    expected = torch.where(uniforms < probabilities, delta / probabilities, 0.0)
    torch.testing.assert_close(pruned, expected, rtol=0, atol=0)
    # rescaling by 1 / keep probability makes the pruned task vector unbiased (DELLA's Rescale step)
    average = sum(della_prune(delta, 0.4, 0.2, seeded_uniforms(delta.shape, s, "w", 0)) for s in range(4000)) / 4000
    assert float((average - delta).abs().max()) < 0.1 * float(delta.abs().max())
    # a 1-D tensor is one row
    vector = delta[0]
    torch.testing.assert_close(
        della_keep_probabilities(vector, 0.5, 0.1), _reference_keep_probabilities(vector, 0.5, 0.1), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_merge_matches_float64_reference(method):
    base, tensors = _random_family((5, 9))
    weights = [1.0, 0.5, 2.0]
    uniforms = [seeded_uniforms(base.shape, 3, "w", index) for index in range(3)]
    merged = merge_tensors(method, tensors, weights, base=base, density=0.5, epsilon=0.1, della_uniforms=uniforms)
    pruned = []
    for u, t in zip(uniforms, tensors, strict=True):
        probabilities = _reference_keep_probabilities(t - base, 0.5, 0.1)
        pruned.append(torch.where(u < probabilities, (t - base) / probabilities, 0.0))
    if method == "della":
        reference = base + _reference_disjoint_mean(pruned, weights)
    else:
        reference = base + sum(w * p for w, p in zip(weights, pruned, strict=True))
    torch.testing.assert_close(merged, reference, rtol=0, atol=1e-12)


def test_model_stock_matches_reference_and_its_limits():
    base, tensors = _random_family((8, 10), count=3)
    torch.testing.assert_close(model_stock(tensors, base), _reference_model_stock(tensors, base), rtol=0, atol=1e-12)
    # fine-tunes that moved the same way (cos = 1): t = 1, the average of the fine-tunes
    delta = tensors[0] - base
    same = [base + delta, base + delta]
    torch.testing.assert_close(model_stock(same, base), base + delta, rtol=0, atol=1e-12)
    # two orthogonal task vectors (cos = 0): t = 0, the base
    first = torch.zeros(2, 2, dtype=torch.float64)
    first[0, 0] = 1.0
    second = torch.zeros(2, 2, dtype=torch.float64)
    second[1, 1] = 1.0
    torch.testing.assert_close(model_stock([base[:2, :2] + first, base[:2, :2] + second], base[:2, :2]), base[:2, :2])
    with pytest.raises(ValueError, match="at least 2"):
        model_stock(tensors[:1], base)


def test_seeded_uniforms_are_the_same_for_any_row_range():
    shape = (9, 20000)  # 3 rows per seeded group
    whole = seeded_uniforms(shape, 5, "w", 1)
    assert whole.shape == shape
    pieces = torch.cat([seeded_uniforms(shape, 5, "w", 1, start, min(9, start + 2)) for start in range(0, 9, 2)])
    assert torch.equal(whole, pieces)
    assert not torch.equal(whole, seeded_uniforms(shape, 6, "w", 1))
    assert not torch.equal(whole, seeded_uniforms(shape, 5, "w", 2))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: streamed == in-memory == whole tensors; seeded; recorded
# ---------------------------------------------------------------------------------------------------------------

NEW_METHOD_CASES = [
    ("breadcrumbs", dict(density=0.4, gamma=0.05), [0.6, 0.3, 0.8]),
    ("della", dict(density=0.5, epsilon=0.2), [1.0, 1.0, 1.0]),
    ("della_linear", dict(density=0.6, epsilon=0.1), [0.5, 0.5, 0.5]),
    ("model_stock", {}, None),
]


@pytest.mark.parametrize("method,options,weights", NEW_METHOD_CASES, ids=[case[0] for case in NEW_METHOD_CASES])
def test_new_methods_streamed_in_blocks_equal_whole_tensor_merges(
    merge_family, tmp_path, monkeypatch, method, options, weights
):
    children, base = merge_family["children"], merge_family["base"]
    states = [load_state(child) for child in children]
    base_state = load_state(base)
    whole = {
        name: merge_tensors(
            method,
            [state[name] for state in states],
            weights or [1.0] * 3,
            base=base_state[name],
            della_uniforms=[seeded_uniforms(base_state[name].shape, 4, name, index) for index in range(3)],
            **options,
        )
        for name in base_state
    }
    monkeypatch.setattr("hf_interop.merge.streaming.CHUNK_ELEMENTS", 4096)  # the 512x64 embedding in 8 blocks
    out = merge_checkpoints(
        children, method, weights, base, seed=4, output_dir=tmp_path / "m", show_progress=False, **options
    )
    streamed = load_state(out)
    in_memory = merge_state_dicts(states, method, weights, base_state, seed=4, **options)
    for name in whole:
        assert streamed[name].dtype == states[0][name].dtype
        if method == "model_stock":  # the angle is summed block by block: equal up to float rounding
            torch.testing.assert_close(streamed[name], whole[name], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(streamed[name], whole[name]), name
        assert torch.equal(streamed[name], in_memory[name]), name
    lineage = json.loads((out / "hf_interop_lineage.json").read_text())
    assert lineage["extra"]["method"] == method
    for key, value in options.items():
        assert lineage["extra"][key] == value
    assert method in (out / "README.md").read_text()


def test_della_is_seeded(merge_family, tmp_path):
    children, base = merge_family["children"], merge_family["base"]
    runs = [
        load_state(
            merge_checkpoints(
                children, "della", base=base, seed=seed, output_dir=tmp_path / str(i), show_progress=False
            )
        )
        for i, seed in enumerate((1, 1, 2))
    ]
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(runs[0][name], runs[1][name])
    assert not torch.equal(runs[0][name], runs[2][name])


@pytest.mark.parametrize(
    "method,kwargs,message",
    [
        ("breadcrumbs", dict(density=0.0), r"density=0\.0 must be in \(0, 1\]"),
        ("della", dict(density=1.5), r"density=1\.5 must be in \(0, 1\]"),
        ("della_linear", dict(density=-0.2), r"density=-0\.2 must be in \(0, 1\]"),
        ("breadcrumbs", dict(density=0.5, gamma=0.6), r"density=0\.5 \+ gamma=0\.6 exceeds 1"),
        ("breadcrumbs", dict(gamma=1.0), r"gamma=1\.0 must be in \[0, 1\)"),
        ("della", dict(density=0.2, epsilon=0.3), r"density=0\.2 and epsilon=0\.3"),
        ("della", dict(weights=[1.0, -1.0, 1.0]), "must be positive"),
        ("model_stock", dict(weights=[1.0, 1.0, 1.0]), "takes no weights"),
        ("model_stock", dict(children=1), "at least 2 fine-tuned checkpoints"),
        ("model_stock", dict(base=None), "needs base="),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(merge_family, tmp_path, method, kwargs, message):
    kwargs = dict(kwargs)
    children = merge_family["children"][: kwargs.pop("children", 3)]
    base = kwargs.pop("base", merge_family["base"])
    with pytest.raises(ValueError, match=message):
        merge_checkpoints(children, method, base=base, output_dir=tmp_path / "out", show_progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_first_mismatching_tensor(merge_family, tiny_model_dirs, tmp_path):
    from helpers import build_tiny_causal_lm

    other = build_tiny_causal_lm("llama", 512, intermediate_size=96)
    other.save_pretrained(tmp_path / "wider")
    children = [*merge_family["children"][:2], tmp_path / "wider"]
    for method in ("model_stock", "della", "breadcrumbs"):
        with pytest.raises(
            ValueError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 96\]"
        ):
            merge_checkpoints(
                children, method, base=merge_family["base"], output_dir=tmp_path / "out", show_progress=False
            )
        assert not (tmp_path / "out").exists()
