"""Pure text functions shared by prepare and infer: cleaning, label parsing, decoding, truncation.

Nothing here imports Ray or torch, so every function is unit-testable and runs on any machine.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

TRUNCATIONS = ("head", "tail", "head+tail")

# IMDb reviews carry literal "<br />" line breaks; other corpora carry stray tags too.
_BR = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][^<>]{0,200}>")
_WS = re.compile(r"\s+")

LABEL_NAMES = {0: "NEGATIVE", 1: "POSITIVE"}
_LABELS = {
    "0": 0, "0.0": 0, "neg": 0, "negative": 0, "false": 0,
    "1": 1, "1.0": 1, "pos": 1, "positive": 1, "true": 1,
}  # fmt: skip

# Quarantine reasons: one place, so manifests and tests agree on the spelling.
EMPTY_TEXT = "empty_text"
NULL_TEXT = "null_text"
BAD_LABEL = "unrecognised_label"


def decode_text(raw: bytes | str | None) -> tuple[str | None, bool]:
    """Decode bytes as UTF-8; invalid bytes become U+FFFD. Returns (text, had_invalid_utf8)."""
    if raw is None or isinstance(raw, str):
        return raw, False
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def clean_text(text: str, strip_html: bool = True) -> str:
    """IMDb-style cleaning: <br /> to newlines, drop tags, unescape entities, collapse whitespace."""
    if strip_html:
        text = _BR.sub(" ", text)
        text = _TAG.sub(" ", text)
        text = html.unescape(text)
    return _WS.sub(" ", text).strip()


def cap_chars(text: str, max_chars_per_end: int) -> tuple[str, bool]:
    """Keep at most `max_chars_per_end` characters from each end of a huge text.

    Head+tail truncation only ever needs the first and last few hundred tokens, so tokenizing a
    multi-megabyte text in full would waste time and memory. Returns (text, was_capped).
    """
    if max_chars_per_end <= 0 or len(text) <= 2 * max_chars_per_end:
        return text, False
    return text[:max_chars_per_end] + " ... " + text[-max_chars_per_end:], True


def parse_label(value: Any) -> int | None:
    """0/1, neg/pos, negative/positive (any case, also bools and 0.0/1.0); None when unrecognised."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value) if value in (0, 1) else None
    if isinstance(value, (float, np.floating)):
        return int(value) if value in (0.0, 1.0) else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return _LABELS.get(str(value).strip().lower())


def truncate_ids(
    ids: Sequence[int], max_length: int, truncation: str, head_tokens: int = 128
) -> tuple[list[int], bool]:
    """Cut token ids (without special tokens) to fit `max_length` including [CLS] and [SEP].

    head+tail keeps the first `head_tokens` and the last `max_length - head_tokens - 2` tokens:
    the best strategy on IMDb in Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?".
    """
    budget = max_length - 2
    if len(ids) <= budget:
        return list(ids), False
    if truncation == "head":
        return list(ids[:budget]), True
    if truncation == "tail":
        return list(ids[-budget:]), True
    head = min(head_tokens, budget)
    tail = budget - head
    return list(ids[:head]) + (list(ids[-tail:]) if tail > 0 else []), True
