"""Tokenizing batches without Ray: truncation, special tokens, quarantine reasons, split hashes."""

import pickle

import numpy as np
import pyarrow as pa

from bertjob import models
from bertjob.config import PrepareConfig
from bertjob.infer import tokenize_table
from bertjob.prepare import text_hash, tokenize_batch
from bertjob.text import TextSettings, encode_texts

LETTERS = " ".join("abcdefghijklmnopqrst")  # 20 one-token words in the tiny vocabulary


def _words(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_encode_texts_cuts_each_strategy_and_frames_with_specials(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    enc = models.Encoder.of(tok)
    texts = [LETTERS, None, "a b"]
    ids, full = encode_texts(texts, enc, max_length=8, truncation="head+tail", head_tokens=2)
    rows = ids.to_pylist()
    assert _words(tok, rows[0]) == ["[CLS]", "a", "b", "q", "r", "s", "t", "[SEP]"]
    assert rows[1] == [] and _words(tok, rows[2]) == ["[CLS]", "a", "b", "[SEP]"]
    assert full.tolist() == [22, 0, 4]
    head, _ = encode_texts(texts, enc, 8, "head", 2)
    tail, _ = encode_texts(texts, enc, 8, "tail", 2)
    assert _words(tok, head.to_pylist()[0])[1:-1] == list("abcdef")
    assert _words(tok, tail.to_pylist()[0])[1:-1] == list("opqrst")
    # the same ids as the transformers tokenizer, and the encoder survives pickling (Ray ships it)
    assert (
        rows[0][1:-1]
        == tok(LETTERS, add_special_tokens=False)["input_ids"][:2] + tok(LETTERS)["input_ids"][-5:-1]
    )
    again, _ = encode_texts(texts, pickle.loads(pickle.dumps(enc)), 8, "head+tail", 2)
    assert again.to_pylist() == rows


def test_tokenize_batch_quarantines_bad_rows_and_hashes_labelled_train_rows(tiny_model_dir):
    cfg = PrepareConfig(input="unused", output="unused", model=tiny_model_dir, max_length=8)
    batch = pa.table(
        {
            "id": ["r1", "r2", "r3", "r4", "r5"],
            "text": ["a <br /> b &amp; c", None, "  <br/> ", "a b", "a b"],
            "label": ["pos", "neg", "neg", "maybe", "1"],
            "split": ["train", "train", "train", "train", "test"],
            "utf8_replaced": [False] * 5,
        }
    )
    out = tokenize_batch(batch, cfg, models.load_encoder(tiny_model_dir), labelled=True)
    assert out.column("reason").to_pylist() == [None, "null_text", "empty_text", "unrecognised_label", None]
    assert out.column("label").to_pylist() == [1, 0, 0, None, 1]
    tok = models.load_tokenizer(tiny_model_dir)
    assert _words(tok, out.column("input_ids")[0].as_py()) == ["[CLS]", "a", "b", "&", "c", "[SEP]"]
    assert out.column("length").to_pylist() == [6, 0, 0, 0, 4]
    # kept rows carry their cleaned text's hash (train's split by it); quarantined ones 0
    assert out.column("h").to_pylist() == [
        text_hash(cfg.seed, t) if t else 0 for t in ("a b & c", 0, 0, 0, "a b")
    ]


# null, empty, whitespace-only, HTML-only, huge, unrecognised label, null text with a bad label,
# missing label, an unlabelled-split row without a label, only zero-width spaces, only control
# characters (both clean to text the tokenizer drops whole)
TRICKY = [
    ("r0", "a b <br /> c &amp; d", "pos", "test"), ("r1", None, "neg", "test"), ("r2", "", "neg", "test"),
    ("r3", "  \t\n ", "1", "test"), ("r4", "<br /><br />", "0", "test"), ("r5", "a b c d e f g h i j " * 500, "pos", "test"),
    ("r6", "a b", "maybe", "test"), ("r7", None, "maybe", "test"), ("r8", "a b c", None, "test"), ("r9", "b c", None, "unsup"),
    ("r10", "\u200b\u200b", "pos", "test"), ("r11", "\x00\x07 \x7f", "neg", "unsup"),
]  # fmt: skip
TRICKY_REASONS = [None, "null_text", "empty_text", "empty_text", "empty_text", None, "unrecognised_label",
                  "null_text", "missing_label", None, "empty_text", "empty_text"]  # fmt: skip


def test_prepare_and_infer_tokenize_tricky_rows_alike(tiny_model_dir):
    """One path: the same ids, quarantine reasons, cap and truncation from prepare and from evaluate."""
    enc = models.load_encoder(tiny_model_dir)
    t = pa.table({"id": [r[0] for r in TRICKY], "text": [r[1] for r in TRICKY], "label": [r[2] for r in TRICKY],
                  "split": [r[3] for r in TRICKY], "utf8_replaced": [False] * len(TRICKY)})  # fmt: skip
    cfg = PrepareConfig(
        input="x", output="y", model=tiny_model_dir, max_length=16, head_tokens=4, max_chars_per_end=30
    )
    prepared = tokenize_batch(t, cfg, enc, labelled=True)
    scored = tokenize_table(t, enc, cfg.text_settings(), evaluate=True)
    assert prepared.column("reason").to_pylist() == TRICKY_REASONS == scored.column("reason").to_pylist()
    assert prepared.column("input_ids").to_pylist() == scored.column("input_ids").to_pylist()
    assert prepared.column("capped").to_pylist()[5] and len(prepared.column("input_ids")[5]) == 16
    quarantined = [i for i, r in enumerate(TRICKY_REASONS) if r]
    assert all(len(prepared.column("input_ids")[i]) == 0 for i in quarantined)  # never [CLS] [SEP]
    assert prepared.column("raw_text").to_pylist()[10] == "\u200b\u200b"  # kept for inspection
    # infer (no labels checked) scores the rows with bad or missing labels
    plain = tokenize_table(t, enc, cfg.text_settings(), evaluate=False).column("reason").to_pylist()
    assert plain == [r if r in ("null_text", "empty_text") else None for r in TRICKY_REASONS]


def test_text_settings_of_older_records_fill_the_cap_and_cleaning():
    old = TextSettings.of({"max_length": 128, "truncation": "head+tail", "head_tokens": 32})
    assert (old.max_chars_per_end, old.strip_html) == (16 * 128, True)


def test_scoring_tokenizes_long_texts_at_their_ends_into_the_same_ids():
    """Infer tokenizes a long text only at the ends truncation keeps (exact_lengths=False): the ids
    must be those of the whole text, for every strategy, on IMDb reviews and on texts made to break
    it (no spaces, CJK, emoji, accents, words over WordPiece's 100 characters, [MASK], ends too
    short to hold what they must keep)."""
    import random

    from bertjob.sources import open_corpus
    from bertjob.text import clean_text

    enc = models.load_encoder(models.EMBEDDED)
    assert enc.word_local
    corpus = open_corpus("imdb-sample")
    tables = [b for u in corpus.units for b in corpus.read(u, False)]
    reviews = [clean_text(t) for b in tables for t in b.column("text").to_pylist()][:1500]
    rng = random.Random(0)
    odd = ["東京大学の研究", "😀😀😀", "naïve café", "!!!!!!", "1234567890", "[MASK]", "x" * 150, "U.S.A.", "e\u0301", "a"]  # fmt: skip
    made = [" ".join(rng.choices(odd + reviews[i].split()[:20], k=rng.randint(1, 300))) for i in range(300)]
    texts = [*reviews, *made, "東京" * 400, "x" * 3000, "a " * 1000, "a" * 10 + " " + "b" * 2000, None]
    present = [t for t in texts if t is not None]
    rows = [e.ids for e in enc.backend.encode_batch(present, add_special_tokens=False)]
    full = np.array([len(r) + 2 for r in rows] + [0])
    cut_early = 0
    for max_length, truncation, head in [(16, "head+tail", 13), (64, "head", 1), (64, "tail", 1),
                                         (128, "head+tail", 32), (512, "head+tail", 128)]:  # fmt: skip
        budget = max_length - 2
        keep = {"head": (budget, 0), "tail": (0, budget)}.get(truncation, (head, budget - head))
        whole = [r if len(r) <= budget else r[: keep[0]] + r[len(r) - keep[1] :] for r in rows]
        ends, lower = encode_texts(texts, enc, max_length, truncation, head, exact_lengths=False)
        expected = [[enc.cls_id, *r, enc.sep_id] for r in whole] + [[]]
        assert ends.to_pylist() == expected, (max_length, truncation)
        assert ((lower > max_length) == (full > max_length)).all() and (lower <= full).all()
        cut_early += int((lower < full).sum())
    assert cut_early > 2500  # most long texts really were tokenized at their ends only


def test_only_word_by_word_tokenizers_are_cut_before_tokenizing():
    import json

    spec = json.loads(models.load_encoder(models.EMBEDDED).spec)
    assert models.is_word_local(spec)  # BERT: BertNormalizer, BertPreTokenizer
    for key, value in [
        ("pre_tokenizer", {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}),
        ("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}),
        ("normalizer", {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Replace", "pattern": {"String": "a b"}, "content": "c"}]}),
        ("added_tokens", [{"content": "new york", "special": False}]),
    ]:  # fmt: skip
        assert not models.is_word_local({**spec, key: value}), key


def test_printable_ascii_texts_take_a_faster_tokenizer_to_the_same_ids():
    """BERT's normalizer took 30% of tokenizing; a text of printable ASCII alone skips it for its
    lowercasing alone (Encoder.plain). The ids must be the tokenizer's own, uncased and cased, for
    every such character, and texts that must not take the shortcut keep the normalizer."""
    import json

    from bertjob.sources import open_corpus

    uncased = models.load_encoder(models.EMBEDDED)
    spec = json.loads(uncased.spec)
    spec["normalizer"] = {**spec["normalizer"], "lowercase": False}
    cased = models.Encoder(json.dumps(spec), uncased.cls_id, uncased.sep_id)
    every = "".join(map(chr, range(32, 127)))
    corpus = open_corpus("imdb-sample")
    tables = [b for u in corpus.units for b in corpus.read(u, False)]
    reviews = [t for b in tables for t in b.column("text").to_pylist()][:300]
    texts = [every, every.upper(), "Hello WORLD [MASK] [CLS] It's 10:30 p.m., #1!", "", " ", "tab\there",
             "line\nbreak", "bell\x07 esc\x1b del\x7f", "Naïve CAFÉ", "東京 Tokyo", "e\u0301", "nb\u00a0sp", *reviews]  # fmt: skip
    shortcut = [models.is_plain(t) for t in texts]
    assert 200 < sum(shortcut) < len(texts) - 8  # IMDb reviews mostly take it; the odd texts do not
    for enc in (uncased, cased, pickle.loads(pickle.dumps(cased))):
        assert enc.plain is not None
        assert enc.ids(texts) == [e.ids for e in enc.backend.encode_batch(texts, add_special_tokens=False)]
    assert models.Encoder(json.dumps({**spec, "normalizer": None}), 1, 2).plain is None
