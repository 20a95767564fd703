"""Null-space projection of the projector update (AlphaEdit, VL-Eraser), as plain functions.

For a linear layer y = W x + b, write the update as D = [dW | db] acting on the augmented input
x~ = [x; 1]. If every retain input x~ satisfies D x~ = 0, the layer's output on retain inputs is
unchanged. Let C = sum x~ x~^T over the retain inputs and U its top eigenvectors (keeping the
fraction `energy` of the trace); P = I - U U^T projects onto the directions the retain inputs
(almost) never use, and D <- D P keeps the retain outputs (almost) fixed — exactly, when `energy`
is 1 and U spans every retain input.

The projector is an MLP (LLaVA: linear_1, GELU, linear_2; Qwen2-VL: ln_q, merge 2x2, mlp.0, GELU,
mlp.2). Both linear layers are projected: the first against the retain vision features (for
Qwen2-VL: after ln_q and the 4x merge, i.e. the input of mlp.0), the second against the retain
hidden activations, which the projected first layer leaves unchanged. Qwen2-VL's ln_q is frozen
while the null space is in use (any change of it moves every retain input of mlp.0).

`free_energy` says how much of the forget inputs' energy lies in the null space: the room left to
forget in without touching the retain pictures.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# family -> [(weight name, bias name)] of the projector's linear layers, in order
LAYERS = {
    "llava": [("linear_1.weight", "linear_1.bias"), ("linear_2.weight", "linear_2.bias")],
    "qwen2_vl": [("mlp.0.weight", "mlp.0.bias"), ("mlp.2.weight", "mlp.2.bias")],
}
FROZEN = {"llava": (), "qwen2_vl": ("ln_q.weight", "ln_q.bias")}  # tensors that must not move


@torch.no_grad()
def layer_inputs(family: str, params: dict[str, torch.Tensor], features: torch.Tensor) -> list[torch.Tensor]:
    """The input of each linear layer of the projector for these pre-projector features, [rows, d]."""
    x = features.to(torch.float32)
    if family == "qwen2_vl":
        x = F.layer_norm(x, (x.shape[-1],), params["ln_q.weight"], params["ln_q.bias"], eps=1e-6)
        x = x.reshape(-1, params["mlp.0.weight"].shape[1])
    (w1, b1), (w2, _) = LAYERS[family]
    hidden = F.gelu(x @ params[w1].T + (params[b1] if b1 in params else 0))
    return [x, hidden]


def augmented(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


class Covariance:
    """sum x~ x~^T of each layer's augmented inputs, accumulated batch by batch (float64)."""

    def __init__(self):
        self.c: list[torch.Tensor] = []

    def add(self, inputs: list[torch.Tensor]) -> None:
        for k, x in enumerate(inputs):
            a = augmented(x).double()
            if len(self.c) <= k:
                self.c.append(torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device))
            self.c[k] += a.T @ a


def null_projector(cov: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """P = I - U U^T, U the fewest top eigenvectors of `cov` holding `energy` of its trace (energy 1:
    every direction with a non-negligible eigenvalue). Returns (P float32, rank of U)."""
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    total = float(values.sum())
    if total <= 0:
        return torch.eye(cov.shape[0], dtype=torch.float32, device=cov.device), 0
    if energy >= 1.0:
        rank = int((values > values[0] * 1e-10).sum())
    else:
        cumulative = values.cumsum(0) / total
        rank = int((cumulative < energy).sum()) + 1
    u = vectors[:, :rank]
    p = torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device) - u @ u.T
    return p.float(), rank


def projectors(family: str, params, retain_features: list[torch.Tensor], energy: float) -> list[torch.Tensor]:
    """One null-space projector per linear layer, from the retain pictures' features (and views)."""
    cov = Covariance()
    for f in retain_features:
        cov.add(layer_inputs(family, params, f))
    return [null_projector(c, energy)[0] for c in cov.c]


@torch.no_grad()
def project_update(family: str, params: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                   proj: list[torch.Tensor]) -> None:
    """In place: each linear layer's [dW | db] <- [dW | db] P; frozen tensors back to the original."""
    for (w, b), p in zip(LAYERS[family], proj):
        dw = params[w] - original[w]
        db = (params[b] - original[b])[:, None] if b in params else torch.zeros(dw.shape[0], 1, device=dw.device)
        d = torch.cat([dw, db], dim=1) @ p
        params[w].copy_(original[w] + d[:, :-1])
        if b in params:
            params[b].copy_(original[b] + d[:, -1])
    for name in FROZEN[family]:
        if name in params:
            params[name].copy_(original[name])


@torch.no_grad()
def free_energy(family: str, params, proj: list[torch.Tensor], features: list[torch.Tensor]) -> list[float]:
    """Per layer: fraction of the (augmented) inputs' energy that lies in the null space, i.e. the
    part of these pictures the projected update can still act on."""
    inside, total = [0.0] * len(proj), [0.0] * len(proj)
    for f in features:
        for k, x in enumerate(layer_inputs(family, params, f)):
            a = augmented(x)
            inside[k] += float((a @ proj[k]).pow(2).sum())
            total[k] += float(a.pow(2).sum())
    return [i / t if t else 0.0 for i, t in zip(inside, total)]
