"""The saliency mask (MMUnlearner): which projector elements may change."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .batches import _batch
from .config import progress, trim_heap
from .features import Sample
from .forward import sequence_nll

if TYPE_CHECKING:
    from .load import Loaded


def fisher_diagonal(loaded: Loaded, params, samples: list[Sample], limit: int, chunk: int = 8) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher F = (1/S) sum_s g_s * g_s of each sample's answer NLL, fp32
    (squares underflow in fp16), g_s = d nll_s / d theta.

    Per-sample gradients come from one batched pass per `chunk` samples: sample s gets its own
    copy theta_s of the (small) projector parameters, the projector runs on each sample's features
    with its copy, the frozen LLM runs forward and backward once for the chunk, and since nll_s
    depends on theta_s alone, d(sum_s nll_s)/d theta_s = g_s. (For a linear layer this is the
    identity g_s = sum_{t in s} dY_t X_t^T computed by autograd per copy.) Memory: 2 x chunk
    copies of the projector on top of one batch's activations."""
    step = max(1, len(samples) // limit)
    chosen = samples[::step][:limit]
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for i in progress(range(0, len(chosen), chunk), desc="fisher"):
        part = chosen[i : i + chunk]
        copies = {n: p.detach().expand(len(part), *p.shape).clone().requires_grad_(True) for n, p in params.items()}
        per_sample = [{n: c[s] for n, c in copies.items()} for s in range(len(part))]
        nll = sequence_nll(loaded, per_sample, _batch(loaded, part))
        if not nll.requires_grad:  # no picture in this chunk: no projector gradient
            continue
        grads = torch.autograd.grad(nll.sum(), list(copies.values()), allow_unused=True)
        for n, g in zip(copies, grads):
            if g is not None:
                fisher[n] += (g.float() ** 2).sum(0)
        del copies, per_sample, nll, grads
        if loaded.device.type == "cpu":
            trim_heap()
    return {n: f / len(chosen) for n, f in fisher.items()}


def fisher_diagonal_loop(loaded: Loaded, params, samples: list[Sample], limit: int) -> dict[str, torch.Tensor]:
    """The same Fisher, one backward pass per sample (the reference the batched one is tested against)."""
    step = max(1, len(samples) // limit)
    chosen = samples[::step][:limit]
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
