"""The training step without Ray: collate, optimizer groups, schedule, precision, loss going down,
the data order, the split of a global batch across workers, and the checkpoint save/load pair."""

import math

import numpy as np
import pytest
import torch

from bertjob import checkpoint, models
from bertjob.training import (
    IGNORE,
    SplitRows,
    Stepper,
    collate,
    epoch_batches,
    lr_factor,
    make_optimizer,
    param_groups,
    predict_batches,
    worker_micro_batches,
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
    stepper = Stepper(model, opt, torch.device("cpu"), precision, max_grad_norm=1.0)
    data = [collate(b, tok.pad_token_id) for b in _batches(tok)]
    stepper.step(data[:2], 32, 0)
    first, _ = stepper.take_stats()
    for i in range(30):
        stepper.step(data[(i % 2) * 2 : (i % 2) * 2 + 2], 32, i + 1)
        last, norm = stepper.take_stats()
    assert last < first * 0.5 and math.isfinite(norm)
    probs, labels, loss = predict_batches(model, data, torch.device("cpu"), precision)
    assert ((probs > 0.5) == labels).mean() == 1.0


def test_a_non_finite_loss_is_recorded_with_its_step_on_the_device(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_classifier(tiny_model_dir)
    stepper = Stepper(model, make_optimizer(model, 1e-3, 0.0, 1.0), torch.device("cpu"))
    batch = collate(_batches(tok, 1)[0], tok.pad_token_id)
    stepper.step([batch], 16, 6)
    assert stepper.first_nonfinite_step() == -1
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    stepper.step([batch], 16, 7)
    stepper.step([batch], 16, 8)
    assert stepper.first_nonfinite_step() == 7  # the first bad step, read when the caller chooses


def test_the_gradient_is_the_global_batch_mean_however_workers_and_micro_batches_split_it(tiny_model_dir):
    """What makes weights independent of num_workers: each worker's rows weigh world / batch rows,
    and DDP averages; here the workers' gradients are averaged by hand."""
    tok = models.load_tokenizer(tiny_model_dir)
    host = _batches(tok, 1)[0]  # 16 rows
    rows = np.arange(11)  # a short global batch: 11 rows over 3 workers, micro-batches of at most 2

    def grads(world: int, micro: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = models.load_classifier(tiny_model_dir)
        model.eval()  # no dropout: the comparison is about the weighting
        total = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(world):
            parts = worker_micro_batches(rows, rank, world, micro)
            assert len(parts) == len(worker_micro_batches(rows, 0, world, micro))
            for part in parts:
                model.zero_grad()
                logits = model(
                    **{
                        k: v
                        for k, v in collate({k: v[part] for k, v in host.items()}, 0).items()
                        if k != "labels"
                    }
                ).logits
                ce = torch.nn.functional.cross_entropy(
                    logits, torch.as_tensor(host["label"][part]), reduction="sum"
                )
                (ce * world / len(rows)).backward()
                total = [t + p.grad / world for t, p in zip(total, model.parameters())]
        return total

    one, three = grads(1, 16), grads(3, 2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, three))


def test_an_ignored_row_weighs_nothing(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    host = _batches(tok, 1)[0]
    filler = collate({**host, "label": np.full(16, IGNORE)}, 0)
    model = models.load_classifier(tiny_model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=1.0), torch.device("cpu"))
    stepper.step([filler], 16, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_epoch_order_uses_every_row_once_pads_little_and_depends_on_seed_and_epoch_only():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=300)
    batches = epoch_batches(lengths, batch_size=16, seed=3, epoch=0, length_grouping=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(300))
    assert [len(b) for b in batches] == [16] * 18 + [12]  # only the last is short
    assert all(np.array_equal(a, b) for a, b in zip(batches, epoch_batches(lengths, 16, 3, 0, 4)))
    assert not np.array_equal(np.concatenate(batches), np.concatenate(epoch_batches(lengths, 16, 3, 1, 4)))
    grouped_width = sum(lengths[b].max() * len(b) for b in batches)
    plain = epoch_batches(lengths, 16, 3, 0, 1)
    assert grouped_width < 0.8 * sum(lengths[b].max() * len(b) for b in plain)
    # a streamed split: rows shuffled within windows, so a run of batches reads one or two windows
    windowed = epoch_batches(lengths, 16, 3, 0, 1, windows=[(0, 100), (100, 200), (200, 300)])
    order = np.concatenate(windowed)
    assert sorted(order.tolist()) == list(range(300))
    assert len(set(order[:96] // 100)) == 1 and all(len(set(b // 100)) <= 2 for b in windowed)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_a_global_batch_is_shared_by_the_workers_row_for_row(world):
    batch = np.arange(100, 107)  # 7 rows
    parts = [worker_micro_batches(batch, r, world, micro_batch_size=2) for r in range(world)]
    assert sorted(np.concatenate([p for ps in parts for p in ps]).tolist()) == batch.tolist()
    assert len({len(ps) for ps in parts}) == 1  # the same number of micro-batches everywhere (DDP)
    assert all(len(p) <= 2 for ps in parts for p in ps)


def test_split_rows_reads_rows_by_index_with_a_bounded_cache(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "train"
    d.mkdir()
    for s in range(3):
        ids = [list(range(s * 10 + i, s * 10 + i + 3)) for i in range(10)]
        pq.write_table(pa.table({"id": [f"{s}-{i}" for i in range(10)], "label": [i % 2 for i in range(10)],
                                 "input_ids": pa.array(ids, pa.list_(pa.int32())), "length": [3] * 10}),
                       d / f"part-{s}.parquet")  # fmt: skip
    rows = SplitRows(str(d), cache_rows=10)
    assert len(rows) == 30 and rows.windows(15) == [(0, 20), (20, 30)]
    got = rows.take(np.array([25, 3, 14]))
    assert [r.tolist() for r in got["input_ids"]] == [[25, 26, 27], [3, 4, 5], [14, 15, 16]]
    assert got["label"].tolist() == [1, 1, 0] and len(rows._shards) == 1


def test_a_checkpoint_restores_what_it_saved_field_by_field(tiny_model_dir, tmp_path):
    tok = models.load_tokenizer(tiny_model_dir)
    batch = collate(_batches(tok, 1)[0], tok.pad_token_id)

    def make():
        torch.manual_seed(0)
        model = models.load_classifier(tiny_model_dir)
        opt = make_optimizer(model, 1e-3, 0.01, 0.9)
        return model, opt, torch.amp.GradScaler("cpu", init_scale=1024.0)

    model, opt, scaler = make()
    stepper = Stepper(model, opt, torch.device("cpu"), "fp16", scaler=scaler)
    for i in range(3):
        stepper.step([batch], 16, i)
    best = {k: v * 0 + 1 for k, v in model.state_dict().items()}
    state = checkpoint.TrainState(step=3, epoch=1, step_in_epoch=1, schedule_start=2, best_val_accuracy=0.75,
                                  best_epoch=0, history=[{"type": "eval", "step": 2}], samples_seen=48,
                                  resumed_at_steps=[1])  # fmt: skip
    checkpoint.save(
        str(tmp_path), model, opt, scaler, state, best, best_is_current=False, final={"test": {"a": 1}}
    )

    model2, opt2, scaler2 = make()
    state2, best2 = checkpoint.load(str(tmp_path), model2, opt2, scaler2)
    assert state2 == state
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert set(best2) == set(best) and all(torch.equal(best[k], best2[k]) for k in best)
    assert scaler2.state_dict() == scaler.state_dict()
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert all(torch.equal(s1["state"][k][f], s2["state"][k][f]) for k in s1["state"] for f in s1["state"][k])
    assert checkpoint.read_final(str(tmp_path))["test"] == {"a": 1}
    # the best weights saved as "the current ones" come back as a copy of the model
    checkpoint.save(str(tmp_path / "b"), model, opt, scaler, state, best, best_is_current=True)
    _, best3 = checkpoint.load(str(tmp_path / "b"), model2, opt2, scaler2)
    assert all(torch.equal(best3[k], v) for k, v in model.state_dict().items())


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
