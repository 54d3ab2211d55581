"""`hf-interop distill-multi` end to end on tiny models: two teachers, each with its own text, routed or mixed."""

from __future__ import annotations

import json

import pytest
from helpers import build_tiny_causal_lm

from hf_interop.cli import run_recipe

TEACHER_OVERRIDES = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus, corpus_tokenizer):
    root = tmp_path_factory.mktemp("distill_multi")
    folders = {}
    for name, seed in (("student", 0), ("teacher_a", 1), ("teacher_b", 2)):
        overrides = {} if name == "student" else TEACHER_OVERRIDES
        model = build_tiny_causal_lm(
            "llama", len(corpus_tokenizer), seed=seed, tokenizer=corpus_tokenizer, **overrides
        )
        folders[name] = root / name
        model.save_pretrained(folders[name])
        corpus_tokenizer.save_pretrained(folders[name])
    texts = list(corpus["train"]["text"])
    for domain, documents in (("a", texts[:10]), ("b", texts[10:20])):
        (root / f"{domain}_train.txt").write_text("\n\n".join(documents[:8]))
        (root / f"{domain}_eval.txt").write_text("\n\n".join(documents[8:]))
    return root, folders


@pytest.mark.parametrize("combination", ["route", "mixture"])
def test_distill_multi_trains_one_student_from_two_teachers(setup, combination):
    root, folders = setup
    output_dir = root / f"out_{combination}"
    argv = [
        "--student_model_name_or_path", str(folders["student"]),
        "--teachers", json.dumps({"a": str(folders["teacher_a"]), "b": str(folders["teacher_b"])}),
        "--teacher_datasets", json.dumps({"a": str(root / "a_train.txt"), "b": str(root / "b_train.txt")}),
        "--teacher_eval_datasets", json.dumps({"a": str(root / "a_eval.txt"), "b": str(root / "b_eval.txt")}),
        "--teacher_combination", combination,
        "--block_size", "64", "--max_train_blocks", "8", "--max_eval_blocks", "4",
        "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
        "--save_strategy", "no",
    ]  # fmt: skip
    result = run_recipe("distill-multi", argv)
    assert result["output_dir"] == str(output_dir) and (output_dir / "model.safetensors").is_file()
    evaluation = result["eval"]
    for name in ("a", "b"):
        assert evaluation[f"eval_{name}_perplexity"] > 1.0
        assert evaluation[f"eval_kd_loss/{name}"] > 0
    assert evaluation["eval_mean_domain_perplexity"] == pytest.approx(
        (evaluation["eval_a_perplexity"] + evaluation["eval_b_perplexity"]) / 2
    )
    key = "teacher_share" if combination == "route" else "teacher_weight"
    steps = [entry for entry in result["trainer"].state.log_history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:  # a routed step may hold rows of one teacher only
        assert sum(entry.get(f"{key}/{name}", 0.0) for name in ("a", "b")) == pytest.approx(1.0)
    card = (output_dir / "README.md").read_text()
    assert str(folders["teacher_a"]) in card and str(folders["teacher_b"]) in card
    assert "a_perplexity" in card


def test_distill_multi_refuses_bad_input_before_loading(setup):
    root, folders = setup
    base = ["--student_model_name_or_path", str(folders["student"]), "--output_dir", str(root / "never")]
    teachers = json.dumps({"a": str(folders["teacher_a"]), "b": str(folders["teacher_b"])})
    with pytest.raises(ValueError, match="teacher_combination='route' needs teacher_datasets"):
        run_recipe("distill-multi", [*base, "--teachers", teachers])
    with pytest.raises(ValueError, match=r"teacher_datasets names unknown teacher\(s\) \['c'\]"):
        run_recipe(
            "distill-multi",
            [*base, "--teachers", teachers, "--teacher_datasets", json.dumps({"c": str(root / "a_train.txt")})],
        )
    with pytest.raises(ValueError, match="no teachers"):
        run_recipe("distill-multi", base)
    assert not (root / "never").exists()
