"""The saliency mask (MMUnlearner): which projector elements may change."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .batches import _batch
from .config import progress, trim_heap
from .features import RemoteSample, Sample, widest_share
from .forward import sequence_nll
from .optimise import pass_size
from .ranks import ONE_PROCESS, Ranks

if TYPE_CHECKING:
    from .load import Loaded


def fisher_samples(samples: list[Sample], limit: int) -> list[Sample]:
    """The samples the Fisher is taken over: the pictures themselves (view 0; their augmented views
    add cost, not coverage), at most `limit`, evenly spaced so that every person's pictures count
    (samples come picture by picture, each followed by its views)."""
    pictures = [s for s in samples if s.view == 0]
    if len(pictures) <= limit:
        return pictures
    return [pictures[k * len(pictures) // limit] for k in range(limit)]


def fisher_diagonal(loaded: Loaded, params, samples: list[Sample], limit: int, chunk: int | None = None,
                    ranks: Ranks = ONE_PROCESS) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher F = (1/S) sum_s g_s * g_s of each sample's answer NLL, fp32
    (squares underflow in fp16), g_s = d nll_s / d theta.

    Per-sample gradients come from one batched pass per `chunk` samples: sample s gets its own
    copy theta_s of the (small) projector parameters, the connector runs on each sample's picture
    with its copy, the frozen LLM runs forward and backward once for the chunk, and since nll_s
    depends on theta_s alone (sequences do not attend to each other), d(sum_s nll_s)/d theta_s = g_s.
    Memory: `chunk` copies of the projector and their gradients on top of one batch's activations.
    Each rank sums over its own share of the samples; the sums are added over the ranks."""
    chunk = chunk or pass_size(loaded.device)  # bounds the activations as a training step's passes do
    everyone = fisher_samples(samples, limit)
    chosen = [(s, 1.0) for s in everyone if not isinstance(s, RemoteSample)]
    # a sharded LLM runs zero-weight stand-ins in lockstep (their NLL counts 0): every rank joins each collective
    chosen += [(s, 0.0) for s in ranks.stand_ins(len(chosen), widest_share(everyone))]
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for i in progress(range(0, len(chosen), chunk), desc="fisher"):
        part, weights = zip(*chosen[i : i + chunk])
        with_picture = [j for j, s in enumerate(part) if s.features is not None]
        if not with_picture:  # text only: the projector gets no gradient (still one lockstep pass)
            sequence_nll(loaded, params, _batch(loaded, list(part)))
            continue
        copies = {n: p.detach().expand(len(with_picture), *p.shape).clone().requires_grad_(True) for n, p in params.items()}
        per_picture = [{n: c[k] for n, c in copies.items()} for k in range(len(with_picture))]
        nll = sequence_nll(loaded, per_picture, _batch(loaded, list(part)))
        weight = torch.tensor(weights, device=nll.device)
        grads = torch.autograd.grad((nll * weight).sum(), list(copies.values()), allow_unused=True)
        for n, g in zip(copies, grads):
            if g is not None:
                fisher[n] += (g.float() ** 2).sum(0)
        del copies, per_picture, nll, grads
        if loaded.device.type == "cpu":
            trim_heap()  # see config.trim_heap: the peak stays at one chunk's activations
    fisher = ranks.all_reduce(fisher)
    return {n: f / len(everyone) for n, f in fisher.items()}


def fisher_diagonal_loop(loaded: Loaded, params, samples: list[Sample], limit: int) -> dict[str, torch.Tensor]:
    """The same Fisher, one backward pass per sample (the reference the batched one is tested against)."""
    chosen = fisher_samples(samples, limit)
    params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for sample in chosen:
        nll = sequence_nll(loaded, params, _batch(loaded, [sample])).sum()
        if not nll.requires_grad:
            continue
        grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[n] += g.float() ** 2
    return {n: f / len(chosen) for n, f in fisher.items()}


def saliency_mask(forget: dict, retain: dict, threshold: float) -> dict[str, torch.Tensor]:
    """MMUnlearner: update where (F_forget + eps) / (F_retain + eps) >= threshold.

    Each Fisher is first normalised to sum to 1 over all projector elements: a well-fitted answer
    has a tiny gradient, so raw forget and retain Fishers differ in scale by the sets' losses
    (measured on the demo: raw ratios kept 1.4% of the elements); normalised, the ratio compares
    how much each element matters to one set relative to the other."""
    eps = 1e-12
    total_f = sum(float(f.sum()) for f in forget.values()) or 1.0
    total_r = sum(float(r.sum()) for r in retain.values()) or 1.0
    return {n: (forget[n] / total_f + eps) / (retain[n] / total_r + eps) >= threshold for n in forget}
