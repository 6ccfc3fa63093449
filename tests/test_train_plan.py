"""The train driver's decisions without Ray: CPUs and micro-batch per worker, the default lr."""

import pytest

from bertjob import train
from bertjob.config import PretrainConfig, TrainConfig

MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536, "num_attention_heads": 12,
          "vocab_size": 30522}  # fmt: skip
GIB = 2**30


def plan(nodes, **kw):
    return train.plan_workers(
        TrainConfig(data="d", output="o", **kw), nodes, MINILM, kw.pop("max_length", 512)
    )


def test_a_local_machine_is_split_across_the_workers():
    node = {"CPU": 2.0, "memory": 16 * GIB}
    assert plan([node], num_workers=1)[0].cpus == 2  # finding 13.3b: it used to be 1, half the machine
    assert plan([node], num_workers=2)[0].cpus == 1
    assert plan([{"CPU": 16.0, "memory": 64 * GIB}], num_workers=3)[0].cpus == 5
    assert plan([node], num_workers=2, cpus_per_worker=0.5)[0].cpus == 0.5  # explicit wins


def test_on_a_cluster_a_worker_gets_its_nodes_cpus_per_worker_or_per_gpu():
    head = {"CPU": 0.0, "memory": 8 * GIB}
    cpu_nodes = [head] + [{"CPU": 8.0, "memory": 32 * GIB}] * 2
    assert plan(cpu_nodes, num_workers=4)[0].cpus == 4  # 2 workers per 8-CPU node
    gpu_nodes = [head, {"CPU": 32.0, "GPU": 4.0, "memory": 200 * GIB}]
    p, problems = plan(gpu_nodes, num_workers=4, use_gpu=True)
    assert p.cpus == 8 and p.micro_batch_size == 8 and not problems  # GPU: the share of the batch


def test_the_micro_batch_fits_the_workers_memory_and_the_global_batch_stays():
    roomy, problems = plan([{"CPU": 2.0, "memory": 24 * GIB}], num_workers=2)
    assert roomy.micro_batch_size == 16 and not problems  # the whole share of 32
    tight, problems = plan([{"CPU": 2.0, "memory": 6 * GIB}], num_workers=2)
    assert not problems
    assert tight.micro_batch_size == 1  # shrunk to what fits 6 GiB at 512 (roomy: 16), not to nothing
    assert tight.memory_estimate <= tight.memory_budget
    assert train.memory_estimate(MINILM, 512, tight.micro_batch_size + 1) > tight.memory_budget
    _, problems = plan([{"CPU": 2.0, "memory": 1 * GIB}], num_workers=2)
    assert len(problems) == 1 and "needs ~" in problems[0] and "GiB" in problems[0]


def test_activation_memory_grows_with_length_and_batch():
    fixed = train.memory_estimate(MINILM, 128, 0)
    assert (
        0.85 * GIB < fixed < 2.0 * GIB
    )  # a plain process holds ~0.85-0.9 GiB for MiniLM, a Ray Train worker more
    # Measured: rank 0 of the default pipeline at 512 (13 sequences per micro-batch) peaked at 6.86 GiB.
    assert 6.86 * GIB <= train.memory_estimate(MINILM, 512, 13) < 1.15 * 6.86 * GIB
    per_seq = {n: train.memory_estimate(MINILM, n, 1) - fixed for n in (128, 256, 512)}
    assert per_seq[128] < per_seq[256] < per_seq[512]


@pytest.mark.parametrize("width, lr", [(384, 2e-4), (768, 5e-5), (1024, 2e-5)])
def test_the_default_lr_follows_the_model_width(width, lr):
    assert train.default_lr({"hidden_size": width}) == lr


def test_a_run_stopped_before_its_first_evaluation_reports_its_last_steps_model():
    """--max-steps 6 in a 18-step epoch: the log said 'best epoch 0, val accuracy -1.0000' (the
    placeholders of no evaluation), and the pipeline summary 'val acc -1.0000'."""
    last = {"best_epoch": None, "best_val_accuracy": 0.5, "steps": 6, "test": {"accuracy": 0.55}}
    assert train.result_line(last) == (
        "no evaluation during training: the model of its last step (6), val accuracy 0.5000, test accuracy 0.5500"
    )
    best = {"best_epoch": 1, "best_val_accuracy": 0.75, "steps": 36, "test": None}
    assert train.result_line(best) == "best epoch 2, val accuracy 0.7500, test accuracy n/a"


