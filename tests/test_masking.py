"""Masked-LM inputs without Ray: packing prepared rows into sequences, BERT's masking rule, and a tiny
BERT whose masked-LM loss falls when trained on them."""

import numpy as np
import pytest
import torch

from bertjob.masking import IGNORE_INDEX, MaskedLMLoss, Masker, MaskingRule, pack_sequences, sparse_targets

CLS, SEP, PAD, MASK, UNK = 2, 3, 0, 4, 1
SPECIALS = (PAD, UNK, CLS, SEP, MASK)


def rows(*bodies):
    out = np.empty(len(bodies), dtype=object)
    out[:] = [np.array([CLS, *b, SEP], dtype=np.int32) for b in bodies]
    return out


def test_packing_keeps_every_token_in_order_with_a_sep_after_each_review():
    batch = {"input_ids": rows([10, 11, 12], [20, 21]), "truncated": np.array([False, False])}
    out = pack_sequences(batch, max_length=4, cls_id=CLS, sep_id=SEP)
    seqs = [list(s) for s in out["input_ids"]]
    assert seqs == [[CLS, 10, 11, 12], [CLS, SEP, 20, 21], [CLS, SEP]]
    assert list(out["length"]) == [4, 4, 2]


def test_packing_marks_the_seam_of_a_head_plus_tail_truncated_review():
    batch = {"input_ids": rows([10, 11, 90, 91], [20, 21, 22]), "truncated": np.array([True, False])}
    out = pack_sequences(batch, max_length=64, cls_id=CLS, sep_id=SEP, seam_after=2)
    assert list(out["input_ids"][0]) == [CLS, 10, 11, SEP, 90, 91, SEP, 20, 21, 22, SEP]


def rule(vocab=1000, **kw):
    return MaskingRule(mask_id=MASK, special_ids=SPECIALS, vocab_size=vocab, **kw)


