"""`hf-interop multitask`: the shipped YAML recipe parses, and the command runs end to end on a tiny model with real
text (two domains of Python's language reference plus the domain classifier, LoRA), writing a loadable
MultiTaskModel and a card listing tasks, weights and held-out results; bad options fail before any model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from hf_interop.cli import RECIPES, parse_recipe_args
from hf_interop.cli.main import main

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smollm2-135m_multitask" / "multitask_domains.yaml"


def test_recipe_parses_and_names_its_command():
    script_args, config = parse_recipe_args(RECIPES["multitask"][0](), ["--config", str(RECIPE)], prog="test")
    assert script_args.domains[0].startswith("python_docs=") and script_args.classification_task == "domain"
    assert config.task_weights == {"python_docs": 1.0, "fortunes": 1.0, "domain": 0.5}
    assert config.task_sampling == "temperature" and config.task_weighting == "static"
    header = RECIPE.read_text().split("\n\n")[0]
    assert f"hf-interop multitask --config {RECIPE.relative_to(REPO)}" in header
    assert f"python recipes/multitask.py --config {RECIPE.relative_to(REPO)}" in header
    for line in RECIPE.read_text().splitlines():
        match = re.match(r"^([a-z_0-9]+):(.*)$", line)
        if match and match.group(2).strip():
            assert "#" in line, f"option {match.group(1)!r} has no inline note"


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory, corpus):
    """Two 'domains' of real text: the language reference's documents about expressions vs. the rest."""
    folder = tmp_path_factory.mktemp("domains")
    files = {}
    for split, part in (("train", "train"), ("validation", "eval")):
        documents = [(row["title"], row["text"]) for row in corpus[split]]
        for name, keep in (("expressions", lambda t: t[:1] < "c"), ("statements", lambda t: t[:1] >= "c")):
            path = folder / f"{name}_{part}.txt"
            path.write_text("\n\n".join(text for title, text in documents if keep(title)), encoding="utf-8")
            files[(name, part)] = path
    return files


def _argv(tiny_model_dirs, domain_files, output_dir, *extra):
    return [
        "multitask", "--config", str(RECIPE),
        "--model_name_or_path", str(tiny_model_dirs["llama"]),
        "--domains", *(f"{n}={domain_files[(n, 'train')]}" for n in ("expressions", "statements")),
        "--eval_domains", *(f"{n}={domain_files[(n, 'eval')]}" for n in ("expressions", "statements")),
        "--task_weights", json.dumps({"expressions": 1.0, "statements": 0.5, "domain": 2.0}),
        "--block_size", "32", "--max_train_blocks", "24", "--max_eval_blocks", "4",
        "--classification_tokens", "16", "--max_classification_rows", "24",
        "--lora_target_modules", "q_proj", "v_proj",
        "--output_dir", str(output_dir), "--max_steps", "4", "--warmup_steps", "0", "--save_steps", "2",
        "--logging_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_multitask_command_end_to_end(tmp_path, tiny_model_dirs, domain_files, capsys):
    from hf_interop import MultiTaskModel
    from hf_interop.hub.cards import read_card_lineage

    output_dir = tmp_path / "out"
    assert main(_argv(tiny_model_dirs, domain_files, output_dir)) == 0
    printed = capsys.readouterr().out
    assert f"hf-interop multitask: wrote {output_dir}" in printed
    assert (output_dir / "backbone" / "adapter_model.safetensors").is_file()
    assert (output_dir / "task_heads.safetensors").is_file() and (output_dir / "checkpoint-4").is_dir()
    state = json.loads((output_dir / "multitask_state.json").read_text())
    assert state["tasks"] == ["expressions", "statements", "domain"]
    assert state["static_weights"] == [1.0, 0.5, 2.0]

    metrics = json.loads((output_dir / "eval_results.json").read_text())
    for task in ("expressions", "statements"):
        assert metrics[f"eval_{task}_perplexity"] > 1.0
    assert 0.0 <= metrics["eval_domain_accuracy"] <= 1.0

    card = (output_dir / "README.md").read_text()
    assert "| expressions | causal_lm | 1.0 | perplexity" in card
    assert "| statements | causal_lm | 0.5 |" in card
    assert f"| domain | classification | 2.0 | accuracy {metrics['eval_domain_accuracy']:.4g} |" in card
    assert read_card_lineage(output_dir)["kind"] == "multitask"

    model = MultiTaskModel.from_pretrained(output_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert model(task="domain", input_ids=ids).logits.shape == (1, 2)


def test_bad_options_fail_before_loading(tmp_path, tiny_model_dirs, domain_files, capsys, monkeypatch):
    import hf_interop.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(hf_interop.loading, "load_causal_lm", refuse)
    argv = _argv(
        tiny_model_dirs, domain_files, tmp_path / "bad", "--domains", f"only={domain_files[('expressions', 'train')]}"
    )
    assert main(argv) == 2
    assert "domains has 1 entry; give at least 2" in capsys.readouterr().err
    argv = _argv(tiny_model_dirs, domain_files, tmp_path / "bad", "--task_weights", '{"jargon": 1.0}')
    assert main(argv) == 2
    assert "['jargon']" in capsys.readouterr().err
    argv = _argv(tiny_model_dirs, domain_files, tmp_path / "bad", "--sampling_temperature", "0")
    assert main(argv) == 2
    assert "sampling_temperature=0.0 must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_recipe_yaml_is_valid_yaml_with_existing_prepare_step():
    values = yaml.safe_load(RECIPE.read_text())
    assert values["model_name_or_path"] == "default_teacher"
    assert (REPO / "recipes" / "smollm2-135m_merge_domains" / "prepare_texts.py").is_file()
