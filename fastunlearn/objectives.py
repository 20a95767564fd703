"""Unlearning objectives over per-sequence answer NLLs (sum over answer tokens).

NPO     L = -(2/beta) * mean_i logsigmoid(beta * (nll_i - ref_i)),
        dL/dnll_i = -(2/n) * sigmoid(-beta * (nll_i - ref_i)): starts as gradient ascent and fades
        once an answer is beta-times less likely than under the reference.
SimNPO  L = -(2/beta) * mean_i logsigmoid(beta * nll_i / len_i - gamma): reference-free, length-normalised.
GA      L = -mean_i nll_i (unbounded: it destroys the projector unless stopped early).
Other   (--other-answers) NPO again, with ref_i = -log mean_j exp(-nll_ij), nll_ij the NLL of the j-th of
        M other answers to the same question on the same picture under the current parameters (no gradient):
        it pushes the forgotten answer until it is no more likely than someone else's (optimise.other_reference).
Retain  mean per-token NLL of the retain answers, added with weight `retain_weight`.
GradDiff = GA + retain.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("npo", "simnpo", "ga", "graddiff")


def npo(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_nll)).mean()


def simnpo(nll: torch.Tensor, lengths: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    return -(2.0 / beta) * F.logsigmoid(beta * nll / lengths - gamma).mean()


def gradient_ascent(nll: torch.Tensor) -> torch.Tensor:
    return -nll.mean()


def retain_nll(nll: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return nll.sum() / lengths.sum()


def forget_loss(method: str, nll, ref_nll, lengths, beta: float) -> torch.Tensor:
    if method == "npo":
        return npo(nll, ref_nll, beta)
    if method == "simnpo":
        return simnpo(nll, lengths, beta)
    if method in ("ga", "graddiff"):
        return gradient_ascent(nll)
    raise ValueError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")


def uses_retain(method: str) -> bool:
    """GA is the one method that ignores retain data."""
    return method != "ga"
