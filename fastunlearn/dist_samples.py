"""Samples and batches split over the ranks of a torchrun job (distributed.py holds the
process group, the agreement on inputs, the collectives and the rank-0 write).

Pictures are owned round-robin (picture k -> rank k % N): a rank answers, caches and computes only
its pictures' samples; the others' are `RemoteSample` stubs, so every rank holds the single-process
sample list in the single-process order. Each global batch is split by owner; each rank's loss
term is scaled by its share (`local_term`), metrics are gathered (`summaries`). With a sharded LLM
(FSDP2, `place_sharded`) every rank must make the same layer calls: empty parts run zero-weight
stand-ins. On one process every function here is the plain one.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from . import distributed as dist
from .errors import UserError


@dataclass
class RemoteSample:
    """A sample another rank owns: enough to place it in batches and normalise the loss."""

    view: int
    answer_tokens: int
    owner: int


def _owners(items) -> list[int]:
    """Owner rank of each item: pictures round-robin in order of first appearance (all of a picture's
    questions and views go to one rank, so its features are computed once); text items by index."""
    pictures: dict = {}
    owners = []
    for i, item in enumerate(items):
        key = item.image if item.image is not None else ("text", i)
        if key not in pictures:
            pictures[key] = len(pictures)
        owners.append(pictures[key] % dist.world_size())
    return owners


def fill_answers(loaded, items, max_new_tokens):
    """features.fill_answers, each rank generating the greedy answers of its own pictures."""
    from .features import fill_answers as fill, greedy_answers

    if dist._state is None or dist._state.shard:
        # sharded LLM: every FSDP-wrapped layer call is a collective, so every rank must make the same
        # calls: each generates every answer (same inputs, same greedy tokens, same number of steps)
        return fill(loaded, items, max_new_tokens)
    owners = _owners(items)
    mine = [i for i, it in enumerate(items) if it.answer is None and owners[i] == dist.rank()]
    answers = greedy_answers(loaded, [items[i] for i in mine], max_new_tokens)
    for part in dist.all_gather_object(list(zip(mine, answers)), "sharing the greedy answers"):
        for i, answer in part:
            items[i].answer = answer
    return [it for it in items if it.answer]


def cache_samples(loaded, items, desc, views=0, seed=0, first_view=0, extra_views=0) -> list:
    """features.cache_samples over this rank's pictures; the other ranks' samples as RemoteSample,
    in the single-process order."""
    from .features import cache_samples as cache

    if dist._state is None:
        return cache(loaded, items, desc, views, seed, first_view, extra_views)
    owners = _owners(items)
    local, meta = {}, []
    for i, item in enumerate(items):
        if owners[i] != dist.rank():
            continue
        for j, s in enumerate(cache(loaded, [item], desc, views, seed, first_view, extra_views)):
            local[i, j] = s
            if dist._state.dummy is None:
                dist._state.dummy = s
            meta.append((i, j, s.view, len(s.input_ids) - s.answer_start))
    everything = sorted((m + (r,)) for r, part in enumerate(dist.all_gather_object(meta, "sharing the sample list")) for m in part)
    return [local[i, j] if r == dist.rank() else RemoteSample(view, tokens, r) for i, j, view, tokens, r in everything]


class EmptyBatch:
    """This rank's part of a global batch that holds none of its samples."""

    empty = True

    def __init__(self, loaded=None):
        self.lengths = torch.zeros(0)
        self.ref_nll = None
        self.loaded = loaded


def _dummy_batch(loaded):
    """A one-sample batch of this rank's, run with zero weight where a sharded LLM needs every rank."""
    from .batches import _batch

    if dist._state.dummy is None:
        raise UserError(f"rank {dist.rank()}: holds no picture; a sharded LLM needs at least one picture per rank "
                        "(use fewer ranks)")
    if not isinstance(dist._state.dummy, tuple):
        b = _batch(loaded, [dist._state.dummy])
        b.ref_nll = torch.zeros(1, device=loaded.device)
        dist._state.dummy = (dist._state.dummy, b)
    return dist._state.dummy[1]


def make_batches(loaded, samples: list, batch_size: int) -> list:
    """batches.make_batches; under torchrun, each single-process batch's part this rank owns, with
    the global batch's size (`global_seqs`, `global_tokens`) for the loss scale, and each local
    sequence's position in `samples` (`positions`) for gathering metrics."""
    from .batches import _batch, make_batches as make

    if dist._state is None:
        return make(loaded, samples, batch_size)
    out = []
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        local = [(start + k, s) for k, s in enumerate(group) if not isinstance(s, RemoteSample)]
        b = _batch(loaded, [s for _, s in local]) if local else EmptyBatch(loaded)
        b.positions = [p for p, _ in local]
        b.global_seqs = len(group)
        b.global_tokens = sum(_tokens(s) for s in group)
        b.local_tokens = sum(_tokens(s) for _, s in local)
        out.append(b)
    return out


def _tokens(s) -> int:
    return s.answer_tokens if isinstance(s, RemoteSample) else len(s.input_ids) - s.answer_start


def _is_empty(b) -> bool:
    return getattr(b, "empty", False)


class Padding:
    """Sharded LLM: a stand-in sample, run with zero weight so that every rank makes as many calls."""

    def __init__(self, sample):
        self.sample = sample


