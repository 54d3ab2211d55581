"""What the recipe commands print when the input is wrong: ONE line naming the problem and the fix, in flag words."""

from __future__ import annotations

import pytest

from hf_interop.cli import EXIT_BAD_INPUT, EXIT_OK, main, parse_recipe_args


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["distill", "--max_steps", "ten"], "argument --max_steps/--max-steps: invalid int value: 'ten'"),
        (["adapt", "--lora_r"], "argument --lora_r/--lora-r: expected one argument"),
        (["merge", "--no_such_option", "1"], "unrecognized arguments: --no_such_option 1"),
        (
            ["cache-teacher", "--config", "/no/such/file.yaml"],
            "config file '/no/such/file.yaml' does not exist; check the path given to --config.",
        ),
    ],
)
def test_recipe_command_errors_are_one_line_without_the_usage_block(argv, message, capsys):
    assert main(argv) == EXIT_BAD_INPUT
    assert _stderr_lines(capsys) == [
        f"hf-interop {argv[0]}: error: {message} (`hf-interop {argv[0]} --help` lists the options)"
    ]


def test_config_file_errors_are_one_line_in_scripts_too(tmp_path, capsys):
    """`recipes/distill.py --config typo.yaml` (the same parser): one line that already points at --help."""
    from hf_interop.cli import RECIPES

    config = tmp_path / "typo.yaml"
    config.write_text("output_dir: out\nlerning_rate: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe_args(RECIPES["distill"][0](), ["--config", str(config)], prog="recipes/distill.py")
    assert exit_info.value.code == EXIT_BAD_INPUT
    (line,) = _stderr_lines(capsys)
    assert line.startswith(f"recipes/distill.py: error: key 'lerning_rate' in config file {str(config)!r}")
    assert line.endswith("(`recipes/distill.py --help` lists the options).")


def test_help_still_prints_the_usage(capsys):
    assert main(["distill", "--help"]) == EXIT_OK
    assert len(capsys.readouterr().out.splitlines()) > 50


def test_cache_of_a_different_job_names_the_flag(tiny_model_dirs, tmp_path, capsys):
    """A partial teacher cache (no manifest yet) of other settings: refused in the words of the command line."""
    output_dir = tmp_path / "cache"
    argv = ["cache-teacher", "--teacher_model_name_or_path", str(tiny_model_dirs["llama"])]
    argv += [
        "--output_dir",
        str(output_dir),
        "--block_size",
        "32",
        "--max_train_blocks",
        "4",
        "--disable_tqdm",
        "true",
    ]
    assert main([*argv, "--top_k", "4"]) == EXIT_OK
    (output_dir / "manifest.json").unlink()  # as if the run had been killed before it finished
    capsys.readouterr()
    assert main([*argv, "--top_k", "8"]) == EXIT_BAD_INPUT
    (line,) = [x for x in _stderr_lines(capsys) if x.startswith("hf-interop")]
    assert "holds a teacher-logits cache of a different job" in line
    assert "Pass overwrite=True (CLI: --overwrite_output_dir) to replace it" in line
    assert main([*argv, "--top_k", "8", "--overwrite_output_dir"]) == EXIT_OK
    assert (output_dir / "manifest.json").is_file()


@pytest.mark.parametrize("option", ["--sample_draws", "--train_steps", "--num_train_blocks"])
def test_demo_knobs_below_one_are_refused_by_name_before_anything_loads(option, capsys):
    assert main(["demo", option, "0", "--output_dir", "/nonexistent/never-written"]) == EXIT_BAD_INPUT
    assert f"{option} must be >= 1, got 0." in capsys.readouterr().err
