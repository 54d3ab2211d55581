"""DistillationConfig: defaults, command-line parsing, and a clear error for every out-of-range setting."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_interop import DistillationConfig
from hf_interop.distill.distillation_config import DISTILLATION_LOSS_TYPES


def make_config(tmp_path, **overrides):
    return DistillationConfig(output_dir=str(tmp_path), report_to="none", **overrides)


def test_is_training_arguments_with_documented_defaults(tmp_path):
    config = make_config(tmp_path)
    assert isinstance(config, TrainingArguments)
    assert config.loss_type == "forward_kl"
    assert config.temperature == 1.0
    assert config.kd_ratio == 0.5
    assert config.loss_chunk_size == 1024
    assert config.lmbda == 0.0 and config.seq_kd is False
    assert config.hidden_loss_weight == 0.0 and config.hidden_layer_map is None


def test_every_field_is_documented_in_docstring_and_help():
    import dataclasses

    own_fields = [
        f for f in dataclasses.fields(DistillationConfig) if f.name not in TrainingArguments.__dataclass_fields__
    ]
    assert len(own_fields) >= 20
    for field in own_fields:
        assert field.metadata.get("help"), f"{field.name} has no help text"
        assert f"{field.name} (`" in DistillationConfig.__doc__, f"{field.name} is not in the docstring Args"


def test_loss_types_match_the_losses_module():
    from hf_interop import losses

    assert tuple(DISTILLATION_LOSS_TYPES) == tuple(losses.LOSS_TYPES)


def test_command_line_parsing_of_json_fields(tmp_path):
    parser = HfArgumentParser(DistillationConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--loss_type",
            "jsd",
            "--jsd_beta",
            "0.25",
            "--hidden_loss_weight",
            "0.5",
            "--hidden_layer_map",
            "[[1, 2], [2, 4]]",
            "--teacher_device_map",
            '{"": "cpu"}',
            "--report_to",
            "none",
        ]
    )
    assert config.loss_type == "jsd" and config.jsd_beta == 0.25
    assert config.hidden_layer_map == [[1, 2], [2, 4]]
    assert config.teacher_device_map == {"": "cpu"}


def test_max_memory_keys_become_device_indices(tmp_path):
    config = make_config(tmp_path, teacher_device_map="auto", teacher_max_memory='{"0": "10GiB", "cpu": "30GiB"}')
    assert config.teacher_max_memory == {0: "10GiB", "cpu": "30GiB"}


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"temperature": 0.0}, ["temperature=0.0", "> 0"]),
        ({"temperature": -2.0}, ["temperature=-2.0", "> 0"]),
        ({"temperature": float("nan")}, ["temperature=nan"]),
        ({"jsd_beta": 1.5}, ["jsd_beta=1.5", "[0, 1]"]),
        ({"jsd_beta": -0.1}, ["jsd_beta=-0.1", "[0, 1]"]),
        ({"skew_alpha": 1.2}, ["skew_alpha=1.2", "[0, 1]"]),
        ({"kd_ratio": 2.0}, ["kd_ratio=2.0", "[0, 1]"]),
        ({"kd_ratio": -0.5}, ["kd_ratio=-0.5", "[0, 1]"]),
        ({"lmbda": 1.01}, ["lmbda=1.01", "[0, 1]"]),
        ({"loss_type": "kl"}, ["loss_type='kl'", "forward_kl"]),
        ({"loss_type": "uld"}, ["loss_type='uld'", "cross-tokenizer"]),
        ({"hidden_loss_weight": -1.0}, ["hidden_loss_weight=-1.0", ">= 0"]),
        ({"hidden_loss_weight": 1.0}, ["hidden_loss_weight=1.0", "hidden_layer_map"]),
        ({"hidden_loss_type": "l1"}, ["hidden_loss_type='l1'", "cosine"]),
        ({"hidden_layer_map": "[[1, 2"}, ["hidden_layer_map", "JSON"]),
        ({"hidden_layer_map": [[1, 2, 3]]}, ["hidden_layer_map", "pairs"]),
        ({"hidden_layer_map": [[-1, 2]]}, ["hidden_layer_map", "negative"]),
        ({"loss_chunk_size": -1}, ["loss_chunk_size=-1", ">= 0"]),
        ({"max_new_tokens": 0}, ["max_new_tokens=0"]),
        ({"generation_prompt_length": 0}, ["generation_prompt_length=0"]),
        ({"generation_temperature": 0.0}, ["generation_temperature=0.0"]),
        ({"generation_top_p": 0.0}, ["generation_top_p=0.0"]),
        ({"generation_top_k": -1}, ["generation_top_k=-1"]),
        ({"teacher_max_memory": {"cpu": "1GiB"}}, ["teacher_max_memory", "teacher_device_map='auto'"]),
        ({"teacher_logits_path": "/x", "lmbda": 0.5}, ["teacher_logits_path", "lmbda=0.5"]),
        ({"teacher_logits_path": "/x", "seq_kd": True}, ["teacher_logits_path", "seq_kd=True"]),
        (
            {"teacher_logits_path": "/x", "hidden_loss_weight": 1.0, "hidden_layer_map": [[1, 1]]},
            ["hidden_loss_weight=1.0", "teacher cache"],
        ),
    ],
)
def test_out_of_range_settings_raise_naming_value_and_fix(tmp_path, overrides, fragments):
    with pytest.raises(ValueError) as error:
        make_config(tmp_path, **overrides)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_distillation_hyperparameters_hold_only_relevant_settings(tmp_path):
    config = make_config(tmp_path, loss_type="jsd", jsd_beta=0.3, temperature=2.0)
    hyperparameters = config.distillation_hyperparameters()
    assert hyperparameters["loss_type"] == "jsd" and hyperparameters["jsd_beta"] == 0.3
    assert hyperparameters["temperature"] == 2.0
    assert "skew_alpha" not in hyperparameters and "lmbda" not in hyperparameters


def test_cross_tokenizer_loss_types_point_to_the_cross_tokenizer_config(tmp_path):
    from hf_interop import CrossTokenizerDistillationConfig

    with pytest.raises(ValueError, match="CrossTokenizerDistillationConfig"):
        DistillationConfig(output_dir=str(tmp_path), loss_type="uld")
    config = CrossTokenizerDistillationConfig(output_dir=str(tmp_path), loss_type="uld")
    assert config.loss_type == "uld"
    with pytest.raises(ValueError, match="not available across tokenizers"):
        CrossTokenizerDistillationConfig(output_dir=str(tmp_path), loss_type="tvd")


def test_unmatched_vocabulary_is_checked_before_training(tmp_path):
    from hf_interop import CrossTokenizerDistillationConfig, MultiTeacherDistillationConfig

    config = CrossTokenizerDistillationConfig(output_dir=str(tmp_path), unmatched_vocabulary="prefix")
    assert config.unmatched_vocabulary == "prefix"
    with pytest.raises(
        ValueError, match=r"unmatched_vocabulary='drop' is not supported; use one of \['bucket', 'prefix'\]"
    ):
        CrossTokenizerDistillationConfig(output_dir=str(tmp_path), unmatched_vocabulary="drop")
    with pytest.raises(ValueError, match="reverse KL is infinite on every token it leaves empty"):
        CrossTokenizerDistillationConfig(
            output_dir=str(tmp_path), unmatched_vocabulary="prefix", loss_type="reverse_kl"
        )
    with pytest.raises(ValueError, match="unmatched_vocabulary='drop' is not supported"):
        MultiTeacherDistillationConfig(
            output_dir=str(tmp_path),
            teachers={"a": "default_teacher"},
            cross_tokenizer=True,
            unmatched_vocabulary="drop",
        )
