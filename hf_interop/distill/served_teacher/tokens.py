"""Token strings of a served teacher, matched to the student's token ids.

An OpenAI-compatible server that only speaks text (llama.cpp's server, llama-cpp-python) names its tokens by
the text they decode to. :class:`TokenStringTable` maps such strings back to the student tokenizer's ids;
:func:`align_server_tokens` matches the server's tokenisation of a row's text to the row's own ids by their
character offsets, so a row whose text the server tokenises differently at a few places still gets the teacher's
distribution wherever the two agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...text_alignment import special_token_ids, token_byte_strings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TokenStringTable:
    """The text each id of `tokenizer` stands for, as a server that decodes tokens one at a time writes it.

    Servers decode a single token's bytes as UTF-8 dropping what is not valid on its own (llama-cpp-python's
    `errors="ignore"`), and write special tokens (`<|im_end|>`) as the empty string. Strings that several ids share
    (the empty string, most partial UTF-8 byte tokens) are *ambiguous*: a server answer naming one cannot say
    which id it meant, so those entries are dropped and their probability counted in the teacher's tail.

    Attributes:
        strings (`list[str]`): per id, its text as a server writes it.
        string_to_id (`dict[str, int]`): unambiguous strings only.
        ambiguous (`set[str]`): strings several ids share.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        table = token_byte_strings(tokenizer)
        specials = special_token_ids(tokenizer)
        self.strings: list[str] = []
        for token_id, token_bytes in enumerate(table):
            if token_bytes is None or token_id in specials:
                self.strings.append("")
            else:
                self.strings.append(token_bytes.decode("utf-8", errors="ignore"))
        counts: dict[str, int] = {}
        for text in self.strings:
            counts[text] = counts.get(text, 0) + 1
        self.ambiguous = {text for text, count in counts.items() if count > 1}
        self.string_to_id = {text: token_id for token_id, text in enumerate(self.strings) if counts[text] == 1}

    def __len__(self) -> int:
        return len(self.strings)

    def row_strings(self, ids: list[int] | np.ndarray) -> list[str]:
        strings = self.strings
        return [strings[int(token_id)] if 0 <= int(token_id) < len(strings) else "" for token_id in ids]


def align_server_tokens(ours: list[str], server: list[str]) -> np.ndarray:
    """For each of our tokens, the index of the server token at the same character offset with the same text.

    Args:
        ours (`list[str]`): our row's token strings (:meth:`TokenStringTable.row_strings`).
        server (`list[str]`): the server's token strings for the same text.

    Returns:
        `np.ndarray` of int64, shape `(len(ours),)`: the server index, or -1 where the server tokenised that
        stretch of text differently (no teacher distribution there).
    """
    mapping = np.full(len(ours), -1, dtype=np.int64)
    if ours == server:
        mapping[:] = np.arange(len(ours))
        return mapping
    our_starts = np.concatenate([[0], np.cumsum([len(text) for text in ours])])
    server_starts = np.concatenate([[0], np.cumsum([len(text) for text in server])])
    i = j = 0
    while i < len(ours) and j < len(server):
        if our_starts[i] == server_starts[j]:
            if ours[i] == server[j]:
                mapping[i] = j
                i += 1
                j += 1
                continue
            # same start, different pieces: move past the shorter one
            if our_starts[i + 1] <= server_starts[j + 1]:
                i += 1
            else:
                j += 1
        elif our_starts[i] < server_starts[j]:
            i += 1
        else:
            j += 1
    return mapping
