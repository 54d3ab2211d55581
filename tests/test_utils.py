"""Output folders: the one existence check and the one staging folder behind every atomic output."""

from __future__ import annotations

import pytest

from hf_interop.utils import atomic_directory, check_output_dir, staged_output_dir


def test_check_output_dir_words_the_fix_as_its_caller_asks(tmp_path):
    for unset_or_new in (None, "", tmp_path / "new"):
        check_output_dir(unset_or_new, overwrite=False)
    check_output_dir(tmp_path, overwrite=True)
    with pytest.raises(FileExistsError) as error:
        check_output_dir(tmp_path, overwrite=False)
    assert str(error.value) == (
        f"output folder {str(tmp_path)!r} already exists; pass overwrite=True (CLI: --overwrite_output_dir) to "
        "replace it, or choose another folder."
    )
    with pytest.raises(FileExistsError) as error:
        check_output_dir(
            str(tmp_path), False, fix="pass overwrite=True to replace it or choose another.", name="output_dir"
        )
    assert (
        str(error.value)
        == f"output_dir {str(tmp_path)!r} already exists; pass overwrite=True to replace it or choose another."
    )


def test_atomic_directory_stages_in_a_hidden_sibling(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp_dir:
        assert tmp_dir.parent == tmp_path and tmp_dir.name.startswith(".tmp-out-") and not target.exists()
        (tmp_dir / "first").write_text("1")
    assert (target / "first").read_text() == "1"
    with pytest.raises(FileExistsError, match=r"pass overwrite=True \(CLI: --overwrite_output_dir\)"):
        with atomic_directory(target):
            pass
    # keep_name: the staging folder carries the final name, inside a hidden parent that goes away on success.
    with atomic_directory(target, overwrite=True, keep_name=True) as stage:
        assert stage.name == "out" and stage.parent.parent == tmp_path and stage.parent.name.startswith(".tmp-out-")
        (stage / "second").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["second"]
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True, keep_name=True) as stage:
            (stage / "half").write_text("3")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["second"]


def test_staged_output_dir_is_the_clis_and_names_the_flag(tmp_path):
    from hf_interop import cli

    assert cli.staged_output_dir is staged_output_dir
    (tmp_path / "run").mkdir()
    with pytest.raises(FileExistsError) as error:
        with staged_output_dir(tmp_path / "run"):
            pass
    assert str(error.value) == (
        f"output folder {str(tmp_path / 'run')!r} already exists; pass --overwrite_output_dir to replace it, or choose "
        "another output_dir."
    )
