"""Students initialised from their teacher: depth pruning copies layers exactly, width pruning keeps the most
active channels/heads and equals the teacher with the dropped ones masked out."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import build_tiny_causal_lm
from transformers import AutoModelForCausalLM, GPTNeoXConfig, MistralConfig, Qwen3Config

from hf_interop import init_student_from_teacher, load_causal_lm
from hf_interop.distill.student_init import SUPPORTED_MODEL_TYPES, select_layers

VOCAB = 512
ALL_FAMILIES = ("llama", "qwen2", "gpt2", "mistral", "qwen3")


def _build_teacher(family: str, num_layers: int = 4, seed: int = 0, **overrides):
    if family in ("llama", "qwen2"):
        return build_tiny_causal_lm(family, VOCAB, seed=seed, num_hidden_layers=num_layers, **overrides)
    if family == "gpt2":
        return build_tiny_causal_lm(family, VOCAB, seed=seed, n_layer=num_layers, bos_token_id=0, eos_token_id=0)
    config_class = {"mistral": MistralConfig, "qwen3": Qwen3Config}[family]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=family == "qwen3",
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def teachers():
    return {family: _build_teacher(family) for family in ALL_FAMILIES}


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _layers_prefix(model) -> str:
    return "transformer.h." if model.config.model_type == "gpt2" else "model.layers."


def _layer_state(model, index: int) -> dict[str, torch.Tensor]:
    prefix = f"{_layers_prefix(model)}{index}."
    return {name[len(prefix) :]: t for name, t in model.state_dict().items() if name.startswith(prefix)}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_depth_pruned_student_copies_teacher_layers_embeddings_norm_and_head(teachers, family):
    teacher = teachers[family]
    student = init_student_from_teacher(teacher, num_layers=2, layer_selection="uniform")

    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2
    for new_index, old_index in enumerate([0, 3]):
        student_layer, teacher_layer = _layer_state(student, new_index), _layer_state(teacher, old_index)
        assert student_layer.keys() == teacher_layer.keys()
        for name in teacher_layer:
            assert torch.equal(student_layer[name], teacher_layer[name]), name
    prefix = _layers_prefix(teacher)
    outside = {name: t for name, t in teacher.state_dict().items() if not name.startswith(prefix)}
    student_state = student.state_dict()
    for name, tensor in outside.items():
        assert torch.equal(student_state[name], tensor), name

    embeddings, head = student.get_input_embeddings().weight, student.get_output_embeddings().weight
    if teacher.config.tie_word_embeddings:
        assert head.data_ptr() == embeddings.data_ptr()
    else:
        assert head.data_ptr() != embeddings.data_ptr()
    # The student owns its weights: training it must never change the teacher.
    assert embeddings.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_student_with_all_layers_reproduces_teacher_logits_exactly(teachers, input_ids, family):
    teacher = teachers[family]
    student = init_student_from_teacher(teacher, num_layers=4)
    with torch.no_grad():
        assert torch.equal(student(input_ids).logits, teacher(input_ids).logits)


def test_layer_selection_modes():
    assert select_layers(12, 6, "uniform") == [0, 2, 4, 7, 9, 11]
    assert select_layers(30, 6, "uniform") == [0, 6, 12, 17, 23, 29]
    assert select_layers(4, 4, "uniform") == [0, 1, 2, 3]
    assert select_layers(5, 1, "uniform") == [0]
    assert select_layers(5, 2, "first") == [0, 1]
    assert select_layers(5, 2, "last") == [3, 4]
    for total in range(1, 20):
        for keep in range(1, total + 1):
            chosen = select_layers(total, keep, "uniform")
            assert len(chosen) == keep and chosen == sorted(set(chosen))
            if keep > 1:
                assert chosen[0] == 0 and chosen[-1] == total - 1


def test_explicit_indices_and_sliding_window_layer_types_follow_the_kept_layers(input_ids):
    teacher = _build_teacher("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = init_student_from_teacher(teacher, layer_selection=[1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert torch.equal(
        _layer_state(student, 1)["self_attn.q_proj.weight"], _layer_state(teacher, 2)["self_attn.q_proj.weight"]
    )
    full = init_student_from_teacher(teacher, layer_selection=[0, 1, 2, 3])
    with torch.no_grad():  # 24 tokens > window 8: the sliding layers must still slide
        assert torch.equal(full(input_ids).logits, teacher(input_ids).logits)


def test_student_saves_loads_and_trains(tmp_path, tiny_model_dirs, corpus_tokenizer, input_ids):
    output_dir = tmp_path / "student"
    teacher, _ = load_causal_lm(tiny_model_dirs["llama"])
    student = init_student_from_teacher(tiny_model_dirs["llama"], num_layers=1, output_dir=output_dir)
    reloaded, tokenizer = load_causal_lm(output_dir)
    assert len(tokenizer) == len(corpus_tokenizer)
    info = json.loads((output_dir / "student_init.json").read_text())
    assert info["kept_layers"] == [0] and info["teacher_num_layers"] == 2
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, student(input_ids).logits)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        init_student_from_teacher(tiny_model_dirs["llama"], num_layers=1, output_dir=output_dir)

    teacher_before = {name: t.clone() for name, t in teacher.state_dict().items()}
    reloaded.train()
    optimizer = torch.optim.AdamW(reloaded.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = reloaded(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(teacher.state_dict()[name], t) for name, t in teacher_before.items())


def _mlp_intermediate_reference(teacher, input_ids) -> dict[int, torch.Tensor]:
    """Mean |activation| entering each layer's down projection, recomputed in float64 from the MLP input."""
    layers = teacher.transformer.h if teacher.config.model_type == "gpt2" else teacher.model.layers
    captured = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: captured.__setitem__(i, args[0].double()))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        teacher(input_ids)
    for hook in hooks:
        hook.remove()
    scores = {}
    for index, layer in enumerate(layers):
        x = captured[index]
        if teacher.config.model_type == "gpt2":
            hidden = torch.nn.functional.gelu(
                x @ layer.mlp.c_fc.weight.double() + layer.mlp.c_fc.bias.double(), approximate="tanh"
            )
        else:
            gate = x @ layer.mlp.gate_proj.weight.double().T
            hidden = torch.nn.functional.silu(gate) * (x @ layer.mlp.up_proj.weight.double().T)
        scores[index] = hidden.abs().mean(dim=(0, 1))
    return scores


