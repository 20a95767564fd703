"""Cached samples -> padded batches: token ids, the image placeholder mask, the features in
sequence order, and the flat rows of the hidden states that predict answer tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .features import Sample, SpilledFeatures

if TYPE_CHECKING:
    from .load import Loaded


class BatchFeatures:
    """A batch's features, concatenated from disk on each use (see SpilledFeatures)."""

    def __init__(self, parts: list, device: torch.device):
        self.parts, self.device = parts, device

    def to(self, *args, **kwargs) -> torch.Tensor:
        loaded = [p.load() if isinstance(p, SpilledFeatures) else p for p in self.parts]
        return torch.cat(loaded).to(self.device).to(*args, **kwargs)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor
    image_mask: torch.Tensor  # [B, L] True at image placeholder tokens
    features: torch.Tensor | BatchFeatures | None  # [sum image tokens, d] in sequence order
    position_ids: torch.Tensor | None
    answer_rows: torch.Tensor  # flat indices into [B*L] of hidden states that predict answer tokens
    targets: torch.Tensor  # answer token ids, one per row
    answer_seq: torch.Tensor  # which sequence each answer row belongs to
    lengths: torch.Tensor  # answer tokens per sequence (float)
    ref_nll: torch.Tensor | None = None


def make_batches(loaded: Loaded, samples: list[Sample], batch_size: int) -> list[Batch]:
    return [_batch(loaded, samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def make_groups(loaded: Loaded, samples: list[Sample], batch_size: int, micro: int) -> list[list[Batch]]:
    """The batches of make_batches (the same samples), each as micro-batches of at most `micro`
    sequences, run one after another within a step (bounds the activations held at once)."""
    return [[_batch(loaded, samples[j : min(j + micro, i + batch_size)]) for j in range(i, min(i + batch_size, len(samples)), micro)]
            for i in range(0, len(samples), batch_size)]


def _batch(loaded: Loaded, samples: list[Sample]) -> Batch:
    model, device = loaded.model, loaded.device
    pad = loaded.processor.tokenizer.pad_token_id or 0
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    rows, targets, seq = [], [], []
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[b, :n] = s.input_ids
        attention_mask[b, :n] = 1
        positions = torch.arange(s.answer_start, n)
        rows.append(b * length + positions - 1)  # hidden state at p-1 predicts token p
        targets.append(s.input_ids[s.answer_start :])
        seq.append(torch.full((n - s.answer_start,), b))
    image_mask = input_ids == model.config.image_token_id
    features = [s.features for s in samples if s.features is not None]
    if features and (device.type == "cpu" or any(isinstance(f, SpilledFeatures) for f in features)):
        # concatenated when used: from disk, or (CPU) from the cache itself, not held twice
        features_in = BatchFeatures(features, device)
    else:
        features_in = torch.cat(features).to(device) if features else None
    grids = [s.grid for s in samples]
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    seq = torch.cat(seq)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_mask=image_mask.to(device),
        features=features_in,
        position_ids=loaded.adapter.position_ids(model, input_ids, attention_mask, grids),
        answer_rows=torch.cat(rows).to(device),
        targets=torch.cat(targets).to(device),
        answer_seq=seq.to(device),
        lengths=torch.bincount(seq, minlength=len(samples)).float().to(device),
    )