def batch_with_specials_and_padding(rng, n=64, width=128, vocab=1000):
    ids = torch.from_numpy(rng.integers(len(SPECIALS), vocab, size=(n, width)))
    lengths = rng.integers(width // 2, width + 1, size=n)
    mask = torch.from_numpy((np.arange(width)[None, :] < lengths[:, None]).astype(np.int64))
    ids[:, 0] = CLS
    ids[torch.arange(n), torch.from_numpy(lengths - 1)] = SEP
    ids[:, 40] = UNK
    ids[mask == 0] = PAD
    return ids, mask


def test_masking_follows_80_10_10_over_many_draws_and_never_touches_specials_or_padding():
    rng = np.random.default_rng(0)
    masker = Masker(rule())
    g = torch.Generator().manual_seed(0)
    chosen = maskable = to_mask = to_random = kept = 0
    for _ in range(40):
        ids, attn = batch_with_specials_and_padding(rng)
        out, labels = masker(ids, attn, g)
        special_or_pad = torch.isin(ids, torch.tensor(SPECIALS)) | (attn == 0)
        # never a special token or padding: neither predicted nor changed
        assert (labels[special_or_pad] == IGNORE_INDEX).all()
        assert torch.equal(out[special_or_pad], ids[special_or_pad])
        sel = labels != IGNORE_INDEX
        assert torch.equal(labels[sel], ids[sel])  # labels are the original tokens
        assert torch.equal(out[~sel], ids[~sel])  # nothing outside the chosen tokens changes
        assert not torch.isin(out[sel & (out != MASK)], torch.tensor(SPECIALS)).any()  # random: real tokens
        chosen += int(sel.sum())
        maskable += int((~special_or_pad).sum())
        to_mask += int((out[sel] == MASK).sum())
        kept += int((out[sel] == ids[sel]).sum())
        to_random += int(((out[sel] != MASK) & (out[sel] != ids[sel])).sum())
    # ~200k maskable tokens: the binomial standard errors are ~0.1% of each share
    assert chosen / maskable == pytest.approx(0.15, abs=0.003)
    assert to_mask / chosen == pytest.approx(0.80, abs=0.006)
    p_same = 1 / (1000 - len(SPECIALS))  # a random replacement may draw the token itself
    assert to_random / chosen == pytest.approx(0.10 * (1 - p_same), abs=0.005)
    assert kept / chosen == pytest.approx(0.10 + 0.10 * p_same, abs=0.005)


def test_whole_word_masking_takes_or_leaves_each_word_whole():
    vocab = 1000
    continuation = tuple(range(500, vocab))  # ids >= 500 play WordPiece '##' pieces
    masker = Masker(rule(vocab, continuation_ids=continuation, whole_word=True))
    rng = np.random.default_rng(1)
    g = torch.Generator().manual_seed(1)
    chosen = total = 0
    for _ in range(30):
        ids, attn = batch_with_specials_and_padding(rng, vocab=vocab)
        _, labels = masker(ids, attn, g)
        sel = (labels != IGNORE_INDEX).numpy()
        real = (~torch.isin(ids, torch.tensor(SPECIALS)) & (attn == 1)).numpy()
        ids_np = ids.numpy()
        for r in range(ids.shape[0]):
            for t in range(1, ids.shape[1]):
                if real[r, t] and ids_np[r, t] >= 500 and real[r, t - 1]:
                    assert sel[r, t] == sel[r, t - 1], "a piece was masked apart from its word"
        chosen += sel.sum()
        total += real.sum()
    assert chosen / total == pytest.approx(0.15, abs=0.01)  # each token is in with its word's 15%


def test_the_same_generator_seed_gives_the_same_masks():
    ids, attn = batch_with_specials_and_padding(np.random.default_rng(2))
    masker = Masker(rule())
    a = masker(ids, attn, torch.Generator().manual_seed(7))
    b = masker(ids, attn, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_tiny_bert_learns_masked_lm_on_a_synthetic_corpus(tiny_model_dir):
    """The pieces the pretrain workers run (pack, collate, mask, Stepper) lower the masked-LM loss."""
    import random

    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from bertjob.pretrain import masked_lm_loss
    from bertjob.training import Stepper, collate, make_optimizer
    from tests.conftest import review

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rr = random.Random(0)
    reviews = [tok(review(rr, rr.random() < 0.5))["input_ids"] for _ in range(200)]
    batch = {"input_ids": np.array([np.array(r) for r in reviews], dtype=object)}
    packed = pack_sequences(batch, 32, tok.cls_token_id, tok.sep_token_id)
    masker = Masker(MaskingRule.of(tok))
    mlm = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)  # a bare BertModel: the head starts fresh
    model = MaskedLMLoss(mlm)
    opt = make_optimizer(model, 3e-3, 0.01, 1.0)
    stepper = Stepper(model, opt, torch.device("cpu"), loss_fn=masked_lm_loss)

    def masked(idx, seed):
        b = collate({k: v[idx] for k, v in packed.items()}, tok.pad_token_id)
        b["input_ids"], labels = masker(
            b["input_ids"], b["attention_mask"], torch.Generator().manual_seed(seed)
        )
        return {**b, **sparse_targets(labels)}, labels

    held_out, held_out_labels = masked(np.arange(0, 32), seed=123)  # the same masks before and after

    @torch.no_grad()
    def loss():
        model.eval()
        return float(model(**held_out).loss)

    before = loss()
    # the head only at the predicted positions: the same loss as the model's own, logits everywhere
    with torch.no_grad():
        full = mlm(
            input_ids=held_out["input_ids"], attention_mask=held_out["attention_mask"], labels=held_out_labels
        )
    assert before == pytest.approx(float(full.loss), rel=1e-5)
    n = len(packed["input_ids"])
    for step in range(60):
        idx = np.random.default_rng(step).choice(np.arange(32, n), 16, replace=False)
        mb = masked(idx, seed=step)[0]
        stepper.step([mb], len(mb["masked_labels"]), step)
    after = loss()
    # ln(vocab) ~ 4.7 at the start; the corpus's own word entropy (~3.2) bounds it from below
    assert after < before - 0.6, (before, after)
