"""Hub pipelines against the loopback Hub emulator (tests/hub_server.py): push, pinned loads, preflight errors,
lineage manifests, ensembles of hub ids, and a seeded cache with HF_HUB_OFFLINE=1. No test touches a real Hub."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from hub_server import HubEmulator
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_interop import ModelLoadingError, load_causal_lm, push_output_to_hub, write_lineage_manifest, write_model_card
from hf_interop.hub import (
    LINEAGE_FILENAME,
    HubAccessError,
    LineageError,
    check_hub_access,
    check_repo_id,
    read_lineage_manifest,
)

# huggingface_hub's LFS upload hands httpx a file object as `data=`; httpx deprecates that spelling. Not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

WRITE_TOKEN = "hf_emulator_write_token"
READ_TOKEN = "hf_emulator_read_token"


@pytest.fixture(scope="module")
def hub():
    tokens = {WRITE_TOKEN: ("alice", "write"), READ_TOKEN: ("bob", "read")}
    with HubEmulator(tokens=tokens, orgs={"alice": ["interop-org"]}) as server:
        yield server


def _point_hub_client_at(monkeypatch, tmp_path, endpoint: str, offline: bool = False) -> None:
    """huggingface_hub reads its settings at import time: set the env for subprocesses and the constants for us."""
    from huggingface_hub import constants

    cache = tmp_path / "hub_cache"
    settings = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_XET": "1",  # the emulator speaks LFS, not Xet
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(tmp_path / "no_stored_token"),
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_stored_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"))
    # transformers (5.2x) keeps one HfApi, built on first use with the endpoint of that moment: once any earlier test
    # had loaded a tokenizer, its listing calls went to huggingface.co and sat through ~23 s of retries each.
    import transformers.utils.hub as transformers_hub

    monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    _point_hub_client_at(monkeypatch, tmp_path, hub.url)
    hub.requests.clear()
    return hub


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def distilled_output(tmp_path, tiny_model_dirs):
    """A tiny 'distilled' checkpoint folder as the trainers save it: weights, tokenizer, card, lineage manifest."""
    output = tmp_path / "student"
    shutil.copytree(tiny_model_dirs["llama"], output)
    teacher = {"name_or_path": str(tiny_model_dirs["qwen2"]), "revision": None}
    write_lineage_manifest(output, kind="distilled", teachers=[teacher], datasets=["pydoc_data/topics"])
    write_model_card(output, "distilled", teachers=[teacher], metrics={"perplexity": 123.4})
    return output


# ----------------------------------------------------------------------------------------------------------------
# Push, then load back pinned
# ----------------------------------------------------------------------------------------------------------------


def test_push_distilled_checkpoint_then_load_pinned_revision(hub_env, distilled_output):
    before = _tree_digest(distilled_output)
    result = push_output_to_hub(distilled_output, "alice/tiny-student", token=WRITE_TOKEN, private=False)
    assert _tree_digest(distilled_output) == before  # the local output is only read
    assert result["commit_hash"] == hub_env.head("alice/tiny-student")
    assert set(result["files"]) == set(before)

    # Weights travel through LFS, small text files inline in the commit.
    uploads = hub_env.uploads()
    assert ("POST", "/alice/tiny-student.git/info/lfs/objects/batch") in uploads
    stored = hub_env.repos["alice/tiny-student"].commits[result["commit_hash"]].files
    assert stored["model.safetensors"].lfs and not stored["config.json"].lfs

    model = AutoModelForCausalLM.from_pretrained("alice/tiny-student", revision=result["commit_hash"])
    original = AutoModelForCausalLM.from_pretrained(distilled_output)
    reloaded_state, original_state = model.state_dict(), original.state_dict()
    assert reloaded_state.keys() == original_state.keys()
    assert all(torch.equal(reloaded_state[name], original_state[name]) for name in original_state)
    tokenizer = AutoTokenizer.from_pretrained("alice/tiny-student", revision=result["commit_hash"])
    assert (
        tokenizer("def f(): pass")["input_ids"]
        == AutoTokenizer.from_pretrained(distilled_output)("def f(): pass")["input_ids"]
    )

    # hf_interop's loader takes the same hub id + pinned commit, and the card and manifest went along.
    model_again, _ = load_causal_lm("alice/tiny-student", revision=result["commit_hash"])
    assert torch.equal(model_again.lm_head.weight, original.lm_head.weight)
    card = ModelCard.load("alice/tiny-student")
    assert "hf_interop" in card.data.tags and card.data.to_dict()["hf_interop"]["kind"] == "distilled"
    from huggingface_hub import hf_hub_download

    manifest = json.loads(Path(hf_hub_download("alice/tiny-student", LINEAGE_FILENAME)).read_text())
    assert manifest["kind"] == "distilled"

    # A second push to a branch leaves main where it was.
    (distilled_output / "notes.txt").write_text("second run\n")
    second = push_output_to_hub(distilled_output, "alice/tiny-student", revision="run-2", token=WRITE_TOKEN)
    assert hub_env.head("alice/tiny-student") == result["commit_hash"]
    assert hub_env.head("alice/tiny-student", "run-2") == second["commit_hash"] != result["commit_hash"]


def test_pinned_revision_that_does_not_exist_is_a_clear_error(hub_env, tiny_model_dirs):
    hub_env.seed_folder("alice/pinned", tiny_model_dirs["gpt2"])
    with pytest.raises(ModelLoadingError, match=r"revision '0{40}' does not exist in 'alice/pinned'"):
        load_causal_lm("alice/pinned", revision="0" * 40)
    with pytest.raises(ModelLoadingError, match="hub id 'alice/no-such-model' was not found"):
        load_causal_lm("alice/no-such-model")


# ----------------------------------------------------------------------------------------------------------------
# Preflight errors: raised before any upload, local output intact
# ----------------------------------------------------------------------------------------------------------------


def test_push_without_token_fails_before_any_request(hub_env, distilled_output):
    before = _tree_digest(distilled_output)
    with pytest.raises(HubAccessError, match="no Hub token to push to 'alice/x'.*HF_TOKEN.*hf auth login"):
        push_output_to_hub(distilled_output, "alice/x")
    assert hub_env.requests == []  # not even a whoami
    assert _tree_digest(distilled_output) == before


@pytest.mark.parametrize("repo_id", ["not a repo", "alice/", "a/b/c", "alice/na--me", "-alice/x", ""])
def test_invalid_repo_id(hub_env, distilled_output, repo_id):
    with pytest.raises(ValueError, match="repo_id=.* is not a"):
        push_output_to_hub(distilled_output, repo_id, token=WRITE_TOKEN)
    assert hub_env.requests == []


def test_rejected_read_only_and_foreign_namespace_tokens(hub_env, distilled_output):
    with pytest.raises(HubAccessError, match="rejected the token"):
        push_output_to_hub(distilled_output, "alice/x", token="hf_wrong")
    with pytest.raises(HubAccessError, match="the token of 'bob' is read-only"):
        push_output_to_hub(distilled_output, "bob/x", token=READ_TOKEN)
    with pytest.raises(HubAccessError, match="cannot create it in namespace 'someone-else'.*alice, interop-org"):
        push_output_to_hub(distilled_output, "someone-else/x", token=WRITE_TOKEN)
    assert all(method in ("GET", "HEAD") for method, _ in hub_env.requests)  # checks only read
    assert "alice/x" not in hub_env.repos
    # An organisation the user belongs to is fine.
    assert check_hub_access("interop-org/new-model", token=WRITE_TOKEN)["user"] == "alice"


def test_unreachable_hub(monkeypatch, tmp_path, distilled_output):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    _point_hub_client_at(monkeypatch, tmp_path, f"http://127.0.0.1:{closed_port}")
    before = _tree_digest(distilled_output)
    with pytest.raises(HubAccessError, match=rf"127.0.0.1:{closed_port} could not be reached.*local output is kept"):
        push_output_to_hub(distilled_output, "alice/x", token=WRITE_TOKEN)
    assert _tree_digest(distilled_output) == before


def test_offline_mode_blocks_push_before_training(monkeypatch, tmp_path, hub):
    _point_hub_client_at(monkeypatch, tmp_path, hub.url, offline=True)
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE is set"):
        check_hub_access("alice/x", token=WRITE_TOKEN)


def test_check_hub_access_reports_repo_and_branch(hub_env, tiny_model_dirs):
    hub_env.seed_folder("alice/existing", tiny_model_dirs["llama"])
    assert check_hub_access("alice/existing", token=WRITE_TOKEN, revision="dev") == {
        "user": "alice",
        "endpoint": hub_env.url,
        "repo_exists": True,
        "revision_exists": False,
    }
    assert check_hub_access("alice/brand-new", token=WRITE_TOKEN)["repo_exists"] is False
    assert check_repo_id("alice/brand-new") == "alice/brand-new"


def test_bad_output_dir(hub_env, tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        push_output_to_hub(tmp_path / "missing", "alice/x", token=WRITE_TOKEN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no files to upload"):
        push_output_to_hub(tmp_path / "empty", "alice/x", token=WRITE_TOKEN)


# ----------------------------------------------------------------------------------------------------------------
# Lineage manifests
# ----------------------------------------------------------------------------------------------------------------


def test_lineage_manifest_resolves_commit_hashes(hub_env, tmp_path, tiny_model_dirs):
    first = hub_env.seed_folder("alice/teacher", tiny_model_dirs["llama"])
    second = hub_env.seed_folder("alice/teacher", tiny_model_dirs["llama"], message="retrain")
    output = tmp_path / "out"
    path = write_lineage_manifest(
        output,
        kind="ensemble",
        members=[
            {"name_or_path": "alice/teacher", "weight": 0.5},  # branch main -> its current commit
            {"name_or_path": "alice/teacher", "revision": first, "weight": 0.5},  # pinned stays pinned
            str(tiny_model_dirs["gpt2"]),  # local folder: absolute path, no hash
        ],
        datasets="pydoc_data/topics",
        extra={"combination": "mixture"},
    )
    assert path == output / LINEAGE_FILENAME
    manifest = read_lineage_manifest(output)
    members = manifest["members"]
    assert [member["commit_hash"] for member in members] == [second, first, None]
    assert [member.get("weight") for member in members] == [0.5, 0.5, None]
    assert members[2]["local_path"] == str(Path(tiny_model_dirs["gpt2"]).resolve())
    assert manifest["datasets"] == ["pydoc_data/topics"] and manifest["extra"] == {"combination": "mixture"}
    assert manifest["library_versions"]["transformers"]

    # An output built from this output keeps the chain.
    chained = write_lineage_manifest(tmp_path / "merged", kind="merged", base_model=str(output))
    assert json.loads(chained.read_text())["base_model"][0]["lineage"]["members"][0]["commit_hash"] == second

    with pytest.raises(LineageError, match="(?s)teacher 'alice/ghost' could not be resolved.*strict=False"):
        write_lineage_manifest(tmp_path / "bad", kind="distilled", teachers=["alice/ghost"])
    assert not (tmp_path / "bad" / LINEAGE_FILENAME).exists()
    loose = write_lineage_manifest(tmp_path / "loose", kind="distilled", teachers=["alice/ghost"], strict=False)
    entry = json.loads(loose.read_text())["teachers"][0]
    assert entry["commit_hash"] is None and "unresolved_reason" in entry


# ----------------------------------------------------------------------------------------------------------------
# Ensembles of hub ids
# ----------------------------------------------------------------------------------------------------------------


def test_ensemble_of_hub_ids_loads_from_the_emulator(hub_env, tmp_path, tiny_model_dirs):
    ensemble_module = pytest.importorskip("hf_interop.ensemble")
    from helpers import build_tiny_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    other = tmp_path / "other_llama"
    build_tiny_causal_lm("llama", len(tokenizer), seed=7, tokenizer=tokenizer).save_pretrained(other)
    tokenizer.save_pretrained(other)
    revision_a = hub_env.seed_folder("alice/member-a", tiny_model_dirs["llama"])
    revision_b = hub_env.seed_folder("alice/member-b", other)

    ensemble = ensemble_module.EnsembleForCausalLM.from_members(
        [
            {"name_or_path": "alice/member-a", "revision": revision_a},
            {"name_or_path": "alice/member-b", "revision": revision_b},
        ],
        weights=[0.25, 0.75],
    )
    input_ids = torch.tensor([tokenizer("class A: pass")["input_ids"]])
    members = [AutoModelForCausalLM.from_pretrained(folder).eval() for folder in (tiny_model_dirs["llama"], other)]
    with torch.no_grad():
        expected = torch.log(
            0.25 * torch.softmax(members[0](input_ids=input_ids).logits.double(), -1)
            + 0.75 * torch.softmax(members[1](input_ids=input_ids).logits.double(), -1)
        )
        combined = ensemble(input_ids=input_ids).logits.double()
    assert torch.allclose(torch.log_softmax(combined, -1), expected, atol=1e-5)

    # Saved, pushed and loaded back by hub id: members come from the emulator at their pinned commits.
    saved = tmp_path / "ensemble"
    ensemble.save_pretrained(saved)
    pushed = push_output_to_hub(saved, "alice/tiny-ensemble", token=WRITE_TOKEN)
    hub_env.seed_folder("alice/member-a", other, message="main moves on")  # the pin must hold
    hub_env.requests.clear()
    reloaded = ensemble_module.EnsembleForCausalLM.from_pretrained(
        "alice/tiny-ensemble", revision=pushed["commit_hash"]
    )
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=input_ids).logits.double(), combined, atol=1e-6)
    member_requests = [path for _, path in hub_env.requests if path.startswith("/alice/member-")]
    assert member_requests and all(
        f"/resolve/{revision_a}/" in path or f"/resolve/{revision_b}/" in path for path in member_requests
    )


# ----------------------------------------------------------------------------------------------------------------
# Seeded cache, offline
# ----------------------------------------------------------------------------------------------------------------


def test_seeded_cache_loads_offline(monkeypatch, tmp_path, tiny_model_dirs):
    _point_hub_client_at(monkeypatch, tmp_path, "http://127.0.0.1:9", offline=True)
    commit = hashlib.sha1(b"seeded snapshot").hexdigest()
    repo_folder = tmp_path / "hub_cache" / "models--SeedOrg--tiny-llama"
    shutil.copytree(tiny_model_dirs["llama"], repo_folder / "snapshots" / commit)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(commit)

    model, tokenizer = load_causal_lm("SeedOrg/tiny-llama")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert (
        tokenizer("x = 1")["input_ids"]
        == AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])("x = 1")["input_ids"]
    )
    # The lineage of an output built offline still records the exact snapshot.
    manifest = write_lineage_manifest(tmp_path / "out", kind="distilled", teachers=["SeedOrg/tiny-llama"])
    assert json.loads(manifest.read_text())["teachers"][0]["commit_hash"] == commit
    with pytest.raises(ModelLoadingError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_causal_lm("SeedOrg/not-seeded")


# ----------------------------------------------------------------------------------------------------------------
# Inside a Trainer: preflight before the first step, a commit per checkpoint
# ----------------------------------------------------------------------------------------------------------------


def _tiny_trainer(output_dir, model_dir, packed_corpus, callback):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return Trainer(
        model=model, args=args, train_dataset=packed_corpus["train"].select(range(16)), callbacks=[callback]
    )


def test_hub_push_callback_pushes_each_checkpoint(hub_env, tmp_path, tiny_model_dirs, packed_corpus):
    from hf_interop.callbacks import HubPushCallback

    callback = HubPushCallback("alice/run", token=WRITE_TOKEN, revision="training")
    trainer = _tiny_trainer(tmp_path / "run", tiny_model_dirs["llama"], packed_corpus, callback)
    trainer.train()
    assert callback.failed == []
    assert [push["step"] for push in callback.pushed] == [2, 4]
    assert hub_env.head("alice/run", "training") == callback.pushed[-1]["commit_hash"]
    first = callback.pushed[0]["commit_hash"]
    files = hub_env.repos["alice/run"].commits[first].files
    assert "model.safetensors" in files and "trainer_state.json" in files
    assert not any(name in files for name in ("optimizer.pt", "scheduler.pt", "training_args.bin"))  # resume-only
    # Each commit is the checkpoint of its step.
    pushed_model = AutoModelForCausalLM.from_pretrained("alice/run", revision=first)
    local_model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-2")
    assert torch.equal(pushed_model.lm_head.weight, local_model.lm_head.weight)


def test_hub_push_callback_without_token_stops_before_the_first_step(
    hub_env, tmp_path, tiny_model_dirs, packed_corpus
):
    from hf_interop.callbacks import HubPushCallback

    trainer = _tiny_trainer(tmp_path / "run", tiny_model_dirs["llama"], packed_corpus, HubPushCallback("alice/run2"))
    with pytest.raises(HubAccessError, match="no Hub token"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "run").glob("checkpoint-*"))
    assert hub_env.uploads() == []
    with pytest.raises(ValueError, match="repo_id='bad id' is not a valid Hub repo id"):
        HubPushCallback("bad id")
