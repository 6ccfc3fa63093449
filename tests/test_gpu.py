"""The GPU path (skipped without CUDA): a few training steps in bf16 and in fp16 with the grad
scaler, scoring on the device, and a 1-worker `bertjob train` with use_gpu."""

import math

import numpy as np
import pytest
import torch

from bertjob import models
from bertjob.training import Stepper, collate, make_optimizer, predict_batches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _batch(tok, device, n=16):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    texts = [
        ("great wonderful superb loved" if y else "awful terrible boring hated") + " the movie"
        for y in labels
    ]
    ids = np.empty(n, dtype=object)
    ids[:] = [np.array(x) for x in tok(texts)["input_ids"]]
    return collate({"input_ids": ids, "label": labels}, tok.pad_token_id, 8, device)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_and_scoring_on_the_gpu(tiny_model_dir, precision):
    device = torch.device("cuda")
    tok = models.load_tokenizer(tiny_model_dir)
    model = models.load_classifier(tiny_model_dir).to(device)
    stepper = Stepper(model, make_optimizer(model, 3e-3, 0.0, 1.0), device, precision)
    assert (stepper.scaler is not None) == (precision == "fp16")
    batch = _batch(tok, device)
    stepper.step([batch], 16, 0)
    first, _ = stepper.take_stats()
    for i in range(1, 30):
        stepper.step([batch], 16, i)
    last, norm = stepper.take_stats()
    assert stepper.first_nonfinite_step() == -1 and math.isfinite(norm)
    assert last / 29 < first  # mean loss of the later steps below the first step's
    probs, labels, _ = predict_batches(model, [batch], device, precision)
    assert ((probs > 0.5) == labels).mean() == 1.0


@pytest.mark.integration
def test_bertjob_train_on_one_gpu(prepared_small, tiny_model_dir, tmp_path):
    from bertjob import train
    from bertjob.config import TrainConfig

    m = train.run(TrainConfig(data=str(prepared_small), output=str(tmp_path / "run"), model=tiny_model_dir,
                              num_workers=1, use_gpu=True, epochs=1, batch_size=16, lr=5e-3,
                              storage_path=str(tmp_path / "ckpt"), name="gpu"))  # fmt: skip
    assert m["steps"] == 12 and m["precision"] in ("bf16", "fp16") and m["test"]["count"] == 80
