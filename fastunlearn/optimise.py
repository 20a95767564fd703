"""The masked update: NPO (or another objective) on the forget answers (with --other-answers, NPO again
against other people's answers on the same pictures) plus the retain term, AdamW on the fp32 projector
masters, only where the mask allows."""
from __future__ import annotations

import math

import torch

from .anchor import Anchors, anchor_loss
from .batches import _batch
from .config import Config, progress, trim_heap
from .forward import sequence_nll
from .kernels.masked_adamw import masked_adamw_
from .objectives import forget_loss, npo, retain_nll, uses_retain
from .ranks import ONE_PROCESS, Ranks

# Sequences per LLM pass within a step (forget and retain together, see `step_gradients`), by device
# type. Measured on the CPU LLaVA of benchmarks/bench_e2e.py (16 sequences of 79 tokens a step, 2
# threads): one pass of 16 took 0.58 s, 2 x 8 0.63 s, 4 x 4 0.76 s on idle cores; at 40 steps the
# job's peak RSS was 793 MB with passes of 8 and 706 MB with 4 (the naive job's: 1512 MB), for 10%
# more optimisation time. A CPU takes 4 (peak memory: benchmarks/RESULTS.md); CUDA 8 (not measured there).
STEP_PASS = {"cpu": 4, "cuda": 8}


def pass_size(device: torch.device) -> int:
    """Sequences per LLM pass on this device (`STEP_PASS`; 8 elsewhere)."""
    return STEP_PASS.get(device.type, 8)


