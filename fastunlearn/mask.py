"""The saliency mask (MMUnlearner): which projector elements may change."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import distributed as dist
from .batches import _batch
from .config import progress
from .features import Sample
from .forward import sequence_nll

if TYPE_CHECKING:
    from .load import Loaded


def fisher_diagonal(loaded: Loaded, params, samples: list[Sample], limit: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher E[g^2] of each sample's answer NLL, fp32 (squares underflow in fp16)."""
    step = max(1, len(samples) // limit)
    chosen = samples[::step][:limit]
    total, chosen = len(chosen), dist.local_samples(chosen)  # issue 12: each rank its own share
    params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for sample in progress(chosen, desc="fisher"):
        sample, padding = dist.unpad(sample)  # issue 12: a sharded LLM runs zero-weight stand-ins in lockstep
        nll = sequence_nll(loaded, params, _batch(loaded, [sample])).sum()
        grads = torch.autograd.grad(nll * 0.0 if padding else nll, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[n] += g.float() ** 2
    fisher = dist.all_reduce_sum(fisher)  # issue 12: identity on one process
    return {n: f / total for n, f in fisher.items()}


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
