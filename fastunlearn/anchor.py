"""Anchoring the projector's output on retain pictures, as plain functions.

    L_anchor = sum_f ||P_theta(f) - P_0(f)||^2 / sum_f ||P_0(f)||^2

over the retain features of a batch (the pictures and their augmented views): the relative squared
change of the visual tokens the LLM reads for pictures that must keep working. It needs no LLM
pass (only the projector, twice: P_0 under no_grad with the original tensors), it is 0 at the
start and its gradient is 0 there, so it only resists movement away from the original outputs.
Unlike retain NLL, it does not reward making retain answers *more* confident (which, on a thin
retain set, overfits a few pictures) and it protects everything the visual tokens carry, not only
the answers that were asked.
"""
from __future__ import annotations

import torch


def anchor_loss(project, params: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                features: torch.Tensor) -> torch.Tensor:
    """Relative squared change of the projector output on `features` ([tokens, d])."""
    with torch.no_grad():
        ref = project(original, features)
    out = project(params, features)
    return (out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12)


@torch.no_grad()
def mean_output(project, params: dict[str, torch.Tensor], features: list[torch.Tensor]) -> torch.Tensor:
    """Mean projector output over pictures: [tokens, H] per token position when all pictures have the
    same number of tokens, else [1, H] (the mean token)."""
    outs = [project(params, f) for f in features]
    if len({o.shape for o in outs}) == 1:
        return torch.stack(outs).mean(0)
    return torch.cat(outs).mean(0, keepdim=True)


def target_loss(project, params: dict[str, torch.Tensor], features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative squared distance of the projector output on `features` (pictures concatenated) from
    `target` (one picture's worth of tokens, repeated; or one token, broadcast)."""
    out = project(params, features)
    t = target.repeat(out.shape[0] // target.shape[0], 1) if target.shape[0] > 1 else target
    return (out - t).pow(2).sum() / t.expand_as(out).pow(2).sum().clamp_min(1e-12)


def relative_update(params: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> float:
    """||theta - theta_0|| / ||theta_0|| over all projector tensors."""
    num = sum(float((params[n] - original[n]).pow(2).sum()) for n in params)
    den = sum(float(original[n].pow(2).sum()) for n in params)
    return (num / den) ** 0.5 if den else 0.0


@torch.no_grad()
def trust_region_(params: dict[str, torch.Tensor], original: dict[str, torch.Tensor], max_relative: float) -> bool:
    """Cap ||theta - theta_0|| at `max_relative` x ||theta_0|| per tensor (scale the delta back in place).
    Returns True when any tensor was scaled."""
    scaled = False
    for n, p in params.items():
        base = float(original[n].norm())
        delta = p - original[n]
        norm = float(delta.norm())
        if base > 0 and norm > max_relative * base:
            p.copy_(original[n] + delta * (max_relative * base / norm))
            scaled = True
    return scaled
