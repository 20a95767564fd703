"""The anchor term: on pictures that must not change (the retain pictures, and any the user passes
with `--anchor DIR`, which need no questions), keep the edit's output close to the original model's.

The edit's output is what the visual side hands the LLM: the connector's tokens (after the edited
tower layers under `--scope vision:K`). It is computed from the cached features alone, so the term
needs no LLM pass; the original outputs are computed once, before the first step. Per picture p
with original output y_p and edited output f_p (tokens x hidden):

    anchor = mean_p ||f_p - y_p||^2 / ||y_p||^2

a relative distance, so its weight does not depend on the model's scale. Each step takes the next
`batch` anchor pictures in turn."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Anchors:
    features: list  # each picture's cached features (the connector's, or the first edited layer's input)
    grids: list  # each picture's layout, as the adapter takes it
    targets: list[torch.Tensor]  # each picture's original output, [tokens, hidden], fp32
    share: float  # this rank's share of the term (1 / ranks: each rank anchors the pictures it owns)


def pictures(samples: list) -> list:
    """One sample per picture and augmented view (a picture's questions share its features), text
    samples out."""
    seen, out = set(), []
    for s in samples:
        features = getattr(s, "features", None)
        if features is not None and id(features) not in seen:
            seen.add(id(features))
            out.append(s)
    return out


def anchors_for(loaded, params: dict, samples: list, weight: float, world: int = 1) -> Anchors | None:
    """The anchors of a run (None when the term is off): these samples' pictures and views."""
    return original_outputs(loaded, params, pictures(samples), 1 / world) if weight else None


@torch.no_grad()
def original_outputs(loaded, params: dict, samples: list, share: float = 1.0, chunk: int = 8) -> Anchors:
    """The anchor pictures' outputs under the original parameters `params`, computed once."""
    features = [s.features for s in samples]
    grids = [s.grid for s in samples]
    targets = []
    for start in range(0, len(features), chunk):
        targets += [t.detach() for t in _outputs(loaded, params, features[start:start + chunk], grids[start:start + chunk])]
    return Anchors(features, grids, targets, share)


def _outputs(loaded, params, features, grids) -> list[torch.Tensor]:
    values = [f.to(loaded.device, torch.float32) for f in features]
    out = loaded.adapter.project_each(loaded.model, params, values, grids)
    return [o.float().reshape(-1, o.shape[-1]) for o in out]


def anchor_loss(loaded, params: dict, anchors: Anchors, step: int, batch: int) -> torch.Tensor:
    """This rank's share of the anchor term at `step`: the mean over the step's `batch` pictures of their
    relative squared distance, times the rank's share."""
    n = len(anchors.features)
    if n == 0:
        return sum((p * 0).sum() for p in params.values())  # in the graph, zero gradient
    take = [(step * batch + k) % n for k in range(min(batch, n))]
    outputs = _outputs(loaded, params, [anchors.features[i] for i in take], [anchors.grids[i] for i in take])
    distances = [((f - anchors.targets[i].to(f.device)) ** 2).sum() / (anchors.targets[i] ** 2).sum().clamp_min(1e-12)
                 for f, i in zip(outputs, take)]
    return torch.stack(distances).mean() * anchors.share
