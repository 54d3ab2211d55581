"""Recipes: every YAML config parses into its dataclasses, and every recipe script runs end to end on tiny models."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from hf_interop.cli import RECIPES, parse_recipe_args

REPO = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO / "recipes"
CONFIGS = sorted(RECIPES_DIR.glob("*_to_*/*/config_*.yaml"))
# recipe folder name -> (script, recipe name in hf_interop.cli.RECIPES)
METHODS = {
    "distill": ("distill.py", "distill"),
    "cache_teacher": ("cache_teacher.py", "cache-teacher"),
    "adapt": ("adapt.py", "adapt"),
    "ensemble": ("ensemble.py", "ensemble"),
    "merge": ("merge.py", "merge"),
    "distill_multi": ("distill_multi.py", "distill-multi"),
}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name.removesuffix('.py')}", RECIPES_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(method: str, name: str) -> str:
    (path,) = [p for p in CONFIGS if p.parent.name == method and p.name == name]
    return str(path)


def test_recipe_layout():
    assert {p.parent.name for p in CONFIGS} == set(METHODS), "every method has at least one config"
    for script, _ in METHODS.values():
        assert (RECIPES_DIR / script).is_file()
    for folder in [RECIPES_DIR, *{p.parent.parent for p in CONFIGS}]:
        assert (folder / "README.md").is_file(), f"{folder} has no README.md"
    for name in ("ddp", "fsdp", "fsdp_cpu", "deepspeed_zero3"):
        assert (RECIPES_DIR / "accelerate_configs" / f"{name}.yaml").is_file()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_parses_and_names_its_command(config):
    script, recipe = METHODS[config.parent.name]
    parsed = parse_recipe_args(RECIPES[recipe][0](), ["--config", str(config)], prog=script)
    assert parsed and all(type(p).__name__.endswith(("Arguments", "Config")) for p in parsed)
    text = config.read_text()
    relative = str(config.relative_to(REPO))
    header = text.split("\n\n")[0] + text.split("\n\n")[1]
    # The header comment holds the exact command that runs this file.
    assert re.search(rf"(accelerate launch .*|python )recipes/{script} --config {re.escape(relative)}", header), header
    # Every option carries an inline note (list-valued keys are explained by the comment above them).
    for line in text.splitlines():
        match = re.match(r"^([a-z_0-9]+):(.*)$", line)
        if match and match.group(2).strip():
            assert "#" in line, f"{config.name}: option {match.group(1)!r} has no inline note"


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {
        name: load_config_from_file(str(RECIPES_DIR / "accelerate_configs" / f"{name}.yaml")).distributed_type.value
        for name in ("ddp", "fsdp", "fsdp_cpu", "deepspeed_zero3")
    }
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp_cpu": "FSDP", "deepspeed_zero3": "DEEPSPEED"}


def test_unknown_yaml_key_names_key_and_file(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("output_dir: out\nlerning_rate: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe_args(RECIPES["distill"][0](), ["--config", str(config)], prog="recipes/distill.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'lerning_rate'" in err and str(config) in err and "'learning_rate'" in err


def test_command_line_overrides_yaml_and_types_are_checked(capsys):
    config = _config("distill", "config_kd.yaml")
    script_args, training = parse_recipe_args(
        RECIPES["distill"][0](), ["--config", config, "--max_steps", "3", "--kd_ratio", "0.25"], prog="d"
    )
    assert training.max_steps == 3 and training.kd_ratio == 0.25  # flags win
    assert script_args.student_num_layers == 10 and training.learning_rate == 3.0e-4  # the file's values
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe_args(RECIPES["distill"][0](), ["--config", config, "--max_steps", "ten"], prog="d")
    assert exit_info.value.code == 2
    assert "invalid int value: 'ten'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# End to end on tiny models: the shipped configs, with model paths, sizes and steps overridden on the command line
# ---------------------------------------------------------------------------------------------------------------

TINY = ["--block_size", "32", "--max_train_blocks", "8", "--max_eval_blocks", "4"]
TINY_TRAINING = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
]


@pytest.fixture(scope="module")
def recipe_outputs(tmp_path_factory, tiny_model_dirs):
    """Runs the recipes in the order a user would: cache, distill (live and cached), adapt, ensemble, merge."""
    root = tmp_path_factory.mktemp("recipes")
    teacher = str(tiny_model_dirs["llama"])
    outputs = {}
    outputs["cache"] = _load_script("cache_teacher.py").main(
        ["--config", _config("cache_teacher", "config_cache.yaml"), "--teacher_model_name_or_path", teacher]
        + ["--output_dir", str(root / "cache"), "--top_k", "8", *TINY, "--disable_tqdm", "true"]
    )
    distill = _load_script("distill.py")
    outputs["distill_kd"] = distill.main(
        ["--config", _config("distill", "config_kd.yaml"), "--teacher_model_name_or_path", teacher]
        + ["--student_num_layers", "1", "--output_dir", str(root / "distill_kd"), *TINY, *TINY_TRAINING]
    )
    outputs["distill_cached"] = distill.main(
        ["--config", _config("distill", "config_cached.yaml"), "--init_from", teacher, "--student_num_layers", "1"]
        + ["--teacher_logits_path", str(root / "cache"), "--output_dir", str(root / "distill_cached")]
        + [*TINY, *TINY_TRAINING]
    )
    outputs["adapt"] = _load_script("adapt.py").main(
        ["--config", _config("adapt", "config_lora.yaml"), "--model_name_or_path", str(root / "distill_kd")]
        + ["--lora_r", "4", "--output_dir", str(root / "adapt"), *TINY, *TINY_TRAINING]
    )
    members = [str(root / "distill_kd"), str(root / "adapt" / "merged")]
    outputs["ensemble"] = _load_script("ensemble.py").main(
        ["--config", _config("ensemble", "config_ensemble.yaml"), "--members", *members]
        + ["--output_dir", str(root / "ensemble"), "--block_size", "32", "--max_blocks", "4", "--fit_steps", "5"]
    )
    outputs["merge"] = _load_script("merge.py").main(
        ["--config", _config("merge", "config_merge.yaml"), "--checkpoints", *members]
        + ["--output_dir", str(root / "merge"), "--disable_tqdm", "true"]
    )
    outputs["root"] = root
    return outputs


def _card_kind(folder: Path) -> str:
    from hf_interop.model_card import read_card_lineage

    return read_card_lineage(folder)["kind"]


def test_cache_and_distill_recipes(recipe_outputs):
    root = recipe_outputs["root"]
    assert (root / "cache" / "manifest.json").is_file()
    assert recipe_outputs["cache"]["num_rows"] == 8
    for name in ("distill_kd", "distill_cached"):
        folder = root / name
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert _card_kind(folder) == "distilled"
        config = json.loads((folder / "config.json").read_text())
        assert config["num_hidden_layers"] == 1  # built from the teacher with --student_num_layers 1
        result = recipe_outputs[name]
        assert result["trainer"].state.global_step == 2
        assert result["eval"]["eval_perplexity"] > 1
    # The cached run read the cache instead of loading a teacher.
    assert recipe_outputs["distill_cached"]["trainer"].teacher_model is None
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp")]


def test_adapt_ensemble_merge_recipes(recipe_outputs):
    from hf_interop import load_causal_lm

    root = recipe_outputs["root"]
    assert (root / "adapt" / "adapter_config.json").is_file() and _card_kind(root / "adapt") == "lora"
    model, _ = load_causal_lm(root / "adapt" / "merged")  # a plain checkpoint, no PEFT needed
    assert model.config.num_hidden_layers == 1
    ensemble_config = json.loads((root / "ensemble" / "config.json").read_text())
    assert len(ensemble_config["members"]) == 2 and (root / "ensemble" / "README.md").is_file()
    fitted = recipe_outputs["ensemble"]["fitted_weights"]
    assert len(fitted) == 2 and abs(sum(fitted) - 1) < 1e-5
    assert (root / "merge" / "model.safetensors").is_file() and _card_kind(root / "merge") == "merged"


def test_failed_run_leaves_nothing_behind(recipe_outputs, tmp_path):
    """A run that fails after its staging folder exists (jsd cannot be computed from a top-k cache) leaves no
    output folder and no temporary folder."""
    distill = _load_script("distill.py")
    with pytest.raises(ValueError, match="loss_type='jsd'|loss_type"):
        distill.main(
            [
                "--config",
                _config("distill", "config_cached.yaml"),
                "--init_from",
                str(recipe_outputs["root"] / "distill_kd"),
            ]
            + ["--student_num_layers", "1", "--teacher_logits_path", str(recipe_outputs["root"] / "cache")]
            + ["--loss_type", "mse", "--output_dir", str(tmp_path / "failed"), *TINY, *TINY_TRAINING]
        )
    assert list(tmp_path.iterdir()) == []


def test_existing_output_dir_is_refused_before_loading(recipe_outputs):
    distill = _load_script("distill.py")
    output_dir = recipe_outputs["root"] / "distill_kd"
    before = sorted(p.name for p in output_dir.iterdir())
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        distill.main(
            ["--config", _config("distill", "config_kd.yaml"), "--teacher_model_name_or_path", str(output_dir)]
            + ["--student_num_layers", "1", "--output_dir", str(output_dir), *TINY_TRAINING]
        )
    assert sorted(p.name for p in output_dir.iterdir()) == before


@pytest.mark.parametrize("recipe", ["ensemble", "merge"])
def test_ensemble_and_merge_refuse_an_existing_output_dir_naming_the_flag(recipe, tmp_path):
    """Refused before any model loads, in the command line's words (`hf-interop ensemble|merge` exit 2 on it)."""
    from hf_interop.cli import EnsembleScriptArguments, MergeScriptArguments, run_ensemble, run_merge

    first, second, output_dir = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for folder in (first, second, output_dir):
        folder.mkdir()
    if recipe == "ensemble":
        run, args = (
            run_ensemble,
            EnsembleScriptArguments(members=[str(first), str(second)], output_dir=str(output_dir)),
        )
    else:
        run, args = run_merge, MergeScriptArguments(checkpoints=[str(first), str(second)], output_dir=str(output_dir))
    with pytest.raises(FileExistsError) as error:
        run(args)
    assert str(error.value) == (
        f"output folder {str(output_dir)!r} already exists; pass --overwrite_output_dir to replace it, or choose "
        "another --output_dir."
    )
