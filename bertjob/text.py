"""The one text path shared by prepare and infer: cleaning, the character cap, label parsing,
quarantine reasons, tokenizing and truncation.

Nothing here imports Ray or torch, so every function is unit-testable and runs on any machine.
"""

from __future__ import annotations

import html
import itertools
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from bertjob.models import Encoder

TRUNCATIONS = ("head", "tail", "head+tail")

# IMDb reviews carry literal "<br />" line breaks; other corpora carry stray tags too.
_TAG = re.compile(r"<\s*br\s*/?\s*>|</?[A-Za-z][^<>]{0,200}>", re.IGNORECASE)

LABEL_NAMES = {0: "NEGATIVE", 1: "POSITIVE"}
_LABELS = {
    "0": 0, "0.0": 0, "neg": 0, "negative": 0, "false": 0,
    "1": 1, "1.0": 1, "+1": 1, "pos": 1, "positive": 1, "true": 1,
}  # fmt: skip
# What writers put where a label is missing (pandas' and R's NA, a NULL or None printed as text),
# any case: these were unrecognised labels, not missing ones.
MISSING_LABEL_TEXTS = frozenset({"", "nan", "na", "n/a", "<na>", "null", "none"})

# Quarantine reasons: one place, so manifests and tests agree on the spelling.
EMPTY_TEXT = "empty_text"
NULL_TEXT = "null_text"
BAD_LABEL = "unrecognised_label"
BAD_LABELS_KEPT = 10  # unrecognised label values a manifest names, the commonest first
MISSING_LABEL = "missing_label"  # a row of a labelled split without a label
QUARANTINE_TEXT_CHARS = 10_000  # of a quarantined row's text kept for inspection
UNLABELLED_SPLIT = "unsup"  # IMDb's unlabelled reviews: the one split of a labelled corpus without labels
CAP_CHARS_PER_TOKEN = 16  # default character cap per end: 16 x max_length (no real token is longer)