def local_samples(samples: list) -> list:
    """The samples this rank computes (all of them on one process); with a sharded LLM, padded with
    `Padding` stand-ins to the largest share, so that every rank makes the same calls."""
    if dist._state is None:
        return samples
    mine = [s for s in samples if not isinstance(s, RemoteSample)]
    if not dist._state.shard:
        return mine
    counts = dist.all_gather_object(len(mine), "counting samples")
    if max(counts) > len(mine):
        if dist._state.dummy is None:
            _dummy_batch(None)  # raises: this rank holds no picture
        stand_in = dist._state.dummy[0] if isinstance(dist._state.dummy, tuple) else dist._state.dummy
        mine += [Padding(stand_in)] * (max(counts) - len(mine))
    return mine


def unpad(sample):
    """(the sample to run, whether it is a zero-weight stand-in)."""
    return (sample.sample, True) if isinstance(sample, Padding) else (sample, False)


def place_sharded(model, device: torch.device) -> bool:
    """With a sharded LLM (FSDP2): each decoder layer of the frozen LLM fully_shard-ed over the ranks
    (its parameters split on dim 0, all-gathered for its forward and again for its backward, freed
    after each) and activation-checkpointed (its backward recomputes it); everything else (embeddings, final norm, lm_head, vision tower, projector) replicated
    on `device`. Frozen parameters get no gradient, so FSDP never reduce-scatters anything.
    Returns False (nothing done) unless the job runs sharded."""
    if not dist.sharding():
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lm = model.model.language_model
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise UserError(f"{model.config.model_type}: no decoder layers found to shard (language_model.layers)")
    mesh = init_device_mesh(device.type, (dist._state.world,))
    for name, child in model.named_children():
        if child is not model.model:
            child.to(device)
    for name, child in model.model.named_children():
        if child is not lm:
            child.to(device)
    for name, child in lm.named_children():
        if child is not layers:
            child.to(device)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    total = sum(p.numel() * p.element_size() for p in layers.parameters())
    for i, layer in enumerate(layers):
        # activation checkpointing: the backward keeps only each layer's input and recomputes the
        # layer (a 72B layer's saved activations are ~0.3 MB per token; its input 16 KB)
        layers[i] = checkpoint_wrapper(layer)
        fully_shard(layers[i], mesh=mesh)  # moves this rank's shard to the mesh's device
    held = sum(p.to_local().numel() * p.element_size() for p in layers.parameters())
    dist._state.shard_bytes = (total, dist.all_gather_object(held, "sharding the LLM")[0])
    for buf_owner in model.modules():  # rotary tables and other buffers
        for k, b in list(buf_owner.named_buffers(recurse=False)):
            if b.device != device:
                setattr(buf_owner, k, b.to(device))
    return True


def score(loaded, params, batches: list) -> dict:
    """forward.score over this rank's non-empty batches (local order)."""
    from .forward import score as run

    if not dist.sharding():
        return run(loaded, params, [b for b in batches if not _is_empty(b)])
    # sharded LLM: run a stand-in for each empty part (every rank the same forward calls); drop its rows
    scores = run(loaded, params, [_dummy_batch(loaded) if _is_empty(b) else b for b in batches])
    keep = torch.cat([torch.zeros(1, dtype=torch.bool) if _is_empty(b) else torch.ones(len(b.lengths), dtype=torch.bool)
                      for b in batches]) if batches else torch.zeros(0, dtype=torch.bool)
    return {k: v[keep] for k, v in scores.items()}


def local_term(batch, kind: str, params: dict, term):
    """This rank's share of one loss term over `batch`: `term(batch)` scaled by the fraction of the
    global batch this rank holds (`kind`: "seqs" for a mean over sequences, "tokens" for a mean over
    answer tokens), so that the ranks' sum is the single-process term. One process: `term(batch)`."""
    if dist._state is None:
        return term(batch)
    if _is_empty(batch):
        if dist.sharding():  # every rank must run the sharded layers, forward and backward: a zero-weight stand-in
            return term(_dummy_batch(batch.loaded)) * 0.0
        return sum((p * 0).sum() for p in params.values())  # in the graph, zero gradient
    if kind == "seqs":
        share = len(batch.positions) / batch.global_seqs
    elif kind == "tokens":
        share = batch.local_tokens / max(batch.global_tokens, 1)
    else:
        raise ValueError(kind)
    return term(batch) * share


def summaries(scores: dict, batches: list, slices: list[tuple[int, int]] | None = None) -> tuple[dict, list[dict]]:
    """forward.summarize over the whole set, and over each [start, end) slice of its sequences (the
    requests); under torchrun, the ranks' scores are gathered first (single-process order)."""
    from .forward import summarize

    if dist._state is None:
        nll, correct = scores["nll"], scores["correct"]
        tokens = torch.cat([b.lengths.cpu() for b in batches]) if batches else torch.zeros(0)
    else:
        mine = [p for b in batches for p in b.positions]
        tok = [float(x) for b in batches if not _is_empty(b) for x in b.lengths.cpu()]
        rows = {}
        for part in dist.all_gather_object(list(zip(mine, scores["nll"].tolist(), scores["correct"].tolist(), tok)),
                                      "gathering the metrics"):
            rows.update({p: (n, c, t) for p, n, c, t in part})
        order = sorted(rows)
        nll = torch.tensor([rows[p][0] for p in order], dtype=torch.float32)
        correct = torch.tensor([rows[p][1] for p in order], dtype=torch.bool)
        tokens = torch.tensor([rows[p][2] for p in order], dtype=torch.float32)

    def one(lo, hi):
        return summarize({"nll": nll[lo:hi], "correct": correct[lo:hi]}, [SimpleNamespace(lengths=tokens[lo:hi])])

    return one(0, len(nll)), [one(lo, hi) for lo, hi in (slices or [])]
