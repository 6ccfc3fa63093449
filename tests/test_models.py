"""Model and tokenizer resolution: the on-disk tokenizer record that spares jobs importing transformers."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bertjob import models

PROBE = """
import json, sys
from bertjob import models
info = models.tokenizer_info(sys.argv[1])
enc = models.load_encoder(sys.argv[1])
ids = enc.backend.encode("Great movie, awful plot", add_special_tokens=False).ids
print(json.dumps({"info": info, "ids": ids, "transformers": "transformers" in sys.modules}))
"""


def probe(model: str, cache: Path) -> dict:
    env = {"BERTJOB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE, model], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_cached_tokenizer_record_matches_transformers_and_skips_importing_it(tmp_path, tiny_model_dir):
    first = probe(tiny_model_dir, tmp_path / "cache")
    assert first["transformers"]  # nothing cached yet: loaded through transformers
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 1
    second = probe(tiny_model_dir, tmp_path / "cache")
    assert not second["transformers"]
    assert second == {**first, "transformers": False}
    tok = models.load_tokenizer(tiny_model_dir)
    assert second["info"]["fingerprint"] == models.tokenizer_fingerprint(tok)
    assert second["info"]["vocab_size"] == len(tok)
    assert second["ids"] == tok("Great movie, awful plot", add_special_tokens=False)["input_ids"]


def test_a_changed_tokenizer_file_gets_a_new_record(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = probe(str(model), tmp_path / "cache")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["do_lower_case"] = not cfg.get("do_lower_case", True)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    after = probe(str(model), tmp_path / "cache")
    assert after["transformers"]  # not served from the old record
    assert after["info"]["fingerprint"] != before["info"]["fingerprint"]
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 2


def test_an_unwritable_cache_only_costs_time(tmp_path, tiny_model_dir):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    first = probe(tiny_model_dir, blocker)
    again = probe(tiny_model_dir, blocker)
    assert first == again and again["transformers"]


def test_max_positions_is_what_the_models_position_embeddings_hold():
    """RoBERTa numbers positions from its padding id + 1: of roberta-base's 514 position embeddings,
    512 hold tokens. max_length 514 passed the check against max_position_embeddings, and the first
    batch that long failed every worker with an index error."""
    import pytest
    import torch
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    tiny = dict(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    for model in (RobertaModel(RobertaConfig(max_position_embeddings=18, pad_token_id=1, **tiny)),
                  BertModel(BertConfig(max_position_embeddings=16, **tiny))):  # fmt: skip
        usable = models.max_positions(model.config.to_dict())
        assert usable == 16
        model(input_ids=torch.full((1, usable), 5))
        with pytest.raises((IndexError, RuntimeError)):  # index out of range / out of bounds
            model(input_ids=torch.full((1, usable + 1), 5))
    assert (
        models.max_positions({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1})
        == 512
    )
    assert models.max_positions({"model_type": "distilbert"}) is None


def test_a_classifier_of_other_labels_gets_a_fresh_two_label_head_on_its_own_encoder(
    tiny_model_dir, tmp_path
):
    """A 3-class NLI checkpoint given to train failed every worker with transformers' size-mismatch
    RuntimeError after Ray Train had started; now its head is replaced (train's driver warns) and
    its encoder kept."""
    import torch
    from transformers import AutoModelForSequenceClassification

    nli = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=3, id2label={0: "entailment", 1: "neutral", 2: "contradiction"}
    )
    nli.save_pretrained(tmp_path / "nli")
    config = models.model_config(str(tmp_path / "nli"))
    assert models.other_head(config) == ["entailment", "neutral", "contradiction"]
    model = models.load_classifier(str(tmp_path / "nli"))
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert model.classifier.weight.shape[0] == 2
    assert torch.equal(
        model.bert.encoder.layer[0].output.dense.weight, nli.bert.encoder.layer[0].output.dense.weight
    )
    assert models.other_head({**config, "id2label": {"0": "NEGATIVE", "1": "POSITIVE"}}) == []
    assert models.other_head(models.model_config(tiny_model_dir)) == []  # a bare encoder has no head


def test_tokenizer_files_of_special_tokens_only_are_refused(tmp_path, tiny_model_dir):
    """BertTokenizerFast(vocab_file=...) (an argument transformers 5 ignores) saves a tokenizer of its
    5 special tokens: prepare, train and infer ran on texts that were all [UNK]."""
    import pytest
    from transformers import BertTokenizerFast

    shutil.copy(Path(tiny_model_dir) / "config.json", tmp_path / "config.json")
    BertTokenizerFast(vocab_file=str(tmp_path / "ignored.txt")).save_pretrained(tmp_path)
    with pytest.raises(
        models.ModelError, match=r"no vocabulary besides its 5 special tokens .*every word would be \[UNK\]"
    ):
        models.tokenizer_info(str(tmp_path))
    assert models.tokenizer_info(tiny_model_dir)["vocab_size"] > 5


HUB_PROBE = """
import json, sys
from bertjob import identity, models
try:
    tok = models.load_tokenizer(sys.argv[1])
    print(json.dumps({"vocab": len(tok), "fingerprint": identity.model_fingerprint(sys.argv[1])}))
except models.ModelError as err:
    print(json.dumps({"error": str(err)}))
"""


def test_a_hub_model_without_the_hub_is_the_local_caches_copy_or_an_error_at_once(tmp_path, tiny_model_dir):
    # An address where nothing listens: each load retried for ~25 s before failing (a minute per job).
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}",
               "BERTJOB_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}  # fmt: skip

        def probe_hub(name: str) -> dict:
            out = subprocess.run([sys.executable, "-c", HUB_PROBE, name], env=env, capture_output=True, text=True,
                                 check=True, cwd=Path(__file__).parent.parent, timeout=20)  # fmt: skip
            return json.loads(out.stdout.strip().splitlines()[-1])

        missing = probe_hub("bertjob-tests/tiny")
        assert "not in the local Hugging Face cache and the hub cannot be reached" in missing["error"]
        assert f"127.0.0.1:{closed.getsockname()[1]}" in missing["error"]
        # The same id once in the cache (as an earlier download left it): loaded from there.
        repo = tmp_path / "hf" / "hub" / "models--bertjob-tests--tiny"
        shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abcd")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abcd")
        cached = probe_hub("bertjob-tests/tiny")
    assert cached == {
        "vocab": len(models.load_tokenizer(tiny_model_dir)),
        "fingerprint": {"hub": "bertjob-tests/tiny"},
    }


def test_classifying_from_cls_alone_gives_the_whole_models_logits_and_gradients(tiny_model_dir):
    """The last layer computes only the [CLS] position its head reads: the same logits and the
    same gradients as the whole model, padded or not, under sdpa and eager attention."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    ids = torch.randint(5, 60, (3, 9))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = torch.tensor([0, 1, 1])
    for kernel in ("sdpa", "eager"):
        whole = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, attn_implementation=kernel)
        whole.eval()  # no dropout: the two must agree to rounding
        cls = copy.deepcopy(whole)
        assert models.classify_from_cls(cls)
        for m in (None, mask):
            out_whole = whole(input_ids=ids, attention_mask=m, labels=labels)
            out_cls = cls(input_ids=ids, attention_mask=m, labels=labels)
            torch.testing.assert_close(out_cls.logits, out_whole.logits, rtol=1e-5, atol=1e-5)
            whole.zero_grad(), cls.zero_grad()
            out_whole.loss.backward(), out_cls.loss.backward()
            for (name, p), q in zip(whole.named_parameters(), cls.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert cls.state_dict().keys() == whole.state_dict().keys()
        # A copy of the patched model computes with its own weights, not the original's
        twin = copy.deepcopy(cls)
        torch.nn.init.zeros_(twin.bert.encoder.layer[-1].output.dense.weight)
        assert not torch.allclose(twin(input_ids=ids).logits, cls(input_ids=ids).logits)


def test_classifying_from_cls_leaves_other_architectures_alone():
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(
        DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2)
    )
    before = model.distilbert.transformer.layer[-1].forward
    assert not models.classify_from_cls(model)
    assert model.distilbert.transformer.layer[-1].forward == before
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 2)


