"""The masked update: NPO (or another objective) on the forget answers plus the retain term,
AdamW on the fp32 projector masters, only where the mask allows."""
from __future__ import annotations

import torch

from .config import Config, progress
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
        # forget and retain terms are differentiated one after the other and their gradients added:
        # the same gradient as one backward of their sum, with one batch's activations alive, not two
        fb = forget_batches[step % len(forget_batches)]
        loss = forget_loss(cfg.method, sequence_nll(loaded, trainable, fb), fb.ref_nll, fb.lengths, cfg.beta)
        grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        if use_retain:
            rb = retain_batches[step % len(retain_batches)]
            retain = cfg.retain_weight * retain_nll(sequence_nll(loaded, trainable, rb), rb.lengths)
            retain_grads = torch.autograd.grad(retain, list(trainable.values()), allow_unused=True)
            grads = [r if g is None else g if r is None else g + r for g, r in zip(grads, retain_grads)]
            loss = loss.detach() + retain.detach()
        with torch.no_grad():
            for (n, p), g in zip(trainable.items(), grads):
                if g is None:
                    continue
                exp_avg, exp_avg_sq = state[n]
                masked_adamw_(p, g, mask[n], exp_avg, exp_avg_sq, step=step + 1, lr=cfg.lr, beta1=0.9,
                              beta2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    for p in params.values():
        p.requires_grad_(False)
    return losses
