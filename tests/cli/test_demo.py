"""The demo pipeline on a tiny teacher and a corpus subset: every step runs and every output is there.

The full-size demo (real SmolLM2 teacher, `make demo`) is not run in tests; it is timed by hand (see the report).
"""

from __future__ import annotations

import json

import pytest
from datasets import DatasetDict

from hf_interop.demo import DemoSettings, run_demo

EXPECTED_ROWS = [
    "teacher",
    "student, untrained",
    "student, cross-entropy only",
    "student, distilled",
    "student, distilled + LoRA",
    "ensemble (3 students, mixture)",
]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, tiny_model_dirs, corpus):
    subset = DatasetDict(
        {
            "train": corpus["train"].select(range(12)),
            "validation": corpus["validation"].select(range(3)),
            "test": corpus["test"].select(range(3)),
        }
    )
    output_dir = tmp_path_factory.mktemp("demo") / "demo_outputs"
    settings = DemoSettings(
        teacher=str(tiny_model_dirs["llama"]),
        corpus=subset,
        block_size=32,
        num_train_blocks=16,
        num_eval_blocks=8,
        sample_draws=8,
        student_num_layers=1,
        train_steps=3,
        batch_size=4,
        lora_steps=2,
        lora_r=2,
        compare_documents=2,
        output_dir=str(output_dir),
        show_progress=False,
    )
    return settings, run_demo(settings), output_dir


def test_every_step_reports_a_row(tiny_demo):
    _, summary, _ = tiny_demo
    rows = summary["rows"]
    assert [row["model"].split(" (")[0] if row["model"].startswith("teacher") else row["model"] for row in rows] == [
        "teacher",
        *EXPECTED_ROWS[1:],
    ]
    for row in rows:
        assert row["perplexity"] > 1 and row["tokens_per_second"] > 0 and row["parameters"] > 0
    teacher, untrained = rows[0], rows[1]
    assert untrained["parameters"] < teacher["parameters"]  # 1 of the teacher's 2 layers
    # The distilled student learnt from the teacher: its distribution moved towards the teacher's, which the
    # interoperability report measures directly.
    assert summary["timings"] and summary["seconds"] > 0


def test_outputs_folders_and_cards(tiny_demo):
    from hf_interop.model_card import read_card_lineage

    _, summary, output_dir = tiny_demo
    names = {p.name for p in output_dir.iterdir()}
    assert {
        "teacher_cache",
        "student_init",
        "student_ce",
        "student_distilled",
        "student_lora",
        "student_lora_merged",
        "ensemble",
        "compare",
        "loss_curves.png",
        "summary.json",
        "summary.md",
    } <= names
    kinds = {
        "student_init": "finetuned",
        "student_ce": "finetuned",
        "student_distilled": "distilled",
        "student_lora": "lora",
        "student_lora_merged": "finetuned",
        "ensemble": "ensemble",
    }
    for folder, kind in kinds.items():
        assert read_card_lineage(output_dir / folder)["kind"] == kind, folder
    # Saved references point at the final folders, not at the staging area.
    ensemble_config = json.loads((output_dir / "ensemble" / "config.json").read_text())
    assert [m["name_or_path"] for m in ensemble_config["members"]] == [
        str(output_dir / name) for name in ("student_ce", "student_distilled", "student_lora_merged")
    ]
    adapter_config = json.loads((output_dir / "student_lora" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(output_dir / "student_distilled")
    assert (output_dir / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((output_dir / "compare" / "report.json").read_text())
    assert report["names"] == ["teacher", "student_init", "student_ce", "student_distilled", "student_lora"]
    assert json.loads((output_dir / "summary.json").read_text())["rows"] == summary["rows"]
    assert "student, distilled" in (output_dir / "summary.md").read_text()
    assert not [p for p in output_dir.parent.iterdir() if p.name.startswith(".tmp")]


def test_saved_ensemble_loads_back(tiny_demo):
    from hf_interop import EnsembleForCausalLM

    _, _, output_dir = tiny_demo
    ensemble = EnsembleForCausalLM.from_pretrained(output_dir / "ensemble")
    assert ensemble.num_members == 3


def test_failed_rerun_keeps_previous_output(tiny_demo, tmp_path):
    """A re-run replaces the previous demo output only when it succeeds: one that fails leaves it as it was."""
    import dataclasses

    settings, _, output_dir = tiny_demo
    before = sorted(p.name for p in output_dir.iterdir())
    broken = dataclasses.replace(settings, teacher=str(tmp_path / "no_such_teacher"))
    with pytest.raises(ValueError, match="no_such_teacher"):
        run_demo(broken)
    assert sorted(p.name for p in output_dir.iterdir()) == before
    assert not [p for p in output_dir.parent.iterdir() if p.name.startswith((".tmp", ".old"))]


def test_demo_imports_nothing_from_the_cli():
    """The CLI runs the demo; the demo takes its staging folder from hf_interop.utils (no cli <-> demo cycle)."""
    import ast
    import inspect

    import hf_interop.demo

    tree = ast.parse(inspect.getsource(hf_interop.demo))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not [name for name in imported if name == "cli" or name.startswith(("cli.", "hf_interop.cli"))], imported
