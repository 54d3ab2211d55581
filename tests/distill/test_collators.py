"""The batch builders of `hf_interop.distill.collators`: masks of generated continuations, prompts to continue."""

from __future__ import annotations

import torch

from hf_interop.distill.collators import _left_padded_prompts, mask_generated_continuations


def test_mask_generated_continuations_masks_prompt_and_after_eos():
    eos = 2
    sequences = torch.tensor(
        [
            [0, 5, 6, 7, 2, 9, 9],  # prompt "0 5" (left-padded with 0), EOS at position 4
            [5, 6, 8, 8, 8, 8, 2],  # EOS on the last position
            [5, 6, 8, 2, 2, 2, 2],  # EOS then pad-as-EOS
        ]
    )
    prompt_mask = torch.tensor([[0, 1], [1, 1], [1, 1]])
    attention, labels = mask_generated_continuations(sequences, prompt_mask, eos)
    assert attention.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]]
    assert labels.tolist() == [
        [-100, -100, 6, 7, 2, -100, -100],
        [-100, -100, 8, 8, 8, 8, 2],
        [-100, -100, 8, 2, -100, -100, -100],
    ]
    # several EOS ids (e.g. Llama 3's end-of-turn) and no EOS at all
    _, labels = mask_generated_continuations(torch.tensor([[5, 6, 7, 3, 8]]), torch.tensor([[1, 1]]), [2, 3])
    assert labels.tolist() == [[-100, -100, 7, 3, -100]]
    _, labels = mask_generated_continuations(torch.tensor([[5, 6, 7, 3, 8]]), torch.tensor([[1, 1]]), None)
    assert labels.tolist() == [[-100, -100, 7, 3, 8]]


def test_prompts_come_from_masked_labels_or_the_default_length():
    input_ids = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    labels = torch.tensor([[10, 11, 12, 13, 14, 15], [-100, -100, -100, 23, 24, 25]])
    attention = torch.ones_like(input_ids)
    prompts, mask = _left_padded_prompts(input_ids, attention, labels, default_prompt_length=2, pad_token_id=0)
    assert prompts.tolist() == [[0, 10, 11], [20, 21, 22]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_padding_collator_right_pads_and_masks_padding_out_of_the_labels():
    from hf_interop.distill.collators import _PaddingCollator

    features = [
        {"input_ids": [5, 6, 7], "text": "a"},
        {"input_ids": [8, 9], "labels": [-100, 9], "attention_mask": [1, 1], "text": "b"},
    ]
    batch = _PaddingCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # labels default to the inputs, are not shifted, and are -100 on padding
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, 9, -100]]
    assert "text" not in batch  # strings are not model inputs
