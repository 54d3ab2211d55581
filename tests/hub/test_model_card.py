"""Model cards: every kind renders, the YAML header is valid Hub metadata and round-trips, bad input is named."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from hf_interop import render_model_card, write_model_card
from hf_interop.model_card import CARD_KINDS, ModelCardError, read_card_lineage, required_fields, template_text

REPO_ROOT = Path(__file__).resolve().parents[2]
TEACHER = {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "a" * 40}
MEMBERS = [
    {"name_or_path": "org/member-a", "revision": "b" * 40, "weight": 0.25},
    {"name_or_path": "org/member-b", "revision": "c" * 40, "weight": 0.75},
]

# Minimal metadata each kind's shipped template needs, plus what a real run records.
KIND_METADATA = {
    "distilled": dict(teachers=[TEACHER], base_model="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "lora": dict(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", adapter={"r": 8, "lora_alpha": 16}),
    "merged": dict(members=MEMBERS, merge_method="linear"),
    "ensemble": dict(members=MEMBERS, combination="mixture"),
    "finetuned": dict(base_model="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "multitask": dict(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        tasks=[{"name": "python_docs", "type": "causal_lm", "weight": 1.0, "result": "perplexity 12.5"}],
    ),
}
EXPECTED_RELATION = {
    "distilled": "finetune",
    "lora": "adapter",
    "merged": "merge",
    "finetuned": "finetune",
    "multitask": "finetune",
}
COMMON = dict(
    datasets=["pydoc_data/topics"],
    hyperparameters={"learning_rate": 1e-3, "temperature": 2.0, "max_steps": 10},
    metrics={"perplexity": 12.5, "top1_agreement": 0.625},
    license="apache-2.0",
    model_name="org/output",
)


def parse_header(text: str) -> dict:
    assert text.startswith("---\n")
    header, _, _body = text[4:].partition("\n---\n")
    return yaml.safe_load(header)


@pytest.mark.parametrize("kind", CARD_KINDS)
def test_every_kind_renders_valid_hub_metadata(kind):
    card = render_model_card(kind, **KIND_METADATA[kind], **COMMON)
    text = str(card)
    header = parse_header(text)

    assert header["library_name"] == ("peft" if kind == "lora" else "transformers")
    assert "hf_interop" in header["tags"] and kind in header["tags"]
    assert header["license"] == "apache-2.0"
    assert header["datasets"] == ["pydoc_data/topics"]
    assert header.get("base_model_relation") == EXPECTED_RELATION.get(kind)
    if kind in ("merged", "ensemble"):
        assert header["base_model"] == ["org/member-a", "org/member-b"]
    else:
        assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    lineage = header["hf_interop"]
    assert lineage["kind"] == kind
    assert lineage["hyperparameters"] == COMMON["hyperparameters"]
    if kind == "distilled":
        assert lineage["teachers"] == [TEACHER]
        assert TEACHER["revision"] in card.text
    if kind in ("merged", "ensemble"):
        assert [member["revision"] for member in lineage["members"]] == ["b" * 40, "c" * 40]
        assert [member["weight"] for member in lineage["members"]] == [0.25, 0.75]

    # model-index parses back into the measured metrics
    model_name, eval_results = model_index_to_eval_results(header["model-index"])
    assert model_name == "org/output"
    assert {result.metric_type: result.metric_value for result in eval_results} == COMMON["metrics"]
    assert all(result.task_type == "text-generation" for result in eval_results)

    # The body is filled in: title, hyperparameter table, metrics table, no Jinja left over.
    assert "# org/output" in card.text
    assert "| learning_rate | 0.001 |" in card.text and "| perplexity | 12.5 |" in card.text
    assert "{{" not in text and "{%" not in text

    # Round trip through huggingface_hub: the same metadata and text come back.
    reparsed = ModelCard(text)
    assert reparsed.data.to_dict() == card.data.to_dict()
    assert reparsed.text == card.text
    assert str(ModelCard(str(reparsed))) == str(reparsed)


def test_local_paths_stay_out_of_the_hub_header_but_are_recorded():
    card = render_model_card(
        "merged",
        members=[{"name_or_path": "/tmp/run/checkpoint-5", "weight": 0.5}, {"name_or_path": "org/b", "weight": 0.5}],
        merge_method="ties",
    )
    header = parse_header(str(card))
    assert header["base_model"] == "org/b"  # the Hub only accepts hub ids there
    assert header["hf_interop"]["local_base_models"] == ["/tmp/run/checkpoint-5"]
    assert "/tmp/run/checkpoint-5" in card.text and "not pinned" in card.text


def test_write_model_card_writes_readme_atomically_and_updates_it(tmp_path):
    output = tmp_path / "student"
    output.mkdir()
    path = write_model_card(output, "distilled", teachers=[TEACHER], metrics={"perplexity": 30.0})
    assert path == output / "README.md"
    first = ModelCard.load(path)
    assert first.data.to_dict()["model-index"][0]["name"] == "student"  # defaults to the folder name
    write_model_card(output, "distilled", teachers=[TEACHER], metrics={"perplexity": 20.0})
    assert "| perplexity | 20 |" in path.read_text()
    assert sorted(p.name for p in output.iterdir()) == ["README.md"]  # no temporary files left behind
    assert read_card_lineage(output)["teachers"] == [TEACHER]


def test_card_lineage_round_trips_into_a_new_card(tmp_path):
    write_model_card(tmp_path, "finetuned", base_model="/local/student_init", hyperparameters={"max_steps": 3})
    lineage = read_card_lineage(tmp_path)
    assert lineage["base_model"] == "/local/student_init"  # local paths are kept in the lineage block
    metadata = {key: lineage[key] for key in ("base_model", "hyperparameters")}
    card = render_model_card("finetuned", metrics={"perplexity": 9.5}, **metadata)
    assert read_card_lineage(card) == lineage


@pytest.mark.parametrize(
    "kind, metadata, field",
    [
        ("distilled", {}, "teachers"),
        ("distilled", {"teachers": []}, "teachers"),
        ("lora", {}, "base_model"),
        ("finetuned", {"base_model": ""}, "base_model"),
        ("merged", {"members": MEMBERS}, "merge_method"),
        ("merged", {"merge_method": "linear"}, "members"),
        ("ensemble", {}, "members"),
    ],
)
def test_missing_required_field_is_named(kind, metadata, field, tmp_path):
    with pytest.raises(ModelCardError, match=rf"requires `{field}`"):
        write_model_card(tmp_path / "out", kind, **metadata)
    assert not (tmp_path / "out").exists()  # nothing written


def test_templates_declare_their_required_fields():
    assert required_fields(template_text("distilled")) == ["teachers"]
    assert required_fields(template_text("merged")) == ["members", "merge_method"]


def test_custom_template_missing_field_and_unknown_variable(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("{#- required: datasets -#}\n---\n{{ card_data }}\n---\n# {{ model_name }} {{ typo_field }}\n")
    with pytest.raises(ModelCardError, match="requires `datasets`"):
        render_model_card("finetuned", template_path=template)
    with pytest.raises(ModelCardError, match="uses `typo_field`"):
        render_model_card("finetuned", template_path=template, datasets=["x/y"])


@pytest.mark.parametrize(
    "kind, metadata, message",
    [
        ("quantised", {}, "kind 'quantised' is not a model card kind"),
        ("finetuned", {"base_model": "org/a", "teachr": ["x"]}, r"unknown model card field\(s\) \['teachr'\]"),
        ("finetuned", {"base_model": "org/a", "base_model_relation": "distill"}, "base_model_relation` = 'distill'"),
        (
            "finetuned",
            {"base_model": "org/a", "metrics": {"ppl": "low"}},
            r"metrics\['ppl'\]` = 'low' is not a number",
        ),
        ("ensemble", {"members": [{"revision": "x"}]}, r"members\[0\]` .* has no 'name_or_path'"),
        ("ensemble", {"members": [{"name_or_path": "a/b", "weight": "heavy"}]}, "is not a number"),
    ],
)
def test_bad_metadata_is_named(kind, metadata, message):
    with pytest.raises(ModelCardError, match=message):
        render_model_card(kind, **metadata)


def _has_build_backend() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("setuptools").split(".")[0]) >= 77
    except (PackageNotFoundError, ValueError):
        return False


def test_templates_and_metrics_ship_in_the_wheel(tmp_path):
    """A non-editable install must find the templates: build the wheel and look inside."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "hf_interop", source / "hf_interop", ignore=ignore)
    shutil.copytree(REPO_ROOT / "model_cards", source / "model_cards", ignore=ignore)
    wheel_dir = tmp_path / "wheel"
    # Build with the venv's setuptools when it is recent enough (fast, offline); otherwise let pip fetch the build
    # backend from the package index, as `pip install .` would (venvs of Python >= 3.12 ship no setuptools).
    build_flags = ["--no-build-isolation"] if _has_build_backend() else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *build_flags, "-q", "-w", str(wheel_dir), "."],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheel_dir.glob("hf_interop-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in CARD_KINDS:
        assert f"hf_interop/model_cards/{kind}.md" in names
    assert "hf_interop/model_cards/_sources.md" in names
    metric_modules = [name for name in names if name.startswith("hf_interop/metrics/") and name.count("/") == 3]
    shipped = sorted(name for name in metric_modules if name.endswith(".py"))
    expected = sorted(
        f"hf_interop/metrics/{path.parent.name}/{path.name}"
        for path in (REPO_ROOT / "hf_interop" / "metrics").glob("*/*.py")
    )
    assert shipped == expected
    # Every module of the package ships (a subpackage missing from pyproject's `packages` would be left out).
    source_modules = {
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "hf_interop").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert source_modules <= names, sorted(source_modules - names)

    # Installed from the wheel (not editable), the package still finds and renders its templates.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    script = (
        "import hf_interop, hf_interop.model_card as m; "
        "print(hf_interop.__file__); "
        "print(m.render_model_card('finetuned', base_model='org/a').data.base_model_relation)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    installed_file, relation = result.stdout.split()
    assert Path(installed_file).is_relative_to(target)
    assert relation == "finetune"