@dataclass(frozen=True)
class TextSettings:
    """Everything that turns a raw text into token ids. Prepare records it in its manifest, train
    in the model's bertjob.json, and infer/evaluate follow it, so a model scores text exactly as it
    was trained on it."""

    max_length: int
    truncation: str
    head_tokens: int
    strip_html: bool
    max_chars_per_end: int  # the effective cap, never 0

    @classmethod
    def of(cls, d: dict[str, Any]) -> TextSettings:
        """From a manifest or bertjob.json; older ones lack the cap (it was 16 x max_length) or cleaning."""
        max_length = int(d["max_length"])
        return cls(
            max_length=max_length,
            truncation=d["truncation"],
            head_tokens=int(d.get("head_tokens") or max(1, max_length // 4)),
            strip_html=bool(d.get("strip_html", True)),
            max_chars_per_end=int(d.get("max_chars_per_end") or CAP_CHARS_PER_TOKEN * max_length),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        if "<" in text:  # the checks skip work on most texts: 3x faster on IMDb
            text = _TAG.sub(" ", text)
        if "&" in text:
            text = html.unescape(text)
    return " ".join(text.split())


def cap_chars(text: str, max_chars_per_end: int) -> tuple[str, bool]:
    """Keep at most `max_chars_per_end` characters from each end of a huge text.

    Head+tail truncation only ever needs the first and last few hundred tokens, so tokenizing a
    multi-megabyte text in full would waste time and memory. Returns (text, was_capped).
    """
    if max_chars_per_end <= 0 or len(text) <= 2 * max_chars_per_end:
        return text, False
    return text[:max_chars_per_end] + " ... " + text[-max_chars_per_end:], True


def parse_label(value: Any) -> int | None:
    """0/1, neg/pos, negative/positive (any case, also bools, 0.0/1.0 and +1); None when unrecognised.
    A text "+1" (LIBSVM's, a -1/+1 CSV's) is 1, so that -1/+1 labels meet `rating_scale`'s error, not
    a quarantine of every row."""
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


def commonest_labels(unrecognised: dict[str, int]) -> dict[str, int]:
    """The unrecognised label values ({value: rows}) a manifest names: the commonest first, at most
    BAD_LABELS_KEPT (a label column of free text stays bounded)."""
    return dict(sorted(unrecognised.items(), key=lambda kv: (-kv[1], kv[0]))[:BAD_LABELS_KEPT])


LABEL_VALUES_KEPT = 1000  # distinct unrecognised numbers a tally keeps


def tally_labels(labels: pa.Array | pa.ChunkedArray, into: dict[str, Any]) -> None:
    """Add a column of raw labels to a tally, `{"0": rows, "1": rows, "unrecognised": {value: rows}}`,
    what `rating_scale` judges: each distinct value is parsed once, and of those unrecognised only
    numbers are kept (a label column of free text stays small)."""
    counts = pc.value_counts(labels)
    bad = into.setdefault("unrecognised", {})
    for value, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
        if value is None:
            continue
        parsed = parse_label(value)
        key = str(parsed) if parsed is not None else None
        if key is not None:
            into[key] = into.get(key, 0) + n
        elif value in bad or (len(bad) < LABEL_VALUES_KEPT and _is_number(value)):
            bad[value] = bad.get(value, 0) + n


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def quarantine_note(
    rows: int, read: int, reasons: dict[str, int], where: str, unrecognised: dict[str, int]
) -> str:
    """The warning of a job that quarantined rows: how many, why, where they are, and the label
    values it could not read (evaluate's metrics leave those rows out)."""
    labels = (
        f"; labels not read: {', '.join(f'{v!r} x{n}' for v, n in unrecognised.items())} (bertjob's are 0/1, "
        f"neg/pos, negative/positive, false/true)"
        if unrecognised
        else ""
    )
    why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
    return f"quarantined {rows} of {read} rows ({why}) in {where}{labels}"


def utf8_note(replaced: int, read: int) -> str:
    """The warning of a job that read text that is not UTF-8 (a Windows-1252 or Latin-1 file): each
    accent became U+FFFD, counted in the manifest alone, and nothing said so."""
    return (
        f"{replaced} of {read} rows held text that is not valid UTF-8, read with U+FFFD (\ufffd) in its place: "
        f"a file in Windows-1252 or Latin-1? bertjob reads UTF-8; to keep those characters, convert it first "
        f"(iconv -f CP1252 -t UTF-8 FILE > utf8-FILE)"
    )


MINUS_ONE = ("-1", "-1.0")


def rating_scale(
    unrecognised: dict[str, int], labels: dict[str, int], column: str, others: str = "were quarantined"
) -> str | None:
    """An error when a labelled corpus' unrecognised labels ({value: rows}) include numbers above 1,
    as a rating scale's do (1-5 stars, 1-10, SST-5's 0-4): its 0s and 1s (`labels`, {"0": rows,
    "1": rows}) are ratings (1 star; "negative"), yet were read as negative and positive, and the
    rest were quarantined. prepare reported success and train learned 1-star reviews as positive
    from what was left; evaluate scored the model against them. -1 is left to the quarantine:
    Hugging Face's datasets mark an unlabelled row so (GLUE's test splits), except beside 1s without
    a 0: labels of -1/+1, whose negatives were all quarantined and a model trained on positives alone."""
    minus = {v: n for v, n in unrecognised.items() if v.strip() in MINUS_ONE}
    if minus and labels.get("1", 0) and not labels.get("0", 0):
        shown = ", ".join(f"{v!r} x{n}" for v, n in minus.items())
        return (
            f"label column {column!r} holds -1 ({shown}) and 1 ({labels['1']}) but no 0: labels of -1/+1? bertjob's "
            f"labels are 0/1 (also neg/pos, negative/positive, false/true), so the -1 rows were quarantined and only "
            f"positives were left. Map -1 to 0 first"
        )
    numeric = {}
    for value, n in unrecognised.items():
        try:
            if float(value) > 1:
                numeric[value] = n
        except ValueError:
            continue
    if not numeric:
        return None
    shown = ", ".join(f"{v!r} x{n}" for v, n in sorted(numeric.items(), key=lambda kv: -kv[1]))
    if all(float(v) == 2 for v in numeric) and not labels.get("0", 0):
        # Yelp's and Amazon's polarity files: 1 negative, 2 positive. "A rating scale?" and IMDb's
        # rule of 10 stars did not fit them; their 1s, the negatives, would have been positives.
        ones = f"1 ({labels['1']} rows) and " if labels.get("1") else ""
        return (
            f"label column {column!r} holds {ones}2 ({sum(numeric.values())} rows) but no 0: labels of 1 "
            f"negative and 2 positive, as Yelp's and Amazon's polarity files have? bertjob's labels are 0/1 (also "
            f"neg/pos, negative/positive, false/true), so the 1s would count as positive and the 2s {others}. Map "
            f"1 to 0 and 2 to 1 first"
        )
    return (
        f"label column {column!r} holds numbers above 1 ({shown}): a rating scale? bertjob's labels are 0/1 "
        f"(also neg/pos, negative/positive, false/true), so the rows labelled 0 or 1 ({labels.get('0', 0)} "
        f"and {labels.get('1', 0)}) would count as negative and positive and the others {others}. "
        f"Map the ratings to 0/1 first (IMDb's rule: <= 4 of 10 negative, >= 7 positive, the middle left out)"
    )


def first_rows_rating_scale(labels: pa.Array | pa.ChunkedArray, column: str, others: str) -> str | None:
    """`rating_scale` on a corpus' first rows' raw labels, before any work: a number above 1 there
    is one in the whole corpus too, so a column of stars is refused at once, not after all of it was
    read. The -1 rule needs every label (-1 beside 0s further on is Hugging Face's unlabelled mark)."""
    tally: dict[str, Any] = {}
    tally_labels(labels, tally)
    unrecognised = {v: n for v, n in tally.pop("unrecognised").items() if v.strip() not in MINUS_ONE}
    return rating_scale(unrecognised, tally, column, others)


def unread_labels(unrecognised: dict[str, int], labels: dict[str, int], column: str) -> str | None:
    """An error when a labelled corpus holds none of bertjob's labels, only another vocabulary's
    (good/bad, yes/no, spam/ham): every row was quarantined, prepare reported success with empty
    splits, and the pipeline then said there was no test split and to hold one out with the
    --prepare.test-fraction its user had given. -1 alone stays quarantined (Hugging Face's mark of
    an unlabelled split)."""
    other = {v: n for v, n in unrecognised.items() if v.strip() not in MINUS_ONE}
    if not other or labels.get("0") or labels.get("1"):
        return None
    shown = ", ".join(f"{v!r} x{n}" for v, n in commonest_labels(other).items())
    return (
        f"label column {column!r} holds none of bertjob's labels ({shown}): bertjob's are 0/1 (also neg/pos, "
        f"negative/positive, false/true), so every row would be quarantined. Map yours to 0/1 first, or name the "
        f"column that holds them with --label-column (in a pipeline: --prepare.label-column)"
    )


def keep_spans(
    lengths: np.ndarray, max_length: int, truncation: str, head_tokens: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """How many tokens each text keeps from its head and from its tail to fit `max_length`.

    `lengths` count tokens without [CLS] and [SEP]; the two specials take 2 of `max_length`. A text
    that fits keeps everything as its head. head+tail keeps the first `head_tokens` and the last
    `max_length - head_tokens - 2`: the best strategy on IMDb in Sun et al. 2019, "How to Fine-Tune
    BERT for Text Classification?".
    """
    budget = max_length - 2
    over = lengths > budget
    head_n = {"head": budget, "tail": 0}.get(truncation, min(head_tokens, budget))
    return np.where(over, head_n, lengths), np.where(over, budget - head_n, 0)


def encode_texts(
    texts: list[str | None],
    encoder: Encoder,
    max_length: int,
    truncation: str,
    head_tokens: int,
    exact_lengths: bool = True,
) -> tuple[pa.ListArray, np.ndarray]:
    """Tokenize cleaned texts into ids with [CLS]/[SEP] that fit max_length, cut by `truncation`.

    Returns the ids as a list<int32> array (an empty list where the text is None) and each text's
    full token count with the special tokens (0 where None). Without `exact_lengths`, a long text
    may be tokenized only at the ends that truncation keeps (`token_rows`): the same ids, but its
    count is then only known to be over max_length.
    """
    n = len(texts)
    good = [i for i, t in enumerate(texts) if t is not None]
    keep = None
    if not exact_lengths:  # what an over-long text keeps of each end
        head_n, tail_n = keep_spans(np.array([max_length]), max_length, truncation, head_tokens)
        keep = (int(head_n[0]), int(tail_n[0]))
    rows = token_rows(encoder, [texts[i] for i in good], keep)
    lengths = np.zeros(n, dtype=np.int64)
    lengths[good] = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    head, tail = keep_spans(lengths, max_length, truncation, head_tokens)
    present = np.zeros(n, dtype=bool)
    present[good] = True
    kept = np.where(present, head + tail + 2, 0)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(kept, out=offsets[1:])
    row = np.repeat(np.arange(n), kept)
    pos = np.arange(int(offsets[-1])) - offsets[:-1][row] - 1  # -1 is [CLS]
    src = np.where(
        pos < head[row], starts[row] + pos, starts[row] + lengths[row] - tail[row] + pos - head[row]
    )
    values = flat[np.clip(src, 0, max(len(flat) - 1, 0))] if len(flat) else np.zeros(len(src), np.int32)
    values[pos < 0] = encoder.cls_id
    values[pos == kept[row] - 2] = encoder.sep_id
    full = np.where(present, lengths + 2, 0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32())), full


# Characters of a long text looked at per token kept from its end (IMDb: ~4.3 per token). Too few
# only costs time: an end that yields fewer tokens than it must keep is tokenized again in full.
WINDOW_CHARS_PER_TOKEN = 6


def token_rows(encoder: Encoder, texts: list[str], keep: tuple[int, int] | None = None) -> list[list[int]]:
    """The token ids of each text, without special tokens.

    With `keep` (the tokens an over-long text keeps from its head and from its tail) and a
    tokenizer that works word by word (`Encoder.word_local`), a text long enough is tokenized only
    at its two ends, each cut at a space: its row is then the head's ids followed by the tail's,
    which truncation cuts to exactly what it would keep of the whole text's ids. On IMDb reviews at
    max_length 128 that is ~2x faster; at 512 ~1.2x. An end too short to be sure (fewer tokens than
    kept, or the two together not over the budget) falls back to the whole text.
    """
    if keep is None or not encoder.word_local:
        return encoder.ids(texts)
    head_n, tail_n = keep
    head_chars, tail_chars = head_n * WINDOW_CHARS_PER_TOKEN, tail_n * WINDOW_CHARS_PER_TOKEN
    whole, cut, ends = [], [], []  # texts tokenized whole; texts cut, and their head and tail
    for i, t in enumerate(texts):
        if len(t) > head_chars + tail_chars + 2:
            h = t.rfind(" ", 0, head_chars + 1) if head_n else 0  # the head: up to a space
            k = t.find(" ", len(t) - tail_chars) if tail_n else len(t)  # the tail: from a space
            if h >= 0 and k > h:
                cut.append(i)
                ends += [t[:h], t[k:]]
                continue
        whole.append(i)
    done = encoder.ids([texts[i] for i in whole] + ends)
    rows: list[list[int]] = [[]] * len(texts)
    for i, r in zip(whole, done):
        rows[i] = r
    again = []
    for j, i in enumerate(cut):
        head, tail = done[len(whole) + 2 * j], done[len(whole) + 2 * j + 1]
        if len(head) >= head_n and len(tail) >= tail_n and len(head) + len(tail) > head_n + tail_n:
            rows[i] = head + tail
        else:
            again.append(i)
    for i, r in zip(again, encoder.ids([texts[i] for i in again])):
        rows[i] = r
    return rows


@dataclass
class Tokenized:
    """What `tokenize_rows` makes of a batch of source rows, column by column."""

    labels: list[int | None]  # parsed; None where absent or unrecognised
    reasons: list[str | None]  # the quarantine reason, None for a row to keep
    input_ids: pa.ListArray  # with [CLS] and [SEP]; empty for quarantined rows
    full_lengths: np.ndarray  # tokens before truncation, with the specials (0 when quarantined;
    # without exact_lengths, a lower bound for a text tokenized at its ends: still over max_length)
    truncated: np.ndarray  # cut to max_length, or its text capped
    capped: np.ndarray  # the text was longer than twice the cap
    cleaned: list[str | None]  # the text as tokenized (None when quarantined)
    quarantined_text: list[str | None]  # the start of a quarantined row's raw text


def tokenize_rows(
    texts: list[str | None],
    raw_labels: list[Any],
    splits: list[str] | None,
    encoder: Encoder,
    s: TextSettings,
    check_labels: bool,
    exact_lengths: bool = True,
) -> Tokenized:
    """Clean, quarantine and tokenize rows: the one path of prepare, infer and evaluate.

    A row is quarantined for a null text, a text that cleans or tokenizes to nothing, and, with
    `check_labels` (a labelled corpus), an unrecognised or missing label outside the unlabelled
    split (whose labels, such as the Hugging Face IMDb's -1, are ignored). Text reasons come first,
    but a text found empty only by tokenizing it (zero-width spaces, control characters: characters
    the tokenizer drops) with a bad label keeps the label's reason: such texts are looked for among
    the rows tokenized. Huge texts keep `max_chars_per_end` characters of each end before
    tokenizing. Scoring needs no exact `full_lengths` (prepare's statistics do): without
    `exact_lengths`, long texts are tokenized at their ends only (`encode_texts`).
    """
    n = len(texts)
    labels = [parse_label(v) for v in raw_labels]
    reasons: list[str | None] = [None] * n
    capped = np.zeros(n, dtype=bool)
    cleaned: list[str | None] = [None] * n
    for i, text in enumerate(texts):
        if text is None:
            reasons[i] = NULL_TEXT
            continue
        text = clean_text(text, s.strip_html)
        if not text:
            reasons[i] = EMPTY_TEXT
        elif check_labels and labels[i] is None and (splits is None or splits[i] != UNLABELLED_SPLIT):
            reasons[i] = MISSING_LABEL if raw_labels[i] is None else BAD_LABEL
        if reasons[i] is None:
            cleaned[i], capped[i] = cap_chars(text, s.max_chars_per_end)
    input_ids, full = encode_texts(cleaned, encoder, s.max_length, s.truncation, s.head_tokens, exact_lengths)
    # Characters the tokenizer drops (zero-width spaces, control characters) clean to a text without
    # a token: quarantined as empty too, its row then as a quarantined row's (no ids, length 0).
    tokenless = full == 2  # [CLS] and [SEP] only
    if tokenless.any():
        for i in np.flatnonzero(tokenless):
            reasons[i], cleaned[i], capped[i] = EMPTY_TEXT, None, False
        input_ids = pc.if_else(pa.array(tokenless), pa.scalar([], input_ids.type), input_ids)
        full = np.where(tokenless, 0, full)
    quarantined = [t[:QUARANTINE_TEXT_CHARS] if r and t is not None else None for t, r in zip(texts, reasons)]
    return Tokenized(
        labels, reasons, input_ids, full, (full > s.max_length) | capped, capped, cleaned, quarantined
    )
