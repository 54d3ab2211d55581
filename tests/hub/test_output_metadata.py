"""hub/outputs.py: a card and a lineage manifest in one call give the files the two separate writers give, and a
card re-rendered with results keeps the lineage it recorded."""

from __future__ import annotations

import json
import logging

from hf_interop import write_lineage_manifest, write_model_card
from hf_interop.hub import (
    LINEAGE_FILENAME,
    OutputMetadata,
    read_card_lineage,
    update_card_metrics,
    write_output_metadata,
)


def _manifest(folder) -> dict:
    manifest = json.loads((folder / LINEAGE_FILENAME).read_text())
    manifest.pop("created_at")
    return manifest


def _sources(tmp_path) -> list[dict]:
    members = []
    for index, weight in enumerate((0.7, 0.3)):
        folder = tmp_path / "inputs" / f"run_{index}"
        folder.mkdir(parents=True)
        members.append({"name_or_path": str(folder), "weight": weight})
    return members


def test_card_and_manifest_in_one_call_equal_the_separate_writers(tmp_path):
    members = _sources(tmp_path)
    card = {"members": members, "merge_method": "ties", "hyperparameters": {"density": 0.4}, "model_name": "soup"}
    lineage = {"members": members, "extra": {"method": "ties", "density": 0.4}, "strict": False}

    together, separate = tmp_path / "together", tmp_path / "separate"
    together.mkdir()
    separate.mkdir()
    written = write_output_metadata(together, "merged", card=card, lineage=lineage)
    write_lineage_manifest(separate, kind="merged", **lineage)
    write_model_card(separate, "merged", lineage_manifest=LINEAGE_FILENAME, **card)

    assert written == OutputMetadata(card=together / "README.md", lineage=together / LINEAGE_FILENAME)
    assert (together / "README.md").read_text() == (separate / "README.md").read_text()
    assert _manifest(together) == _manifest(separate)
    assert f"recorded in `{LINEAGE_FILENAME}` next to this card" in (together / "README.md").read_text()
    assert _manifest(together)["extra"] == {"method": "ties", "density": 0.4}
    assert [member["weight"] for member in _manifest(together)["members"]] == [0.7, 0.3]


def test_the_card_names_the_manifest_only_when_asked_or_written(tmp_path):
    card = {"base_model": "/local/base", "model_name": "student"}
    plain = tmp_path / "plain"
    plain.mkdir()
    write_model_card(plain, "finetuned", **card)

    # Written together, link_manifest=False keeps the card of a separate write_model_card call.
    unlinked = tmp_path / "unlinked"
    write_output_metadata(unlinked, "finetuned", card=card, lineage={"base_model": None}, link_manifest=False)
    assert (unlinked / LINEAGE_FILENAME).is_file()
    assert (unlinked / "README.md").read_text() == (plain / "README.md").read_text()

    # A card-only call leaves a manifest already in the folder unnamed, unless link_manifest=True.
    assert write_output_metadata(unlinked, "finetuned", card=card) == OutputMetadata(unlinked / "README.md", None)
    assert (unlinked / "README.md").read_text() == (plain / "README.md").read_text()
    write_output_metadata(unlinked, "finetuned", card=card, link_manifest=True)
    assert LINEAGE_FILENAME in (unlinked / "README.md").read_text()
    assert LINEAGE_FILENAME not in (plain / "README.md").read_text()

    # No card asked for: only the manifest.
    manifest_only = tmp_path / "manifest_only"
    assert write_output_metadata(manifest_only, "merged", lineage={"extra": {"method": "greedy_soup"}}) == (
        OutputMetadata(card=None, lineage=manifest_only / LINEAGE_FILENAME)
    )
    assert sorted(path.name for path in manifest_only.iterdir()) == [LINEAGE_FILENAME]


def test_a_prebuilt_manifest_is_written_with_its_kind_and_extra(tmp_path):
    from hf_interop.hub import build_lineage_manifest

    manifest = build_lineage_manifest(kind="finetuned", base_model=str(tmp_path))
    folder = tmp_path / "checkpoint-3"
    write_output_metadata(
        folder,
        "finetuned",
        card={"base_model": str(tmp_path)},
        lineage={"manifest": manifest, "extra": {"global_step": 3}},
    )
    written = json.loads((folder / LINEAGE_FILENAME).read_text())
    assert written == {**manifest, "extra": {"global_step": 3}}
    assert read_card_lineage(folder)["base_model"] == str(tmp_path)


def test_update_card_metrics_keeps_the_lineage_and_adds_results(tmp_path):
    teachers = [{"name_or_path": "/local/teacher", "revision": None}]
    hyperparameters = {"kd_ratio": 0.5, "temperature": 2.0}
    write_model_card(tmp_path, "distilled", teachers=teachers, hyperparameters=hyperparameters)

    path = update_card_metrics(tmp_path, "distilled", {"perplexity": 12.5, "loss": 2.5}, ["wikitext"])

    expected = tmp_path / "expected"
    expected.mkdir()
    write_model_card(
        expected,
        "distilled",
        teachers=teachers,
        hyperparameters=hyperparameters,
        datasets=["wikitext"],
        metrics={"perplexity": 12.5, "loss": 2.5},
        model_name=tmp_path.name,
    )
    assert path == tmp_path / "README.md"
    assert path.read_text() == (expected / "README.md").read_text()
    assert read_card_lineage(tmp_path)["teachers"] == teachers
    assert "| perplexity | 12.5 |" in path.read_text()


def test_update_card_metrics_keeps_ensemble_members_and_rule(tmp_path):
    members = [{"name_or_path": "/local/a", "revision": None, "weight": 0.25}, {"name_or_path": "/local/b"}]
    write_model_card(tmp_path, "ensemble", members=members, combination="mixture")
    before = read_card_lineage(tmp_path)
    update_card_metrics(tmp_path, "ensemble", {"perplexity": 8.0}, "builtin corpus")
    after = read_card_lineage(tmp_path)
    assert after["members"] == before["members"] and after["combination"] == "mixture"
    assert "| perplexity | 8 |" in (tmp_path / "README.md").read_text()


def test_update_card_metrics_without_a_card_or_with_bad_metrics_writes_nothing(tmp_path, caplog):
    assert update_card_metrics(tmp_path, "distilled", {"perplexity": 3.0}, ["data"]) is None
    assert list(tmp_path.iterdir()) == []

    write_model_card(tmp_path, "finetuned", base_model="/local/base")
    before = (tmp_path / "README.md").read_text()
    with caplog.at_level(logging.WARNING, logger="hf_interop.hub.outputs"):
        assert update_card_metrics(tmp_path, "finetuned", {"perplexity": "low"}, ["data"]) is None
    assert "could not add the results to the model card" in caplog.text and "is not a number" in caplog.text
    assert (tmp_path / "README.md").read_text() == before
