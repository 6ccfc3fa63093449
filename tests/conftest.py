"""Shared fixtures: a tiny BERT (random weights, vocabulary built here), small corpora, one local Ray."""

from __future__ import annotations

import json
import os
import random
import tarfile
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BERTJOB_CACHE", tempfile.mkdtemp(prefix="bertjob-test-cache-"))  # not ~/.cache

POS_WORDS = "great wonderful superb loved brilliant excellent moving fun beautiful best".split()
NEG_WORDS = "awful terrible boring hated worst dull poor waste bad stupid".split()
FILLER = "the a movie film was is and it this plot acting story of to i with but".split()


def review(rng: random.Random, positive: bool, words: int = 40) -> str:
    strong = POS_WORDS if positive else NEG_WORDS
    out = [rng.choice(strong) if rng.random() < 0.3 else rng.choice(FILLER) for _ in range(words)]
    return " ".join(out) + " <br /><br />" + rng.choice(strong) + " &amp; " + rng.choice(FILLER) + "."


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer BERT with a word-level vocabulary of our review words: a real HF model directory."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + sorted(set(POS_WORDS + NEG_WORDS + FILLER)) + letters + ["##" + c for c in letters]
    vocab += [".", ",", "&", "!", "?", "'", ";", ":", "-", "(", ")", '"', "<", ">", "/"] + [
        str(i) for i in range(10)
    ]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )  # fmt: skip
    BertModel(config).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny BERT with a (random) classification head, as infer expects."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    d = tmp_path_factory.mktemp("tiny-clf")
    model = BertForSequenceClassification.from_pretrained(
        tiny_model_dir,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(d)
    (d / "bertjob.json").write_text(
        json.dumps({"max_length": 64, "truncation": "head+tail", "head_tokens": 16, "strip_html": True})
    )
    return str(d)


def kill_session(pid: int) -> None:
    """SIGKILL a process started with start_new_session=True and everything in its session: the
    driver, and the local Ray it started (Ray workers get process groups of their own)."""
    import subprocess

    subprocess.run(["pkill", "-KILL", "-s", str(pid)], check=False)


def make_imdb_dir(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """The canonical aclImdb layout with synthetic reviews: {'train': n, 'test': n, 'unsup': n}."""
    rng = random.Random(seed)
    base = root / "aclImdb"
    rid = 0
    for split in ("train", "test"):
        for pol in ("pos", "neg"):
            (base / split / pol).mkdir(parents=True, exist_ok=True)
            for _ in range(per_class.get(split, 0)):
                rating = rng.choice([7, 8, 9, 10]) if pol == "pos" else rng.choice([1, 2, 3, 4])
                (base / split / pol / f"{rid}_{rating}.txt").write_text(review(rng, pol == "pos"))
                rid += 1
    if per_class.get("unsup"):
        (base / "train" / "unsup").mkdir(parents=True, exist_ok=True)
        for _ in range(per_class["unsup"]):
            (base / "train" / "unsup" / f"{rid}_0.txt").write_text(review(rng, rng.random() < 0.5))
            rid += 1
    return base


def tar_dir(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=src.name)
    return dest


@pytest.fixture(scope="session")
def imdb_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic IMDb layout: 100 + 100 train, 40 + 40 test, 30 unsup."""
    return make_imdb_dir(tmp_path_factory.mktemp("imdb"), {"train": 100, "test": 40, "unsup": 30})


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process integration tests (2 CPUs, as in CI)."""
    import ray

    ray.init(address="local", num_cpus=2, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared_small(
    imdb_small: Path, tiny_model_dir: str, ray_local, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from bertjob import prepare
    from bertjob.config import PrepareConfig

    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare.run(
        PrepareConfig(
            input=str(imdb_small), output=str(out), model=tiny_model_dir, max_length=64, head_tokens=16
        )
    )
    return out