def test_a_tracking_that_cannot_log_is_a_setup_problem(monkeypatch):
    """`--tracking mlflow` without mlflow failed every worker with an ImportError after the model had
    loaded; TensorBoard with the output in object storage logged nothing, without a word."""
    import importlib.util

    assert train.tracking_problems(TrainConfig(data="d", output="o")) == []
    assert (
        "object storage"
        in train.tracking_problems(TrainConfig(data="d", output="s3://b/o", tracking="tensorboard"))[0]
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert train.tracking_problems(TrainConfig(data="d", output="o", tracking="mlflow")) == [
        "tracking mlflow: mlflow is not installed (pip install mlflow), or use --tracking none"
    ]


def test_padding_past_the_models_positions_is_a_setup_problem(monkeypatch):
    """`--pad-to-multiple-of 3` at max_length 512 padded the longest batches to 513 tokens: every
    worker failed with 'The expanded size of the tensor (513) must match the existing size (512)'."""
    from bertjob import cluster

    monkeypatch.setattr(cluster, "alive_nodes", lambda: [{"CPU": 2.0, "memory": 16 * GIB}])
    model = {**MINILM, "max_position_embeddings": 512}
    for m in (0, 8, 64, 512):
        train.plan_run(
            TrainConfig(data="d", output="o", pad_to_multiple_of=m, check_resources=False), model, 512
        )
    train.plan_run(TrainConfig(data="d", output="o", pad_to_multiple_of=3, check_resources=False), model, 510)
    with pytest.raises(
        train.TrainSetupError, match="pad_to_multiple_of 3 pads sequences of max_length 512 to 513 "
    ):
        train.plan_run(
            TrainConfig(data="d", output="o", pad_to_multiple_of=3, check_resources=False), model, 512
        )


def test_a_roberta_holds_two_positions_fewer_than_its_embeddings(monkeypatch):
    from bertjob import cluster

    monkeypatch.setattr(cluster, "alive_nodes", lambda: [{"CPU": 2.0, "memory": 16 * GIB}])
    roberta = {**MINILM, "model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}
    cfg = TrainConfig(data="d", output="o", check_resources=False)
    train.plan_run(cfg, roberta, 512)
    with pytest.raises(
        train.TrainSetupError, match=r"has positions for \(512\): prepare it with --max-length 512"
    ):
        train.plan_run(cfg, roberta, 514)


def test_a_distilbert_is_planned_by_its_own_sizes(tmp_path):
    """DistilBERT names its sizes dim / n_layers / n_heads / hidden_dim: the plan read none of them
    and took a 384-wide, 6-layer one for BERT-base (lr 5e-5, twice the layers' activations)."""
    from transformers import DistilBertConfig

    from bertjob import models

    DistilBertConfig(vocab_size=30522, dim=384, n_layers=6, n_heads=12, hidden_dim=1536).save_pretrained(
        tmp_path
    )
    config = models.model_config(str(tmp_path))
    assert train.default_lr(config) == train.default_lr(MINILM) == 2e-4
    assert train.memory_estimate(config, 512, 8) == train.memory_estimate(MINILM, 512, 8)


def test_too_few_steps_are_warned_of_unless_max_steps_cut_the_run():
    """Any --max-steps silenced the warning, also one the epochs never reach: --max-steps 30 trained
    21 steps without a word. A --max-steps that cuts the run short is the user's choice."""
    cfg = TrainConfig(data="d", output="o", epochs=1)  # 648 rows in global batches of 32: 21 steps
    assert train.few_steps(cfg, "648 rows", 21, False).startswith(
        "only 21 optimizer steps (648 rows / batch_size 32 x 1 epochs): "
    )
    capped = TrainConfig(data="d", output="o", epochs=1, max_steps=30)
    unreached = train.few_steps(capped, "648 rows", 21, False)
    assert unreached == ("only 21 optimizer steps (648 rows / batch_size 32 x 1 epochs; --max-steps 30 is never "
                         "reached): fine-tuning a BERT usually needs at least ~100; the model may learn little. Use "
                         "more data, more --epochs or a smaller --batch-size")  # fmt: skip
    for epochs, max_steps, steps in ((1, 5, 5), (5, 500, 105)):
        run = TrainConfig(data="d", output="o", epochs=epochs, max_steps=max_steps)
        assert train.few_steps(run, "648 rows", steps, False) is None


def test_the_few_steps_advice_names_the_pipeline_s_flags_in_the_pipeline():
    """Inside `bertjob pipeline` the advice named --epochs, --batch-size and --max-steps, which the
    pipeline refuses (its flags are --train.epochs ...)."""
    capped = TrainConfig(data="d", output="o", epochs=1, max_steps=30)
    assert train.few_steps(capped, "648 rows", 21, True) == (
        "only 21 optimizer steps (648 rows / batch_size 32 x 1 epochs; --train.max-steps 30 is never reached): "
        "fine-tuning a BERT usually needs at least ~100; the model may learn little. Use more data, more "
        "--train.epochs or a smaller --train.batch-size"
    )


def test_a_pretrain_run_of_too_few_steps_is_warned_of_in_its_own_flags():
    """Pretrain said nothing of too few steps: 600 packed sequences, 1 epoch, batches of 32 is 19."""
    cfg = PretrainConfig(data="d", output="o")
    assert train.few_steps(cfg, "600 packed sequences", 19, True) == (
        "only 19 optimizer steps (600 packed sequences / batch_size 32 x 1 epochs): masked-LM pre-training a "
        "BERT usually needs at least ~100; the model may learn little. Use more data, more --pretrain.epochs or "
        "a smaller --pretrain.batch-size"
    )
    assert (
        train.few_steps(PretrainConfig(data="d", output="o", max_steps=19), "600 packed sequences", 19, True)
        is None
    )
