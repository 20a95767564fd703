"""Whole-model baselines: the same objectives as fastunlearn (GA, GradDiff, NPO; optionally the
MMUnlearner Fisher-ratio mask), updating the LLM (embeddings, layers, lm_head) *and* the projector,
as the published baselines do. Used only by benchmarks/compare.py.

Same data, views, batches, steps, retain weight and masked AdamW as fastunlearn's job; the vision
tower stays frozen and its features are cached (the published baselines also freeze it), and the
NPO reference NLLs are computed once from the original model (no second model copy) -- both
choices favour the baselines' time and memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastunlearn.data import read_folder
from fastunlearn.kernels.masked_adamw import masked_adamw_
from fastunlearn.objectives import forget_loss, retain_nll, uses_retain
from fastunlearn.batches import make_batches
from fastunlearn.config import Config, pick_device, seed_everything
from fastunlearn.features import cache_samples, drop_vision_tower
from fastunlearn.forward import answer_hidden, score
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.mask import fisher_samples, saliency_mask


def sequence_nll(loaded, projector, llm_lm_head, batch) -> torch.Tensor:
    """Per-sequence answer NLL with gradients to the LLM weights too (full logits at answer rows)."""
    hidden = answer_hidden(loaded, projector, batch)
    token_nll = F.cross_entropy(hidden @ llm_lm_head.T, batch.targets, reduction="none")
    return torch.zeros(len(batch.lengths), device=hidden.device).index_add(0, batch.answer_seq, token_nll)


def fisher_all(loaded, projector, llm, samples, limit) -> dict[str, torch.Tensor]:
    """Diagonal Fisher E[g^2] of each sample's answer NLL over every trainable tensor, fp32."""
    chosen = fisher_samples(samples, limit)  # as the job: the pictures themselves, evenly spread
    tensors = {**{"projector." + n: p for n, p in projector.items()}, **llm}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in tensors.items()}
    lm_head = loaded.model.get_output_embeddings().weight
    for sample in chosen:
        nll = sequence_nll(loaded, projector, lm_head, make_batches(loaded, [sample], 1)[0]).sum()
        grads = torch.autograd.grad(nll, list(tensors.values()), allow_unused=True)
        for name, g in zip(tensors, grads):
            if g is not None:
                fisher[name] += g.float() ** 2
    return {n: f / len(chosen) for n, f in fisher.items()}


def run_full_model(ckpt, forget_dir, retain_dir, cfg: Config) -> dict:
    """Run one whole-model method. Returns the new projector tensors (module names), the new LLM
    tensors (model parameter names), the loss curve and the mask density."""
    cfg.check()
    seed_everything(cfg.seed)
    loaded = open_checkpoint(ckpt, pick_device(cfg.device))
    forget_samples = cache_samples(loaded, read_folder(forget_dir, "forget"), "forget", cfg.views, cfg.seed)
    retain_samples = cache_samples(loaded, read_folder(retain_dir, "retain"), "retain", cfg.views, cfg.seed)
    drop_vision_tower(loaded)  # the vision tower is frozen: what remains is the LLM (and lm_head)
    forget_batches = make_batches(loaded, forget_samples, cfg.batch_size)
    retain_batches = make_batches(loaded, retain_samples, cfg.batch_size)

    projector = master_params(loaded)
    reference = score(loaded, projector, forget_batches)["nll"]
    for batch, ref in zip(forget_batches, reference.split([len(b.lengths) for b in forget_batches])):
        batch.ref_nll = ref.to(loaded.device)
    llm = dict(loaded.model.named_parameters())  # language model, embeddings, lm_head
    for p in [*projector.values(), *llm.values()]:
        p.requires_grad_(True)
    tensors = {**{"projector." + n: p for n, p in projector.items()}, **llm}

    if cfg.mask == "fisher":
        mask = saliency_mask(fisher_all(loaded, projector, llm, forget_samples, cfg.fisher_samples),
                             fisher_all(loaded, projector, llm, retain_samples, cfg.fisher_samples), cfg.mask_threshold)
    else:
        mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in tensors.items()}

    lm_head = loaded.model.get_output_embeddings().weight
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in tensors.items()}
    losses = []
    for step in range(cfg.steps):
        fb = forget_batches[step % len(forget_batches)]
        loss = forget_loss(cfg.method, sequence_nll(loaded, projector, lm_head, fb), fb.ref_nll, fb.lengths, cfg.beta)
        if retain_batches and uses_retain(cfg.method):
            rb = retain_batches[step % len(retain_batches)]
            loss = loss + cfg.retain_weight * retain_nll(sequence_nll(loaded, projector, lm_head, rb), rb.lengths)
        grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
        with torch.no_grad():
            for (name, p), g in zip(tensors.items(), grads):
                if g is not None:
                    masked_adamw_(p, g, mask[name], *state[name], step=step + 1, lr=cfg.lr, beta1=0.9, beta2=0.999,
                                  eps=1e-8, weight_decay=cfg.weight_decay)
        losses.append(float(loss.detach()))
    density = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    return {
        "projector": {n: p.detach().cpu().clone() for n, p in projector.items()},
        "model": {n: p.detach().cpu().clone() for n, p in llm.items()},
        "losses": losses,
        "mask_density": density,
    }
