"""Weight-space merges: each method against a naive float64 reference, streamed == in-memory, bad inputs, and
greedy soup. LoRA adapter combinations are in test_merge_lora.py."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import build_tiny_causal_lm
from merge_helpers import perturbed_copy
from safetensors.torch import load_file

from hf_interop import greedy_soup, load_causal_lm, merge_checkpoints
from hf_interop.merge import MERGE_METHODS, dare_keep_mask, merge_state_dicts, merge_tensors, slerp


@pytest.fixture(scope="module")
def family_checkpoints(tiny_model_dirs, tmp_path_factory):
    """A base (tiny Llama) and three 'fine-tuned' descendants (base + seeded noise), saved with the tokenizer."""
    root = tmp_path_factory.mktemp("merge_inputs")
    base = tiny_model_dirs["llama"]
    children = [perturbed_copy(base, root / f"child{seed}", seed=seed, scale=0.02) for seed in (1, 2, 3)]
    return {"base": base, "children": children, "root": root}


def _state(folder) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


# ---------------------------------------------------------------------------------------------------------------
# Naive float64 references, written independently of hf_interop.merge
# ---------------------------------------------------------------------------------------------------------------


def _reference_ties_like(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    weighted_sum = sum(w * d for w, d in zip(weights, deltas, strict=True))
    sign = torch.sign(weighted_sum)
    numerator = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        agree = (d * sign) > 0
        numerator += torch.where(agree, w * d, 0.0)
        denominator += torch.where(agree, w, 0.0)
    return torch.nan_to_num(numerator / denominator, nan=0.0)


def _reference_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    flat = delta.flatten()
    keep = math.ceil(density * flat.numel())
    order = torch.argsort(flat.abs(), descending=True)
    kept = torch.zeros_like(flat)
    kept[order[:keep]] = flat[order[:keep]]
    return kept.view_as(delta)


def _reference_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_flat, b_flat = a.flatten(), b.flatten()
    cosine = float(a_flat @ b_flat / (a_flat.norm() * b_flat.norm()))
    if abs(cosine) > 0.9995:
        return (1 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, cosine)))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def _reference(method, states, base_state, weights, density, seed, slerp_t):
    merged = {}
    for name in states[0]:
        xs = [state[name].double() for state in states]
        if method == "linear":
            merged[name] = sum(w * x for w, x in zip(weights, xs, strict=True)) / sum(weights)
            continue
        if method == "slerp":
            merged[name] = _reference_slerp(slerp_t, xs[0], xs[1])
            continue
        base = base_state[name].double()
        deltas = [x - base for x in xs]
        if method.startswith("dare"):
            masks = [dare_keep_mask(x.shape, density, seed, name, i).double() for i, x in enumerate(xs)]
            deltas = [d * m / density for d, m in zip(deltas, masks, strict=True)]
        if method in ("task_arithmetic", "dare_linear"):
            merged[name] = base + sum(w * d for w, d in zip(weights, deltas, strict=True))
        else:
            if method == "ties":
                deltas = [_reference_trim(d, density) for d in deltas]
            merged[name] = base + _reference_ties_like(deltas, weights)
    return merged


# ---------------------------------------------------------------------------------------------------------------
# The math on small tensors
# ---------------------------------------------------------------------------------------------------------------


def test_ties_on_a_hand_worked_example():
    base = torch.zeros(4, dtype=torch.float64)
    first = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    second = torch.tensor([1.0, 2.0, -4.0, -1.5], dtype=torch.float64)
    # density 0.5 keeps 2 of 4 entries: first -> [3, 0, 0, 2], second -> [0, 2, -4, 0]
    # elected signs of the sums [3, 2, -4, 2]: all entries have exactly one agreeing model
    merged = merge_tensors("ties", [first, second], [1.0, 1.0], base=base, density=0.5)
    assert merged.tolist() == [3.0, 2.0, -4.0, 2.0]
    # density 1: sums [4, 1, -3.5, 0.5]; entry 0 averages 3 and 1, the others keep their one agreeing value
    merged = merge_tensors("ties", [first, second], [1.0, 1.0], base=base, density=1.0)
    assert merged.tolist() == [2.0, 2.0, -4.0, 2.0]
    # weights enter the mean: entry 0 is (3 * 3 + 1 * 1) / (3 + 1)
    merged = merge_tensors("ties", [first, second], [3.0, 1.0], base=base, density=1.0)
    assert merged.tolist()[0] == 2.5
    task = merge_tensors("task_arithmetic", [first, second], [0.5, 1.0], base=base)
    assert task.tolist() == [2.5, 1.5, -3.75, -0.5]


def test_merge_properties():
    generator = torch.Generator().manual_seed(0)
    a, b, base = (torch.randn(50, 20, generator=generator, dtype=torch.float64) for _ in range(3))
    assert torch.allclose(merge_tensors("linear", [a, a, a], [0.2, 0.3, 0.5]), a)
    assert torch.allclose(merge_tensors("task_arithmetic", [a], [1.0], base=base), a)
    assert torch.allclose(merge_tensors("ties", [a], [1.0], base=base, density=1.0), a)
    assert torch.equal(slerp(0.0, a, b), a) and torch.allclose(slerp(1.0, a, b), b)
    unit_a, unit_b = a / a.norm(), b / b.norm()
    assert torch.isclose(slerp(0.3, unit_a, unit_b).norm(), torch.tensor(1.0, dtype=torch.float64))
    mask = dare_keep_mask((1000, 100), 0.3, seed=0, tensor_name="w", model_index=0)
    assert abs(mask.double().mean().item() - 0.3) < 0.01
    assert torch.equal(mask, dare_keep_mask((1000, 100), 0.3, seed=0, tensor_name="w", model_index=0))
    assert not torch.equal(mask, dare_keep_mask((1000, 100), 0.3, seed=1, tensor_name="w", model_index=0))
    # DARE rescaling keeps the task vector's expectation: the mean of many seeds approaches task arithmetic
    masks = [dare_keep_mask(a.shape, 0.5, seed, "w", 0) for seed in range(400)]
    dare_mean = sum(merge_tensors("dare_linear", [a], [1.0], base=base, density=0.5, dare_masks=[m]) for m in masks)
    assert (dare_mean / 400 - a).abs().mean() < 0.1 < (base + 0.5 * (a - base) - a).abs().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trim_threshold_is_the_exact_kth_largest_magnitude_on_large_tensors(dtype):
    from hf_interop.merge import trim_threshold

    values = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0), dtype=dtype)
    values[:500_000] = -values[500_003:]  # every magnitude twice
    values[:1000] = 0.0
    for density in (1e-5, 0.2, 0.5, 0.999):
        keep = math.ceil(density * values.numel())
        expected = torch.kthvalue(values.abs(), values.numel() - keep + 1).values
        assert torch.equal(trim_threshold(values, density), expected), density


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints on disk
# ---------------------------------------------------------------------------------------------------------------

METHOD_CASES = [
    ("linear", None, [0.5, 0.3, 0.2]),
    ("task_arithmetic", None, [0.6, 0.3, 0.5]),
    ("ties", 0.4, [1.0, 0.5, 0.8]),
    ("dare_linear", 0.6, [0.5, 0.5, 0.5]),
    ("dare_ties", 0.7, [1.0, 1.0, 0.5]),
    ("slerp", None, None),
]


@pytest.mark.parametrize("method,density,weights", METHOD_CASES, ids=[case[0] for case in METHOD_CASES])
def test_each_method_matches_float64_reference_and_streamed_equals_in_memory(
    family_checkpoints, tmp_path, method, density, weights
):
    children = family_checkpoints["children"][:2] if method == "slerp" else family_checkpoints["children"]
    base = None if method in ("linear", "slerp") else family_checkpoints["base"]
    out = merge_checkpoints(
        children,
        method,
        weights=weights,
        base=base,
        density=density,
        seed=7,
        slerp_t=0.3,
        output_dir=tmp_path / "merged",
        show_progress=False,
    )
    streamed = _state(out)
    states = [_state(child) for child in children]
    base_state = _state(base) if base is not None else None
    in_memory = merge_state_dicts(states, method, weights, base_state, density=density, seed=7, slerp_t=0.3)
    assert streamed.keys() == in_memory.keys() == states[0].keys()
    for name in streamed:
        assert torch.equal(streamed[name], in_memory[name]), name
    reference = _reference(method, states, base_state, weights or [1.0, 1.0], density, 7, 0.3)
    for name in streamed:
        assert streamed[name].dtype == states[0][name].dtype
        torch.testing.assert_close(streamed[name].double(), reference[name], rtol=1e-5, atol=1e-6, msg=name)

    model, tokenizer = load_causal_lm(out)
    assert tokenizer is not None and model.config.model_type == "llama"
    lineage = json.loads((out / "hf_interop_lineage.json").read_text())
    assert lineage["kind"] == "merged" and lineage["extra"]["method"] == method
    assert [member["weight"] for member in lineage["members"]] == (weights or [1.0, 1.0])
    assert [member["local_path"] for member in lineage["members"]] == [str(child.resolve()) for child in children]
    readme = (out / "README.md").read_text()
    assert "merge" in readme and method in readme


@pytest.mark.parametrize("method,density,weights", METHOD_CASES, ids=[case[0] for case in METHOD_CASES])
def test_row_block_merging_equals_whole_tensor_merging(
    family_checkpoints, tmp_path, monkeypatch, method, density, weights
):
    children = family_checkpoints["children"][:2] if method == "slerp" else family_checkpoints["children"]
    base = None if method in ("linear", "slerp") else family_checkpoints["base"]
    states = [_state(child) for child in children]
    base_state = _state(base) if base is not None else None
    whole = merge_state_dicts(states, method, weights, base_state, density=density, seed=3, slerp_t=0.6)
    # the 512x64 embedding is read in 8 blocks
    monkeypatch.setattr("hf_interop.merge.streaming.CHUNK_ELEMENTS", 4096)
    out = merge_checkpoints(
        children,
        method,
        weights,
        base,
        density=density,
        seed=3,
        slerp_t=0.6,
        output_dir=tmp_path / "m",
        show_progress=False,
    )
    blocked = _state(out)
    for name in whole:
        if method == "slerp":  # the angle is summed block by block: equal up to float rounding
            torch.testing.assert_close(blocked[name], whole[name], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(blocked[name], whole[name]), name


def test_sharded_output_loads_like_a_single_file(family_checkpoints, tmp_path):
    children = family_checkpoints["children"]
    single = merge_checkpoints(children, "linear", output_dir=tmp_path / "single", show_progress=False)
    sharded = merge_checkpoints(
        children, "linear", output_dir=tmp_path / "sharded", max_shard_size="40KB", show_progress=False
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    input_ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    model_single, _ = load_causal_lm(single)
    model_sharded, _ = load_causal_lm(sharded)
    with torch.no_grad():
        assert torch.equal(model_single(input_ids).logits, model_sharded(input_ids).logits)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "average"}, "merge method 'average' is unknown"),
        ({"method": "linear", "weights": [1.0, 2.0]}, "weights has 2 values for 3 checkpoints"),
        ({"method": "linear", "weights": [1.0, -1.0, 0.0]}, "sum to 0"),
        ({"method": "ties", "base": "BASE", "density": 0.0}, r"density=0.0 must be in \(0, 1\]"),
        ({"method": "dare_ties", "base": "BASE", "density": 1.5}, r"density=1.5 must be in \(0, 1\]"),
        ({"method": "dare_linear", "base": "BASE", "density": -0.1}, r"density=-0.1 must be in \(0, 1\]"),
        ({"method": "slerp"}, "slerp interpolates exactly two models, got 3"),
        ({"method": "task_arithmetic"}, "needs base="),
        ({"method": "ties"}, "needs base="),
        ({"method": "dare_linear"}, "needs base="),
        ({"method": "ties", "base": "BASE", "weights": [1.0, -1.0, 1.0]}, "must be positive"),
    ],
)
def test_bad_arguments_raise_before_any_work(family_checkpoints, tmp_path, kwargs, message):
    if kwargs.get("base") == "BASE":
        kwargs = {**kwargs, "base": family_checkpoints["base"]}
    with pytest.raises(ValueError, match=message):
        merge_checkpoints(family_checkpoints["children"], output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_slerp_with_base_and_bad_t_are_refused(family_checkpoints, tmp_path):
    two = family_checkpoints["children"][:2]
    with pytest.raises(ValueError, match="takes no base"):
        merge_checkpoints(two, "slerp", base=family_checkpoints["base"], output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"slerp_t=1.5 must be in \[0, 1\]"):
        merge_checkpoints(two, "slerp", slerp_t=1.5, output_dir=tmp_path / "out")


def test_mismatched_shapes_name_the_tensor(family_checkpoints, corpus_tokenizer, tmp_path):
    wider = build_tiny_causal_lm("llama", len(corpus_tokenizer), seed=0, intermediate_size=96)
    wider.save_pretrained(tmp_path / "wider")
    corpus_tokenizer.save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 96\]"):
        merge_checkpoints(
            [family_checkpoints["children"][0], tmp_path / "wider"], "linear", output_dir=tmp_path / "out"
        )


def test_differing_tokenizers_are_refused(family_checkpoints, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other_tokenizer"
    shutil.copytree(family_checkpoints["children"][0], other)
    # Same size, two tokens swapped: only a content comparison catches it.
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    swapped = next(token for token, index in vocab.items() if index == 9)
    vocab["<pad>"], vocab[swapped] = 9, 1
    for added in data["added_tokens"]:
        if added["content"] == "<pad>":
            added["id"] = 9
    (other / "tokenizer.json").write_text(json.dumps(data))
    assert len(AutoTokenizer.from_pretrained(other)) == len(AutoTokenizer.from_pretrained(family_checkpoints["base"]))
    with pytest.raises(ValueError, match="tokenizer of checkpoint 1 .* differs"):
        merge_checkpoints(
            [family_checkpoints["children"][1], other], "linear", output_dir=tmp_path / "out", show_progress=False
        )
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten_by_default(family_checkpoints, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_checkpoints(family_checkpoints["children"], "linear", output_dir=tmp_path / "out")


def test_greedy_soup_keeps_only_improving_checkpoints(family_checkpoints, packed_corpus, tmp_path):
    bad = perturbed_copy(family_checkpoints["base"], family_checkpoints["root"] / "bad", seed=9, scale=0.5)
    candidates = [bad, *family_checkpoints["children"]]
    validation = packed_corpus["validation"].select(range(16))
    result = greedy_soup(candidates, validation, output_dir=tmp_path / "soup", show_progress=False)
    assert str(bad) not in result["selected"]
    best = min(result["losses"], key=result["losses"].get)
    assert result["selected"][0] == best
    assert result["soup_loss"] <= min(result["losses"].values())
    previous = result["history"][0]["soup_loss"]
    for step in result["history"][1:]:
        assert step["kept"] == (step["soup_loss"] < previous)
        previous = step["soup_loss"] if step["kept"] else previous
    from hf_interop import evaluate_perplexity

    soup_model, _ = load_causal_lm(tmp_path / "soup")
    measured = evaluate_perplexity(soup_model, validation, show_progress=False)["loss"]
    assert measured == pytest.approx(result["soup_loss"], rel=1e-4)


def test_methods_list_is_documented():
    assert MERGE_METHODS == (
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "slerp",
        "breadcrumbs",
        "della",
        "della_linear",
        "model_stock",
    )
    from hf_interop.merge import checkpoints

    for method in MERGE_METHODS:  # each method is named in merge_checkpoints' docstring
        assert f"`{method}`" in checkpoints.merge_checkpoints.__doc__, method
