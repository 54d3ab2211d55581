"""fit_merge_coefficients: its streamed gradient against autograd through a naive in-memory merge, a fit that moves
weight to the checkpoint that fits the held-out text, the written merge and card, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from merge_helpers import load_state, perturbed_copy

from hf_interop import fit_merge_coefficients, load_causal_lm
from hf_interop.merge.fitting import coefficient_group, merged_objective_and_gradient, objective_loss
from hf_interop.merge.streaming import _SafetensorsCheckpoint


@pytest.fixture(scope="module")
def fitting_set(packed_corpus):
    return packed_corpus["validation"].select(range(8))


@pytest.mark.parametrize("objective", ["perplexity", "entropy"])
@pytest.mark.parametrize("with_base", [True, False])
def test_streamed_gradient_equals_autograd_of_the_in_memory_merge(merge_family, fitting_set, objective, with_base):
    children, base = merge_family["children"], merge_family["base"]
    states = [load_state(child) for child in children]
    base_state = load_state(base)
    model, _ = load_causal_lm(base)
    names = sorted(base_state)
    groups = sorted({coefficient_group(name, "layer") for name in names})
    group_index = {name: groups.index(coefficient_group(name, "layer")) for name in names}
    generator = torch.Generator().manual_seed(0)
    mixing = 0.5 + 0.3 * torch.rand(len(groups), 3, generator=generator, dtype=torch.float64)
    input_ids = torch.tensor(fitting_set[:2]["input_ids"])

    # reference: autograd through a naive merge held in memory
    reference_mixing = mixing.clone().requires_grad_(True)
    merged = {}
    for name in names:
        row = reference_mixing[group_index[name]].float()
        tensor = sum(row[i] * states[i][name] for i in range(3))
        if with_base:
            tensor = tensor + (1 - row.sum()) * base_state[name]
        merged[name] = tensor
    logits = torch.func.functional_call(model, merged, args=(), kwargs={"input_ids": input_ids}).logits
    reference_loss = objective_loss(logits, input_ids, objective)
    reference_loss.backward()

    skeleton, _ = load_causal_lm(base)
    for parameter in skeleton.parameters():
        parameter.requires_grad_(False)
        parameter.data = torch.empty(0)
    sources = [_SafetensorsCheckpoint(child, "checkpoint") for child in children]
    loss, gradient = merged_objective_and_gradient(
        skeleton,
        names,
        group_index,
        sources,
        _SafetensorsCheckpoint(base, "base") if with_base else None,
        mixing,
        input_ids,
        objective,
    )
    assert loss == pytest.approx(float(reference_loss.detach()), rel=1e-5)
    torch.testing.assert_close(gradient, reference_mixing.grad, rtol=1e-3, atol=1e-6)
    assert gradient.abs().sum() > 0


def test_fit_lowers_held_out_loss_below_the_uniform_soup_and_writes_the_merge(merge_family, fitting_set, tmp_path):
    from hf_interop import evaluate_perplexity, merge_checkpoints

    base = merge_family["base"]
    good = merge_family["children"][0]  # base + noise 0.02
    noisy = perturbed_copy(base, tmp_path / "noisy", seed=9, scale=0.5)
    result = fit_merge_coefficients(
        [good, noisy],
        fitting_set,
        method="linear",
        granularity="layer",
        num_steps=12,
        learning_rate=0.2,
        batch_size=4,
        output_dir=tmp_path / "fitted",
        show_progress=False,
    )
    assert result["history"][-1] < result["history"][0]
    for weight_good, weight_noisy in result["coefficients"].values():
        assert weight_good + weight_noisy == pytest.approx(1.0)
    uniform = merge_checkpoints([good, noisy], "linear", output_dir=tmp_path / "uniform", show_progress=False)

    def held_out_loss(folder):
        model, _ = load_causal_lm(folder)
        return evaluate_perplexity(model, fitting_set, batch_size=8, show_progress=False)["loss"]

    assert held_out_loss(tmp_path / "fitted") < held_out_loss(uniform) - 0.01
    # the written merge is the linear merge with the fitted per-group weights
    merged = load_state(tmp_path / "fitted")
    states = [load_state(good), load_state(noisy)]
    for name, tensor in merged.items():
        weights = result["coefficients"][coefficient_group(name, "layer")]
        expected = weights[0] * states[0][name].double() + weights[1] * states[1][name].double()
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6)
    lineage = json.loads((tmp_path / "fitted" / "hf_interop_lineage.json").read_text())
    fitted = lineage["extra"]["fitted_coefficients"]
    assert fitted["objective"] == "perplexity" and fitted["granularity"] == "layer"
    assert fitted["coefficients"]["layers.0"] == pytest.approx(result["coefficients"]["layers.0"], abs=1e-6)
    assert "fitted_coefficients" in (tmp_path / "fitted" / "README.md").read_text()


def test_task_arithmetic_fit_per_model(merge_family, fitting_set, tmp_path):
    children, base = merge_family["children"], merge_family["base"]
    result = fit_merge_coefficients(
        children,
        fitting_set,
        base=base,
        objective="entropy",
        num_steps=2,
        batch_size=2,
        output_dir=tmp_path / "ta",
        show_progress=False,
    )
    assert list(result["coefficients"]) == ["all"] and len(result["coefficients"]["all"]) == 3
    merged, base_state = load_state(tmp_path / "ta"), load_state(base)
    states = [load_state(child) for child in children]
    weights = result["coefficients"]["all"]
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = base_state[name].double() + sum(
        w * (s[name].double() - base_state[name]) for w, s in zip(weights, states, strict=True)
    )
    torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="ties"), "cannot be fitted"),
        (dict(base=None), "needs base="),
        (dict(granularity="neuron"), "granularity='neuron'"),
        (dict(objective="accuracy"), "objective='accuracy'"),
        (dict(num_steps=0), "num_steps=0"),
        (dict(empty=True), "eval_dataset is empty"),
        (dict(initial_weights=[1.0]), "initial_weights"),
    ],
)
def test_bad_fit_inputs_are_refused_before_anything_is_written(merge_family, fitting_set, tmp_path, kwargs, message):
    kwargs = dict(kwargs)
    dataset = fitting_set.select([]) if kwargs.pop("empty", False) else fitting_set
    kwargs.setdefault("base", merge_family["base"])
    with pytest.raises(ValueError, match=message):
        fit_merge_coefficients(merge_family["children"], dataset, output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_fit_on_checkpoints_of_different_shapes_names_the_tensor(merge_family, fitting_set, tmp_path):
    from helpers import build_tiny_causal_lm

    build_tiny_causal_lm("llama", 512, intermediate_size=96).save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape"):
        fit_merge_coefficients(
            [merge_family["children"][0], tmp_path / "wider"],
            fitting_set,
            base=merge_family["base"],
            output_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_cli_merge_fit_on_writes_the_fitted_merge(merge_family, tmp_path, capsys):
    from hf_interop.cli import main

    output_dir = tmp_path / "cli_fitted"
    inputs = ["merge", "--checkpoints", *map(str, merge_family["children"]), "--base", str(merge_family["base"])]
    args = [
        *inputs,
        "--method",
        "task_arithmetic",
        "--fit_on",
        "builtin",
        "--fit_granularity",
        "layer",
        "--fit_steps",
        "2",
    ]
    args += ["--fit_batch_size", "2", "--fit_block_size", "32", "--fit_max_blocks", "4", "--disable_tqdm", "true"]
    assert main([*args, "--output_dir", str(output_dir)]) == 0
    lineage = json.loads((output_dir / "hf_interop_lineage.json").read_text())
    fitted = lineage["extra"]["fitted_coefficients"]
    assert fitted["granularity"] == "layer" and fitted["num_steps"] == 2
    assert set(fitted["coefficients"]) == {"layers.0", "layers.1", "model.embed_tokens", "model.norm"}
    assert all(len(weights) == 3 for weights in fitted["coefficients"].values())
    # --fit_on only fits methods whose weights are linear in the merge, refused before any work
    assert main([*inputs, "--method", "ties", "--fit_on", "builtin", "--output_dir", str(tmp_path / "x")]) != 0
    assert "--fit_on fits the weights of task_arithmetic, linear" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_interrupted_fit_leaves_no_output_folder(merge_family, fitting_set, tmp_path, monkeypatch):
    import hf_interop.merge.fitting as fitting

    real = fitting.merged_objective_and_gradient
    calls = []

    def interrupted_after_one_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fitting, "merged_objective_and_gradient", interrupted_after_one_step)
    with pytest.raises(KeyboardInterrupt):
        fit_merge_coefficients(
            merge_family["children"],
            fitting_set,
            base=merge_family["base"],
            num_steps=3,
            output_dir=tmp_path / "out",
            show_progress=False,
        )
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
