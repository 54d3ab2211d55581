"""`hf-interop lm-eval`: lm-evaluation-harness's CLI opens a saved ensemble (issue 24: 17), offline, on a local task."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_interop.ensemble import EnsembleForCausalLM

pytest.importorskip("lm_eval")

TASK = """task: hfi_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_eval_runs_on_a_saved_ensemble(tiny_model_dirs, tmp_path):
    ensemble = EnsembleForCausalLM.from_members([str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"])])
    ensemble.save_pretrained(tmp_path / "ens")
    rows = [
        {"question": f"The with statement number {i} is", "choices": ["used", "not"], "answer": 0} for i in range(4)
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hfi_tiny_choice.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    command = [sys.executable, "-m", "hf_interop.cli", "lm-eval", "--model", "hf"]
    command += ["--model_args", f"pretrained={tmp_path / 'ens'},tokenizer={tmp_path / 'ens'}"]
    command += ["--tasks", "hfi_tiny_choice", "--include_path", str(tasks), "--limit", "4", "--device", "cpu"]
    command += ["--batch_size", "2", "--output_path", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert files, result.stdout[-2000:]
    results = json.loads(files[0].read_text())["results"]["hfi_tiny_choice"]
    assert 0.0 <= results["acc,none"] <= 1.0


def test_lm_eval_without_the_package_names_the_extra(monkeypatch, capsys):
    from hf_interop.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)
    assert main(["lm-eval", "--tasks", "x"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "pip install 'hf_interop[lm_eval]'" in error[0]
