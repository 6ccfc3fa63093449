"""Masked-LM inputs, in plain numpy and PyTorch (no Ray): packing prepared reviews into fixed-length
sequences, and masking them.

    pack_sequences: prepared rows ([CLS] review [SEP], head+tail truncated) -> [CLS] + max_length-1
                    tokens of the concatenated reviews, each review (and each side of a head+tail
                    seam) ended by [SEP], as RoBERTa's FULL-SENTENCES packing: no padding is trained.
    mask_tokens:    BERT's rule (Devlin et al. 2019): 15% of the real tokens are predicted; of those
                    80% become [MASK], 10% a random token, 10% stay. Never [CLS]/[SEP]/[PAD]/[UNK]
                    or padding. Optionally whole words: a word's WordPiece pieces go together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100  # the label transformers' MLM loss skips


def pack_sequences(
    batch: dict[str, Any], max_length: int, cls_id: int, sep_id: int, seam_after: int = 0
) -> dict[str, np.ndarray]:
    """Concatenate the reviews of `batch` and cut them into sequences of at most `max_length` tokens.

    Each row of `input_ids` is [CLS] tokens [SEP], as prepare writes it. Its tokens go into one
    stream, each review followed by [SEP]; a row prepare truncated head+tail (`truncated` true,
    `seam_after` > 0: the head's token count) also gets a [SEP] where its head meets its tail, so no
    sequence reads across the dropped middle as if it were contiguous text. Every sequence is [CLS]
    plus the next max_length - 1 tokens of the stream; the last one of the batch may be shorter.
    """
    rows = batch["input_ids"]
    truncated = batch.get("truncated")
    sep = np.array([sep_id], dtype=np.int32)
    pieces = []
    for i, row in enumerate(rows):
        body = np.asarray(row, dtype=np.int32)[1:-1]  # without [CLS] and [SEP]
        if seam_after and truncated is not None and truncated[i] and 0 < seam_after < len(body):
            pieces += [body[:seam_after], sep, body[seam_after:], sep]
        elif len(body):
            pieces += [body, sep]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    width = max_length - 1
    starts = range(0, len(stream), width)
    seqs = [np.concatenate([[cls_id], stream[s : s + width]]).astype(np.int32) for s in starts]
    out = np.empty(len(seqs), dtype=object)
    out[:] = seqs
    return {"input_ids": out, "length": np.array([len(s) for s in seqs], dtype=np.int32)}


@dataclass(frozen=True)
class MaskingRule:
    """What masking needs of the tokenizer (built once on the driver, sent to workers as a dict)."""

    mask_id: int
    special_ids: tuple[int, ...]  # never masked, never drawn as random replacements
    vocab_size: int
    continuation_ids: tuple[int, ...] = ()  # WordPiece '##' pieces: with whole_word, masked with their word
    mlm_probability: float = 0.15
    whole_word: bool = False

    @classmethod
    def of(cls, tokenizer: Any, mlm_probability: float = 0.15, whole_word: bool = False) -> MaskingRule:
        vocab = tokenizer.get_vocab()
        return cls(
            mask_id=tokenizer.mask_token_id,
            special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            vocab_size=len(tokenizer),
            continuation_ids=tuple(sorted(i for t, i in vocab.items() if t.startswith("##")))
            if whole_word
            else (),
            mlm_probability=mlm_probability,
            whole_word=whole_word,
        )


class Masker:
    """Applies a MaskingRule to padded batches with a given torch.Generator (so a resumed run masks
    exactly as the interrupted one would have)."""

    def __init__(self, rule: MaskingRule):
        self.rule = rule
        self.special = torch.tensor(rule.special_ids, dtype=torch.long)
        is_special = torch.zeros(rule.vocab_size, dtype=torch.bool)
        is_special[self.special[self.special < rule.vocab_size]] = True
        self.candidates = torch.nonzero(~is_special).squeeze(1)  # random replacements: real tokens only
        self.continuation = torch.zeros(rule.vocab_size, dtype=torch.bool)
        if rule.continuation_ids:
            self.continuation[torch.tensor(rule.continuation_ids, dtype=torch.long)] = True

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (masked input ids, labels: the original id where a token is predicted, else -100)."""
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special)
        draw = torch.rand(input_ids.shape, generator=generator)
        if self.rule.whole_word:
            # Every piece takes the draw of the piece that starts its word, so a word is in or out whole.
            starts = ~(self.continuation[input_ids.clamp(0, self.rule.vocab_size - 1)] & maskable)
            pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            start_of_word = torch.cummax(torch.where(starts, pos, 0), dim=1).values
            draw = draw.gather(1, start_of_word)
        chosen = maskable & (draw < self.rule.mlm_probability)
        labels = torch.where(chosen, input_ids, IGNORE_INDEX)
        how = torch.rand(input_ids.shape, generator=generator)
        random_ids = self.candidates[
            torch.randint(len(self.candidates), input_ids.shape, generator=generator)
        ]
        masked = torch.where(chosen & (how < 0.8), self.rule.mask_id, input_ids)
        masked = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, masked)
        return masked, labels


def sparse_targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The predicted positions (flat indices) and their tokens, found on the host, so the model
    needs no data-dependent shape (and no device sync) to pick them out."""
    flat = labels.reshape(-1)
    positions = torch.nonzero(flat != IGNORE_INDEX).squeeze(1)
    return {"masked_positions": positions, "masked_labels": flat[positions]}


class MaskedLMLoss(torch.nn.Module):
    """A Hugging Face masked-LM model whose loss projects onto the vocabulary only at the predicted
    positions (~15%): the decoder (hidden x vocabulary, 384 x 30,522 for MiniLM) costs about as much
    per token as the whole 6-layer encoder, so doing it everywhere nearly doubles a step.
    Same loss as the model's own (mean cross-entropy over predicted tokens)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        # BERT-style models call their masked-LM head `cls`, RoBERTa-style ones `lm_head`; both act
        # position by position on the encoder's last hidden states.
        self.head = getattr(model, "cls", None) or getattr(model, "lm_head", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masked_positions: torch.Tensor,
        masked_labels: torch.Tensor,
    ) -> Any:
        from transformers.modeling_outputs import MaskedLMOutput

        if self.head is None:  # an unknown architecture: its own forward, logits everywhere
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            labels.view(-1)[masked_positions] = masked_labels
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, masked_positions)
        logits = self.head(picked).float()
        # sum / count rather than mean: a batch with nothing to predict gives 0, not NaN
        loss = torch.nn.functional.cross_entropy(logits, masked_labels, reduction="sum")
        return MaskedLMOutput(loss=loss / max(1, masked_labels.shape[0]))