def test_a_padding_mask_of_keys_scores_as_the_usual_mask(tiny_model_dir):
    """Scoring's [batch, 1, 1, length] padding mask: BERT (as scoring runs it: bf16, [CLS]-only last
    layer) gives the same logits as with the usual [batch, length] mask; a model that reads the
    mask otherwise is found out by the probe and keeps the usual one."""
    import types

    import torch
    from transformers import AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    models.classify_from_cls(bert)
    bert.to(torch.bfloat16)
    assert models.takes_key_mask(bert)
    ids = torch.randint(5, 60, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 2:] = 0, 0
    with torch.inference_mode():
        usual = bert(input_ids=ids, attention_mask=mask).logits
        keys = bert(input_ids=ids, attention_mask=mask.bool()[:, None, None, :]).logits
        unmasked = bert(input_ids=ids).logits
    assert torch.equal(keys, usual)
    assert not torch.equal(unmasked[1:], usual[1:])  # the padding counts: the probe can tell

    class SumsKeptTokens(torch.nn.Module):  # code written for the 2-D mask: broadcasts a 4-D one
        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask):
            kept = (input_ids * attention_mask).float().sum(-1, keepdim=True)
            return types.SimpleNamespace(logits=kept)

    assert not models.takes_key_mask(SumsKeptTokens())


def test_the_fused_feed_forward_scores_as_its_two_steps(tiny_model_dir):
    """Linear layer and GELU as one oneDNN call on CPU with AVX-512: the same logits as the two
    steps, in fp32 to rounding and in bf16 to bf16's. On a CPU with AVX2 alone (slower fused), where
    oneDNN has no bf16 kernel (bf16 without AVX512-BF16 or AMX) and for other activations, the
    model is left as it is."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    from bertjob.training import cpu_supports_bf16

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    ids = torch.randint(5, 60, (4, 11))
    steps = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        steps.to(dtype)
        fused = copy.deepcopy(steps)  # as the predictor does it: in the dtype it scores in
        patched = models.fuse_feed_forward(fused)
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            assert not patched
        elif dtype == torch.float32 or cpu_supports_bf16():
            assert patched
        assert all(("forward" in vars(layer.intermediate)) == patched for layer in fused.bert.encoder.layer)
        with torch.inference_mode():
            want = steps(input_ids=ids).logits.float()
            got = fused(input_ids=ids).logits.float()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    relu = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, hidden_act="relu")
    assert not models.fuse_feed_forward(relu)
    assert "forward" not in vars(relu.bert.encoder.layer[0].intermediate)