def optimise(loaded, params, mask, forget_batches, retain_batches, cfg: Config, log, checkpoint=None,
             every: int = 0, ranks: Ranks = ONE_PROCESS, anchors: Anchors | None = None, others: dict | None = None
             ) -> list[float]:
    """`cfg.steps` masked AdamW steps on `params` (in place); `checkpoint(step, params)` after every
    `every` steps and after the last, when given. Returns the loss of each step. Under torchrun every
    rank computes its share of each step's gradient and applies the sum. With `anchors` (anchor.py),
    the loss adds `cfg.anchor_weight` x the anchor term."""
    trainable = {n: p.requires_grad_(True) for n, p in params.items()}
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    use_retain = bool(retain_batches) and uses_retain(cfg.method)
    losses = []
    bar = progress(range(cfg.steps), desc=f"optimising ({cfg.method})")
    for step in bar:
        fb = forget_batches[step % len(forget_batches)]
        rb = retain_batches[step % len(retain_batches)] if use_retain else None
        other_ref = (other_reference(loaded, trainable, fb, others, pass_size(loaded.device), cfg.other_answers, ranks)
                     if others is not None and cfg.other_answers else None)
        grads, loss_value = step_gradients(loaded, trainable, fb, rb, cfg, pass_size(loaded.device), ranks, other_ref)
        if anchors is not None and cfg.anchor_weight:  # no LLM pass: the connector on cached features
            term = cfg.anchor_weight * anchor_loss(loaded, trainable, anchors, step, cfg.batch_size)
            extra = torch.autograd.grad(term, list(trainable.values()), allow_unused=True)
            grads = [b if a is None else a if b is None else a + b for a, b in zip(grads, extra)]
            loss_value += float(term.detach())
        grads, loss_value = ranks.sum_gradients(trainable, grads, loss_value)
        with torch.no_grad():
            for (n, p), g in zip(trainable.items(), grads):
                if g is None:
                    continue
                exp_avg, exp_avg_sq = state[n]
                masked_adamw_(p, g, mask[n], exp_avg, exp_avg_sq, step=step + 1, lr=cfg.lr, beta1=0.9,
                              beta2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
        losses.append(loss_value)
        if loaded.device.type == "cpu":
            trim_heap()  # see config.trim_heap: the peak stays at one pass's activations
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if checkpoint is not None and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            checkpoint(step + 1, params)
    for p in params.values():
        p.requires_grad_(False)
    return losses


@torch.no_grad()
def other_reference(loaded, params: dict, fb, others: dict, per_pass: int, per_sample: int,
                    ranks: Ranks = ONE_PROCESS) -> torch.Tensor:
    """Per forget sequence of the batch, the NLL of its other answers' mean probability under `params`,
    -log mean_j exp(-nll_j) (inf where it has none): how likely another person's answer is on that picture.
    With a sharded LLM, stand-ins make every rank's passes as many as the widest rank's."""
    groups = [others.get(id(s), []) for s in fb.samples]
    flat = [a for g in groups for a in g]
    flat += ranks.stand_ins(len(flat), fb.widest * per_sample)
    nll = torch.cat([sequence_nll(loaded, params, _batch(loaded, flat[k : k + per_pass]))
                     for k in range(0, len(flat), per_pass)]).float().cpu() if flat else torch.zeros(0)
    out, start = [], 0
    for g in groups:
        part = nll[start : start + len(g)]
        out.append(math.log(len(g)) - torch.logsumexp(-part, 0) if g else torch.tensor(float("inf")))
        start += len(g)
    return torch.stack(out) if out else torch.zeros(0)


def step_gradients(loaded, trainable: dict, fb, rb, cfg: Config, per_pass: int, ranks: Ranks = ONE_PROCESS,
                   other_ref: torch.Tensor | None = None) -> tuple[list, float]:
    """This rank's share of the gradient and value of one step's loss, forget_loss(forget batch) (+ NPO against
    `other_ref`, the other answers' reference) + retain_weight * retain_nll(retain batch), with its sequences of
    the step (forget, then retain) run through the frozen LLM `per_pass` at a time: one pass when it holds them
    all (fewer, larger matmuls), several to bound the activations held at once. Each term is a mean over the
    whole batch's sequences (forget) or answer tokens (retain), every rank's (`global_seqs`, `global_tokens`),
    so a pass adds its sequences' share of each term: summed over the passes and the ranks, the loss and
    gradient of one pass over everything, to fp32 rounding. With a sharded LLM, zero-weight stand-ins make this
    rank's passes as many as any rank's."""
    seqs = [("forget", k, s) for k, s in enumerate(fb.samples)]
    seqs += [("retain", k, s) for k, s in enumerate(rb.samples)] if rb is not None else []
    widest = fb.widest + (rb.widest if rb is not None else 0)
    seqs += [("stand-in", 0, s) for s in ranks.stand_ins(len(seqs), widest)]
    grads, value = [None] * len(trainable), 0.0
    for start in range(0, len(seqs), per_pass):
        part = seqs[start : start + per_pass]
        batch = _batch(loaded, [s for _, _, s in part])
        nll = sequence_nll(loaded, trainable, batch)
        f = [j for j, (kind, _, _) in enumerate(part) if kind == "forget"]
        r = [j for j, (kind, _, _) in enumerate(part) if kind == "retain"]
        stand_ins = [j for j, (kind, _, _) in enumerate(part) if kind == "stand-in"]
        loss = nll.new_zeros(())
        if f:
            ref = fb.ref_nll[[part[j][1] for j in f]]
            loss = loss + forget_loss(cfg.method, nll[f], ref, batch.lengths[f], cfg.beta) * (len(f) / fb.global_seqs)
            if other_ref is not None:  # NPO again, the other answers' NLL as the reference
                other = other_ref[[part[j][1] for j in f]].to(nll.device)
                has = torch.isfinite(other)
                if has.any():
                    loss = loss + npo(nll[f][has], other[has], cfg.other_beta) * (int(has.sum()) / fb.global_seqs)
        if r:
            share = batch.lengths[r].sum() / rb.global_tokens
            loss = loss + cfg.retain_weight * retain_nll(nll[r], batch.lengths[r]) * share
        if stand_ins:  # weight 0, but in the graph: the backward makes the sharded layers' calls too
            loss = loss + nll[stand_ins].sum() * 0.0
        value += float(loss.detach())
        if loss.requires_grad:  # else: no picture in this pass, no projector gradient
            part_grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
            grads = [p if g is None else g if p is None else g + p for g, p in zip(grads, part_grads)]
    return grads, value