@pytest.mark.parametrize(
    "family,heads",
    [
        ("llama", {"num_attention_heads": 2, "num_key_value_heads": 1}),
        ("qwen2", {"num_attention_heads": 2}),
        ("gpt2", {}),
    ],
)
def test_width_pruning_keeps_top_channels_and_equals_masked_teacher(tmp_path, teachers, input_ids, family, heads):
    from datasets import Dataset

    teacher = teachers[family]
    calibration = Dataset.from_dict({"input_ids": input_ids.tolist()})
    student = init_student_from_teacher(
        teacher,
        num_layers=4,
        intermediate_size=48,
        calibration_dataset=calibration,
        output_dir=tmp_path / "pruned",
        **heads,
    )
    info = json.loads((tmp_path / "pruned" / "student_init.json").read_text())
    assert info["calibration"]["num_tokens"] == input_ids.numel()
    reference = _mlp_intermediate_reference(teacher, input_ids)
    for index in range(4):
        kept = info["kept_channels"][str(index)]
        assert len(kept) == 48
        assert set(kept) == set(torch.topk(reference[index], 48).indices.tolist())
    if family == "gpt2":
        assert student.config.n_inner == 48
    else:
        assert student.config.intermediate_size == 48
        assert student.config.num_attention_heads == 2
        assert student.config.num_key_value_heads == heads.get("num_key_value_heads", 2)
        assert student.config.head_dim == 16
        for index in range(4):
            query_heads = info["kept_query_heads"][str(index)]
            # Equal GQA groups: every kept query head belongs to a kept key/value head (teacher groups of 2).
            assert {head // 2 for head in query_heads} == set(info["kept_key_value_heads"][str(index)])

    # The pruned student computes exactly what the teacher computes with the dropped channels/heads zeroed.
    masked = copy.deepcopy(teacher)
    layers = masked.transformer.h if family == "gpt2" else masked.model.layers
    with torch.no_grad():
        for index, layer in enumerate(layers):
            dropped = sorted(set(range(128 if family != "gpt2" else 256)) - set(info["kept_channels"][str(index)]))
            if family == "gpt2":
                layer.mlp.c_proj.weight[dropped, :] = 0
            else:
                layer.mlp.down_proj.weight[:, dropped] = 0
                for head in set(range(4)) - set(info["kept_query_heads"][str(index)]):
                    layer.self_attn.o_proj.weight[:, head * 16 : (head + 1) * 16] = 0
        torch.testing.assert_close(student(input_ids).logits, masked(input_ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_activation_importance_beats_random_pruning_on_real_teacher(smollm2, corpus):
    from hf_interop import evaluate_perplexity, pack_dataset

    teacher, tokenizer = smollm2
    validation = pack_dataset(corpus["validation"], tokenizer, block_size=128, max_blocks=8)
    common = dict(num_layers=30, intermediate_size=768, num_attention_heads=6, tokenizer=tokenizer)
    by_activation = init_student_from_teacher(
        teacher, calibration_dataset=corpus["train"], calibration_num_blocks=16, **common
    )
    at_random = init_student_from_teacher(teacher, width_importance="random", seed=0, **common)
    assert by_activation.config.intermediate_size == 768 and by_activation.config.num_key_value_heads == 3
    loss_activation = evaluate_perplexity(by_activation, validation, show_progress=False)["loss"]
    loss_random = evaluate_perplexity(at_random, validation, show_progress=False)["loss"]
    assert loss_activation < loss_random


def test_unsupported_architecture_lists_supported_ones():
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="gpt_neox") as error:
        init_student_from_teacher(model, num_layers=1)
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in str(error.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_layers": 5}, r"num_layers=5 is outside \[1, 4\]"),
        ({"num_layers": 0}, r"num_layers=0 is outside \[1, 4\]"),
        ({}, "num_layers is required"),
        ({"num_layers": 2, "layer_selection": "middle"}, "layer_selection 'middle'"),
        ({"layer_selection": [0, 4]}, r"indices \[4\] outside"),
        ({"layer_selection": [2, 1]}, "strictly increasing"),
        ({"layer_selection": [0, 1], "num_layers": 3}, "disagrees"),
        ({"num_layers": 2, "intermediate_size": 129}, r"intermediate_size=129 must be an integer in \[1, 128\]"),
        ({"num_layers": 2, "num_attention_heads": 3}, "not a multiple of the teacher's 2 key/value heads"),
        ({"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1}, "equal GQA groups"),
        ({"num_layers": 2, "width_importance": "magnitude"}, "width_importance='magnitude'"),
    ],
)
def test_bad_arguments_raise_clear_errors(teachers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        init_student_from_teacher(teachers["llama"], **kwargs)


def test_gpt2_head_pruning_and_missing_calibration_tokenizer_are_refused(teachers):
    with pytest.raises(ValueError, match="head pruning is not available for model_type 'gpt2'"):
        init_student_from_teacher(teachers["gpt2"], num_layers=2, num_attention_heads=2)
    with pytest.raises(ValueError, match="tokenizer="):
        init_student_from_teacher(teachers["llama"], num_layers=2, intermediate_size=64)


def test_bad_num_layers_for_a_path_fails_before_loading_weights(tiny_model_dirs, monkeypatch):
    import hf_interop.loading

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(hf_interop.loading, "load_causal_lm", fail)
    with pytest.raises(ValueError, match=r"num_layers=3 is outside \[1, 2\]"):
        init_student_from_teacher(tiny_model_dirs["qwen2"], num_layers=3)
