"""Reading served teachers' answers (pure functions, no server): vLLM's prompt_logprobs from a recorded-shape
fixture, OpenAI echo answers with token strings, alignment of two tokenisations, and the loss inputs built from them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_interop.distill.served_teacher import (
    ServedTeacherAnswerError,
    TokenStringTable,
    align_server_tokens,
    parse_echo_logprobs,
    parse_vllm_prompt_logprobs,
)
from hf_interop.distill.served_teacher.online import answers_to_columns
from hf_interop.distill.served_teacher.responses import prompt_token_count
from hf_interop.distill.teacher_cache.format import PAD_LOGPROB, tail_logprob_from_topk

FIXTURE = Path(__file__).parent / "data" / "vllm_prompt_logprobs.json"
PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is" in SmolLM2's tokenizer


@pytest.fixture(scope="module")
def vllm_answer():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def table(smollm2_tokenizer):
    return TokenStringTable(smollm2_tokenizer)


def test_vllm_fixture_is_read_position_by_position(vllm_answer):
    ids, logprobs, statistics = parse_vllm_prompt_logprobs(vllm_answer["choices"][0], PROMPT, 3, 49152)
    assert ids.shape == logprobs.shape == (4, 3)
    assert logprobs.dtype == np.float16
    # position 0 predicts " capital": the prompt token came as a 4th entry (rank 412) and is not in the top-3
    assert ids[0].tolist() == [2240, 260, 253]
    assert ids[1].tolist() == [282, 314, 28]
    assert ids[3].tolist() == [314, 28, 30]
    np.testing.assert_array_equal(logprobs[0].astype(np.float64), [-2.5, -2.75, -3.125])  # exact in float16
    assert statistics == {"missing_positions": 0, "dropped_entries": 0}


def test_vllm_values_are_rounded_down_so_the_tail_never_goes_negative(vllm_answer):
    choice = json.loads(json.dumps(vllm_answer["choices"][0]))
    choice["prompt_logprobs"][2]["282"]["logprob"] = -0.1234567
    ids, logprobs, _ = parse_vllm_prompt_logprobs(choice, PROMPT, 3, 49152)
    assert float(logprobs[1, 0]) <= -0.1234567
    assert float(logprobs[1, 0]) > -0.1234567 - 2**-10
    # the tail derived on read agrees with a float64 reference
    mass = np.exp(logprobs.astype(np.float64)).sum(-1)
    expected = np.log1p(-mass)
    derived = tail_logprob_from_topk(torch.from_numpy(logprobs.astype(np.float32))).double().numpy()
    np.testing.assert_allclose(derived, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda entries: entries.pop("28"), "fewer than asked"),
        (lambda entries: entries["282"].update(logprob=float("nan")), "not a finite value"),
        (lambda entries: entries["282"].update(logprob=float("-inf")), "not a finite value"),
        (lambda entries: entries["282"].update(logprob=0.5), "not a finite value"),
        (lambda entries: entries.update({"99999": {"logprob": -9.0}}), "outside the vocabulary"),
    ],
)
def test_vllm_broken_answers_are_refused_naming_the_position(vllm_answer, damage, message):
    choice = json.loads(json.dumps(vllm_answer["choices"][0]))
    damage(choice["prompt_logprobs"][2])
    with pytest.raises(ServedTeacherAnswerError, match=message) as info:
        parse_vllm_prompt_logprobs(choice, PROMPT, 3, 49152, where="row 7")
    assert "row 7, position 1" in str(info.value)


def test_vllm_answer_without_prompt_logprobs_is_refused():
    with pytest.raises(ServedTeacherAnswerError, match="no `prompt_logprobs`"):
        parse_vllm_prompt_logprobs({"text": "x"}, PROMPT, 3, 49152)


def _echo_answer(table, ids, distributions, convention):
    """An OpenAI echo answer for `ids`: `distributions[p]` is the {id: logprob} predicting token p + 1."""
    strings = table.row_strings(ids)
    top = [None] * len(ids)
    for position, distribution in enumerate(distributions):
        index = position + 1 if convention == "current" else position
        if index == 0:
            continue  # servers report no distribution for the first token
        top[index] = {table.strings[token]: value for token, value in distribution.items()}
    return {"logprobs": {"tokens": strings, "text_offset": [], "top_logprobs": top}}


def test_echo_answers_map_strings_to_ids_in_both_conventions(table):
    ids = [504, 3575, 282, 4649, 314]
    distributions = [{3575: -1.0, 2240: -1.5}, {282: -0.5, 314: -2.0}, {4649: -0.25, 260: -3.0}, {314: -0.1, 28: -4.0}]
    current = _echo_answer(table, ids, distributions, "current")
    top_ids, logprobs, statistics = parse_echo_logprobs(current, ids, table, 2, "current")
    assert top_ids.tolist() == [[3575, 2240], [282, 314], [4649, 260], [314, 28]]
    assert statistics["missing_positions"] == 0
    following = _echo_answer(table, ids, distributions, "next")
    top_ids, logprobs, statistics = parse_echo_logprobs(following, ids, table, 2, "next")
    # the first position's distribution is the one the server never reports: no entries, all zero mass
    assert statistics["missing_positions"] == 1
    assert (logprobs[0].astype(np.float32) <= PAD_LOGPROB / 2).all()
    assert top_ids[1:].tolist() == [[282, 314], [4649, 260], [314, 28]]


def test_ambiguous_strings_are_dropped_and_padded_with_distinct_zero_mass_ids(table):
    assert "" in table.ambiguous  # special tokens and lone UTF-8 continuation bytes
    ids = [504, 3575, 282]
    answer = {
        "logprobs": {
            "tokens": table.row_strings(ids),
            "top_logprobs": [None, {" capital": -0.5, "": -1.0, " city": -2.0}, {" of": -0.1, "": -3.0}],
        }
    }
    top_ids, logprobs, statistics = parse_echo_logprobs(answer, ids, table, 3, "current")
    assert statistics["dropped_entries"] == 2
    assert top_ids[0, :2].tolist() == [3575, 2240]
    assert float(logprobs[0, 2]) == pytest.approx(PAD_LOGPROB, rel=1e-3)
    for row in top_ids:
        assert len(set(row.tolist())) == len(row)  # fillers never repeat an id (the loss scatters by id)


def test_unknown_strings_point_to_cross_tokenizer_distillation(table):
    ids = [504, 3575]
    answer = {"logprobs": {"tokens": table.row_strings(ids), "top_logprobs": [None, {"\u2581capital": -0.5}]}}
    with pytest.raises(ServedTeacherAnswerError, match="cross-tokenizer"):
        parse_echo_logprobs(answer, ids, table, 1, "current")


def test_echo_answers_with_too_few_entries_are_refused(table):
    ids = [504, 3575, 282]
    answer = {"logprobs": {"tokens": table.row_strings(ids), "top_logprobs": [None, {" capital": -0.5}, {" of": -1}]}}
    with pytest.raises(ServedTeacherAnswerError, match="fewer than asked"):
        parse_echo_logprobs(answer, ids, table, 4, "current")


def test_alignment_maps_equal_pieces_at_equal_offsets():
    ours = ["The", " cap", "ital", " of", " France"]
    assert align_server_tokens(ours, list(ours)).tolist() == [0, 1, 2, 3, 4]
    server = ["The", " capital", " of", " Fr", "ance"]
    assert align_server_tokens(ours, server).tolist() == [0, -1, -1, 2, -1]
    assert align_server_tokens(["", "a"], ["a"]).tolist() == [-1, 0]


def test_generated_tokens_after_the_prompt_are_not_counted():
    assert prompt_token_count(["The", " cap", "ital", " Paris"], len("The capital")) == 3
    assert prompt_token_count(["a", "b"], None) == 2


def test_answers_become_cache_shaped_columns_with_a_mask_of_unanswered_positions():
    k = 2
    row_a = (np.array([[1, 2], [3, 4], [5, 6]]), np.array([[-0.5, -1.5], [PAD_LOGPROB] * 2, [-0.1, -3.0]], np.float16))
    row_b = (np.array([[7, 8]]), np.array([[-0.2, -2.0]], np.float16))
    columns, missing = answers_to_columns([row_a, row_b], [(0, 4), (0, 2)], width=4, top_k=k)
    ids, logprobs, tail = columns.values()
    assert ids.shape == (2, 3, k) and logprobs.dtype == torch.float32
    assert missing.tolist() == [[False, True, False], [False, False, False]]  # padding is not "missing"
    expected_tail = math.log1p(-(math.exp(float(np.float16(-0.5))) + math.exp(float(np.float16(-1.5)))))
    assert float(tail[0, 0]) == pytest.approx(expected_tail, abs=1e-6)
    # left padding (generated batches): the answer sits at the row's tokens
    columns, missing = answers_to_columns([row_b], [(2, 4)], width=4, top_k=k)
    assert columns["teacher_topk_ids"][0, 2].tolist() == [7, 8]
    assert not bool(missing.any())
