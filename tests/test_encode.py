"""Tokenizing batches without Ray: truncation, special tokens, quarantine reasons, split hashes."""

import pickle

import pyarrow as pa

from bertjob import models
from bertjob.config import PrepareConfig
from bertjob.prepare import encode_texts, row_hash, tokenize_batch

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
    out = tokenize_batch(batch, cfg, models.load_encoder(tiny_model_dir))
    assert out.column("reason").to_pylist() == [None, "null_text", "empty_text", "unrecognised_label", None]
    assert out.column("label").to_pylist() == [1, 0, 0, None, 1]
    tok = models.load_tokenizer(tiny_model_dir)
    assert _words(tok, out.column("input_ids")[0].as_py()) == ["[CLS]", "a", "b", "&", "c", "[SEP]"]
    assert out.column("length").to_pylist() == [6, 0, 0, 0, 4]
    # train rows with a label carry their split hash; others 0
    seed = cfg.seed
    assert out.column("h").to_pylist() == [
        row_hash(seed, "r1"),
        row_hash(seed, "r2"),
        row_hash(seed, "r3"),
        0,
        0,
    ]
