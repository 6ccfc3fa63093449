"""The training step without Ray: collate, optimizer groups, schedule, precision, loss going down."""

import math

import numpy as np
import pytest
import torch

from bertjob import models
from bertjob.training import (
    NonFiniteLossError,
    Stepper,
    collate,
    group_by_length,
    lr_factor,
    make_optimizer,
    param_groups,
    predict_batches,
)


def test_collate_pads_to_the_longest_in_the_batch():
    batch = {
        "input_ids": np.array([np.array([2, 5, 3]), np.array([2, 3])], dtype=object),
        "length": np.array([3, 2]),
        "label": np.array([1, 0]),
    }
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [1, 0]
    assert collate(batch, pad_id=0, multiple_of=8)["input_ids"].shape == (2, 8)


def test_param_groups_decay_lr_by_depth_and_skip_weight_decay_on_bias_and_layernorm(tiny_model_dir):
    model = models.load_classifier(tiny_model_dir)
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, layer_lr_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    wd_of = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert lr_of["classifier.weight"] == pytest.approx(1e-3)
    assert lr_of["bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(5e-4)
    assert lr_of["bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(2.5e-4)
    assert lr_of["bert.embeddings.word_embeddings.weight"] == pytest.approx(1.25e-4)
    assert wd_of["classifier.bias"] == 0.0 and wd_of["bert.embeddings.LayerNorm.weight"] == 0.0
    assert wd_of["classifier.weight"] == 0.01
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    class Wrapped(torch.nn.Module):  # what DDP looks like from outside: the model under .module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    wrapped = param_groups(Wrapped(model), lr=1e-3, weight_decay=0.01, layer_lr_decay=0.5)
    assert [g["lr"] for g in wrapped] == [g["lr"] for g in groups]


def test_linear_warmup_then_decay():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == 0.0


def _batches(tok, n=4):
    rng = np.random.default_rng(0)
    good, bad = "great wonderful superb loved", "awful terrible boring hated"
    out = []
    for _ in range(n):
        labels = rng.integers(0, 2, 16)
        texts = [(good if y else bad) + " the movie" for y in labels]
        enc = tok(texts)
        out.append(
            {"input_ids": np.array([np.array(x) for x in enc["input_ids"]], dtype=object), "label": labels}
        )
    return out


@pytest.mark.parametrize("precision", ["off", "bf16"])
def test_steps_reduce_the_loss(tiny_model_dir, precision):
    torch.manual_seed(0)
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_classifier(tiny_model_dir)
    opt = make_optimizer(model, 3e-3, 0.0, 1.0)
    stepper = Stepper(model, opt, torch.device("cpu"), precision, max_grad_norm=1.0, grad_accum_steps=2)
    data = [collate(b, tok.pad_token_id) for b in _batches(tok)]
    first, _ = stepper.step(data[:2], 0)
    for i in range(30):
        last, norm = stepper.step(data[(i % 2) * 2 : (i % 2) * 2 + 2], i + 1)
    assert last < first * 0.5 and math.isfinite(norm)
    probs, labels, loss = predict_batches(model, data, torch.device("cpu"), precision)
    assert ((probs > 0.5) == labels).mean() == 1.0


def test_non_finite_loss_stops_with_the_step(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_classifier(tiny_model_dir)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    stepper = Stepper(model, make_optimizer(model, 1e-3, 0.0, 1.0), torch.device("cpu"))
    with pytest.raises(NonFiniteLossError, match="step 7"):
        stepper.step([collate(_batches(tok, 1)[0], tok.pad_token_id)], 7)


def test_group_by_length_uses_every_row_once_with_less_padding_and_a_fixed_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=300)
    ids = np.empty(300, dtype=object)
    ids[:] = [np.arange(n) for n in lengths]
    groups = [
        {"input_ids": ids[i : i + 64], "length": lengths[i : i + 64], "label": np.arange(i, min(i + 64, 300))}
        for i in range(0, 300, 64)
    ]
    out = list(group_by_length(iter(groups), batch_size=16, seed=3))
    seen = np.concatenate([b["label"] for b in out])
    assert sorted(seen.tolist()) == list(range(300))
    assert all(len(b["label"]) <= 16 for b in out) and len(out) == sum(
        -(-len(g["label"]) // 16) for g in groups
    )
    grouped_width = sum(b["length"].max() * len(b["label"]) for b in out)
    random_width = sum(lengths[i : i + 16].max() * len(lengths[i : i + 16]) for i in range(0, 300, 16))
    assert grouped_width < 0.8 * random_width
    again = list(group_by_length(iter(groups), batch_size=16, seed=3))
    assert all(np.array_equal(x["label"], y["label"]) for x, y in zip(out, again))
    # rows keep their own ids and labels together
    assert all(len(r) == n for b in out for r, n in zip(b["input_ids"], b["length"]))


def test_collate_pads_arrow_numpy_and_2d_rows_alike():
    import pyarrow as pa

    rng = np.random.default_rng(0)
    rows = [rng.integers(5, 50, size=n).astype(np.int32) for n in (3, 0, 7, 1, 7)]
    want = np.zeros((5, 8), dtype=np.int64)
    for i, r in enumerate(rows):
        want[i, : len(r)] = r
    arrow = pa.array([[9, 9]] + [r.tolist() for r in rows], pa.list_(pa.int32())).slice(1)  # sliced, as taken
    objects = np.empty(5, dtype=object)
    objects[:] = rows
    for layout in (arrow, pa.chunked_array([arrow.slice(0, 2), arrow.slice(2)]), objects):
        out = collate({"input_ids": layout}, pad_id=0, multiple_of=8)
        assert out["input_ids"].tolist() == want.tolist()
        assert out["attention_mask"].sum(1).tolist() == [3, 0, 7, 1, 7]
    square = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert collate({"input_ids": square}, pad_id=0)["input_ids"].tolist() == square.tolist()
