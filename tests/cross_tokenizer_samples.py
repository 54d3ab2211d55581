"""Texts the cross-tokenizer tests tokenise, and token ids spelled back as bytes."""

from __future__ import annotations

from hf_interop.text_alignment import token_byte_strings

# Whitespace runs, accents, CJK, emoji, multi-digit numbers, merged words and code.
TEXTS = [
    "Hello world  and   spaces\t\ttabs\n\n\n  indented",
    "héllo café naïve Ünïcödé",
    "日本語のテキスト and 中文 mixed",
    "emoji 🙂👍🏽 and flags 🇫🇷!",
    "numbers 12345 3.14159 -42 1,000,000 and 2026-11-22",
    "The interpreter's behaviour isn't undefined; they're merged tokens.",
    "def f(x):\n    return x ** 2  # comment",
]


def _bytes_of(tokenizer, ids):
    table = token_byte_strings(tokenizer)
    return b"".join(table[i] for i in ids)
