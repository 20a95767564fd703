"""Cached samples -> padded batches: token ids, the image placeholder mask, the features in
sequence order, and the flat rows of the hidden states that predict answer tokens."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .features import RemoteSample, Sample, SpilledFeatures, widest_share

if TYPE_CHECKING:
    from .load import Loaded


class BatchFeatures:
    """A batch's features, concatenated on each use: read from disk (see SpilledFeatures), or on a CPU
    from the cache itself (a batch does not hold a second copy of its pictures' features)."""

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
    features: torch.Tensor | BatchFeatures | None  # cached features of the batch's pictures, concatenated in order
    feature_sizes: list[int]  # rows of `features` per picture
    grids: list[dict]  # per picture: its family-specific layout (e.g. image_grid_thw), no pixels
    model_inputs: dict  # extra keyword arguments of the model's forward (position ids, token types, ...)
    answer_rows: torch.Tensor  # flat indices into [B*L] of hidden states that predict answer tokens
    targets: torch.Tensor  # answer token ids, one per row
    answer_seq: torch.Tensor  # which sequence each answer row belongs to
    lengths: torch.Tensor  # answer tokens per sequence (float)
    samples: list[Sample]  # what the batch was made of (optimise re-batches a step's sequences)
    ref_nll: torch.Tensor | None = None
    # make_batches: under torchrun a Batch is this rank's part of a batch. The whole batch's sequence
    # and answer-token counts normalise the loss terms; the most sequences one rank holds of it is how
    # many a sharded LLM runs on every rank; `positions`: each sequence's index in the list batched
    positions: list[int] = field(default_factory=list)
    global_seqs: int = 0
    global_tokens: int = 0
    widest: int = 0


class EmptyBatch:
    """This rank's part of a batch that holds none of its sequences."""

    def __init__(self):
        self.samples, self.positions, self.lengths, self.ref_nll = [], [], torch.zeros(0), None


def make_batches(loaded: Loaded, samples: list, batch_size: int) -> list[Batch | EmptyBatch]:
    """Batches of `batch_size` sequences, in order; of each, the part this rank holds (the others'
    sequences are RemoteSample stubs)."""
    out = []
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        mine = [k for k, s in enumerate(group) if not isinstance(s, RemoteSample)]
        batch = _batch(loaded, [group[k] for k in mine]) if mine else EmptyBatch()
        batch.positions = [start + k for k in mine]
        batch.global_seqs, batch.global_tokens = len(group), sum(s.answer_tokens for s in group)
        batch.widest = widest_share(group)
        out.append(batch)
    return out


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
        features_in = BatchFeatures(features, device)  # concatenated when used: from disk, or (CPU) not held twice
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
        feature_sizes=[f.shape[0] for f in features],
        grids=[s.grid for s in samples if s.features is not None],
        model_inputs=loaded.adapter.model_inputs(model, input_ids, attention_mask, grids, [s.answer_start for s in samples]),
        answer_rows=torch.cat(rows).to(device),
        targets=torch.cat(targets).to(device),
        answer_seq=seq.to(device),
        lengths=torch.bincount(seq, minlength=len(samples)).float().to(device),
        samples=list(samples),
        positions=list(range(len(samples))),
        global_seqs=len(samples),
        global_tokens=sum(s.answer_tokens for s in samples),
        widest=len(samples),
    )
