"""The masked update: NPO (or another objective) on the forget answers plus the retain term,
AdamW on the fp32 projector masters, only where the mask allows."""
from __future__ import annotations

import torch

from .config import Config, progress, trim_heap
from .forward import sequence_nll
from .kernels import masked_adamw_
from .objectives import forget_loss, uses_retain


def optimise(loaded, params, mask, forget_batches, retain_batches, cfg: Config, log) -> list[float]:
    trainable = {n: p.requires_grad_(True) for n, p in params.items()}
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    use_retain = bool(retain_batches) and uses_retain(cfg.method)
    losses = []
    bar = progress(range(cfg.steps), desc=f"optimising ({cfg.method})")
    for step in bar:
        # Each term is a sum over sequences (NPO, SimNPO, GA: mean over the batch of a per-sequence
        # term; retain: summed NLL over the batch's answer tokens), so its gradient is the sum of its
        # micro-batches' gradients, each weighted by its share: only one micro-batch's activations
        # are alive at a time, for the same update.
        fbs = _steps_batches(forget_batches[step % len(forget_batches)])
        n_seq = sum(len(b.lengths) for b in fbs)
        terms = [(b, lambda b: forget_loss(cfg.method, sequence_nll(loaded, trainable, b), b.ref_nll, b.lengths, cfg.beta)
                  * (len(b.lengths) / n_seq)) for b in fbs]
        if use_retain:
            rbs = _steps_batches(retain_batches[step % len(retain_batches)])
            n_tok = float(sum(b.lengths.sum() for b in rbs))
            terms += [(b, lambda b: cfg.retain_weight * sequence_nll(loaded, trainable, b).sum() / n_tok) for b in rbs]
        grads, loss = [None] * len(trainable), 0.0
        for b, term in terms:
            value = term(b)
            loss += float(value.detach())
            if value.requires_grad:  # else a batch without pictures: no projector gradient
                part = torch.autograd.grad(value, list(trainable.values()), allow_unused=True)
                grads = [p if g is None else g if p is None else g + p for g, p in zip(grads, part)]
        with torch.no_grad():
            for (n, p), g in zip(trainable.items(), grads):
                if g is None:
                    continue
                exp_avg, exp_avg_sq = state[n]
                masked_adamw_(p, g, mask[n], exp_avg, exp_avg_sq, step=step + 1, lr=cfg.lr, beta1=0.9,
                              beta2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
        losses.append(loss)
        if loaded.device.type == "cpu":
            trim_heap()  # see config.trim_heap: keeps the peak at one micro-batch's activations
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    for p in params.values():
        p.requires_grad_(False)
    return losses


def _steps_batches(batch) -> list:
    """A step's batch: one Batch, or its micro-batches (a list, see batches.make_groups)."""
    return batch if isinstance(batch, list) else [batch]
