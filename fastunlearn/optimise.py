"""The masked update: NPO (or another objective) on the forget answers plus the retain term,
AdamW on the fp32 projector masters, only where the mask allows."""
from __future__ import annotations

import torch

from . import dist_samples as shards
from . import distributed as dist
from .config import Config, progress, trim_heap
from .forward import sequence_nll
from .kernels import masked_adamw_
from .objectives import forget_loss, retain_nll, uses_retain


def optimise(loaded, params, mask, forget_batches, retain_batches, cfg: Config, log) -> list[float]:
    trainable = {n: p.requires_grad_(True) for n, p in params.items()}
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    use_retain = bool(retain_batches) and uses_retain(cfg.method)
    losses = []
    bar = progress(range(cfg.steps), desc=f"optimising ({cfg.method})")
    for step in bar:
        fb = forget_batches[step % len(forget_batches)]
        # issue 12: shards.local_term is term(batch) on one process; under torchrun, this rank's share of it
        loss = shards.local_term(fb, "seqs", trainable, lambda b: forget_loss(
            cfg.method, sequence_nll(loaded, trainable, b), b.ref_nll, b.lengths, cfg.beta))
        if use_retain:
            rb = retain_batches[step % len(retain_batches)]
            loss = loss + cfg.retain_weight * shards.local_term(rb, "tokens", trainable, lambda b: retain_nll(
                sequence_nll(loaded, trainable, b), b.lengths))
        grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        grads, loss_value = dist.all_reduce_grads(trainable, grads, loss)  # issue 12: identity on one process
        with torch.no_grad():
            for (n, p), g in zip(trainable.items(), grads):
                if g is None:
                    continue
                exp_avg, exp_avg_sq = state[n]
                masked_adamw_(p, g, mask[n], exp_avg, exp_avg_sq, step=step + 1, lr=cfg.lr, beta1=0.9,
                              beta2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
        losses.append(loss_value)
        if loaded.device.type == "cpu":
            trim_heap()  # see config.trim_heap: the peak stays at one step's activations
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    for p in params.values():
        p.requires_grad_(False)
    return losses
