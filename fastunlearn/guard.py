"""What keeps the erasure on target (issue 9): the retain anchor, the null-space projection, the
trust region and the held-out stopping rule, bundled for `unlearn.optimise` (three call sites:
`extra_loss` in the loss, `after_step` after each update, `finish` after the loop).

Each piece is optional and off at 0 in Config: anchor_weight, nullspace_energy, max_relative_update,
holdout. The logic lives in anchor.py, nullspace.py and stopping.py; this module only holds the
job's state (original tensors, projectors, checks, the best state seen).
"""
from __future__ import annotations

import math

import torch

from . import anchor, nullspace, stopping


def _unique_features(samples) -> list:
    seen, out = set(), []
    for s in samples:
        if s.features is not None and id(s.features) not in seen:
            seen.add(id(s.features))
            out.append(s.features)
    return out


class Guard:
    def __init__(self, loaded, params, cfg, *, retain_samples=(), forget_samples=(), forget_check=(), retain_check=(),
                 chance: float = 0.0, log=print):
        from .unlearn import score  # unlearn imports this module

        def accuracy(p, batches, soft=False):
            """Greedy exact-answer accuracy; with soft, the larger of it and the mean probability of the
            whole answer (what sampling would say: a margin below the greedy threshold)."""
            if not batches:
                return math.nan
            out = score(loaded, p, batches)
            greedy = float(out["correct"].float().mean())
            return max(greedy, float(torch.exp(-out["nll"]).mean())) if soft else greedy

        self._score = accuracy
        self.cfg, self.log, self.loaded = cfg, log, loaded
        self.family = loaded.adapter.family
        self.original = {n: p.detach().clone() for n, p in params.items()}
        self.forget_check, self.retain_check = list(forget_check), list(retain_check)
        self.chance = chance
        self.target = cfg.forget_target if cfg.forget_target >= 0 else chance
        self.proj = None
        self.free_energy = None
        self.ranks = None
        device = loaded.device
        if cfg.nullspace_energy > 0 and retain_samples and self.family in nullspace.LAYERS:
            feats = [f.to(device, torch.float32) for f in _unique_features(retain_samples)]
            self.proj = nullspace.projectors(self.family, self.original, feats, cfg.nullspace_energy)
            self.ranks = [int(round(float(torch.trace(torch.eye(p.shape[0], device=p.device) - p)))) for p in self.proj]
            forget_feats = [f.to(device, torch.float32) for f in _unique_features(forget_samples)]
            self.free_energy = nullspace.free_energy(self.family, self.original, self.proj, forget_feats)
            retain_free = nullspace.free_energy(self.family, self.original, self.proj, feats)
            log(f"null space: retain rank per layer {self.ranks}, forget energy left to act on "
                f"{[round(x, 4) for x in self.free_energy]} (retain: {[round(x, 6) for x in retain_free]})")
        # the anchor's pictures: every retain picture and view (features cached once), a random subset per step
        self.anchor_features = [f for f in _unique_features(retain_samples)] if cfg.anchor_weight > 0 else []
        self.anchor_rng = torch.Generator().manual_seed(cfg.seed)
        # the identity-agnostic target for the forget pictures' visual tokens: the mean original output
        # over the retain pictures (per token position when every picture has the same token count)
        self.forget_target = None
        if cfg.forget_anchor_weight > 0 and retain_samples:
            self.forget_target = anchor.mean_output(loaded.adapter.project, self.original,
                                                    [f.to(device, torch.float32) for f in _unique_features(retain_samples)])
        self.checks: list[stopping.Check] = []
        self.kept_state: dict | None = None
        self.before = {"forget": self._score(self.original, self.forget_check, soft=True),
                       "retain": self._score(self.original, self.retain_check)}
        self.stopped_at = None
        self.chosen = None

    # ---- call site 1: in the loss
    def extra_loss(self, params, forget_batch, retain_batch):
        loss = 0.0
        if self.forget_target is not None and forget_batch.features is not None:
            loss = self.cfg.forget_anchor_weight * anchor.target_loss(
                self.loaded.adapter.project, params, forget_batch.features.to(torch.float32), self.forget_target)
        if self.cfg.anchor_weight <= 0 or not self.anchor_features:
            return loss
        n = len(self.anchor_features)
        pick = torch.randperm(n, generator=self.anchor_rng)[: self.cfg.anchor_pictures] if self.cfg.anchor_pictures else range(n)
        feats = torch.cat([self.anchor_features[int(i)].to(self.loaded.device, torch.float32) for i in pick])
        return loss + self.cfg.anchor_weight * anchor.anchor_loss(self.loaded.adapter.project, params, self.original, feats)

    # ---- call site 2: after each update; True = stop
    @torch.no_grad()
    def after_step(self, step: int, params, mask=None) -> bool:
        if self.proj is not None:
            nullspace.project_update(self.family, params, self.original, self.proj)
            if mask is not None:
                for n, p in params.items():
                    p.copy_(torch.where(mask[n], p, self.original[n]))
        if self.cfg.max_relative_update > 0:
            anchor.trust_region_(params, self.original, self.cfg.max_relative_update)
        if not self.forget_check or (step + 1) % self.cfg.check_every or step + 1 < min(self.cfg.min_steps, self.cfg.steps):
            return False
        frozen = {n: p.detach() for n, p in params.items()}
        check = stopping.Check(step + 1, self._score(frozen, self.forget_check, soft=True),
                               self._score(frozen, self.retain_check))
        self.checks.append(check)
        if stopping.choose(self.checks, self.target) == len(self.checks) - 1:
            self.kept_state = {n: p.detach().clone() for n, p in params.items()}  # the best state seen so far
        stop = stopping.stop_now(self.checks, self.target, self.cfg.confirm_checks, self.before["retain"],
                                 self.cfg.retain_tolerance)
        if stop:
            self.stopped_at = step + 1
        return stop

    # ---- call site 3: after the loop; puts the chosen state into params
    @torch.no_grad()
    def finish(self, params) -> None:
        if not self.checks:
            return
        self.chosen = stopping.choose(self.checks, self.target)
        for n, p in params.items():
            p.copy_(self.kept_state[n])

    def report(self) -> dict:
        chosen = self.checks[self.chosen] if self.chosen is not None else None
        out = {
            "heldout_items": {"forget": sum(len(b.lengths) for b in self.forget_check),
                              "retain": sum(len(b.lengths) for b in self.retain_check)},
            "chance": round(self.chance, 6),
            "forget_target": round(self.target, 6),
            "before": {k: (round(v, 6) if v == v else None) for k, v in self.before.items()},
            "checks": [[c.step, round(c.forget, 4), (round(c.retain, 4) if c.retain == c.retain else None)] for c in self.checks],
            "stopped_at_step": self.stopped_at,
            "kept_step": chosen.step if chosen else None,
            "after": ({"forget": round(chosen.forget, 6), "retain": (round(chosen.retain, 6) if chosen.retain == chosen.retain else None)}
                      if chosen else None),
            "why": self._why(chosen),
            "nullspace": ({"energy": self.cfg.nullspace_energy, "retain_rank": self.ranks,
                           "forget_energy_free": [round(x, 6) for x in self.free_energy]} if self.proj is not None else None),
        }
        out["warnings"] = self.warnings(out)
        return out

    def _why(self, chosen) -> str:
        if chosen is None:
            return "no held-out pictures: ran the fixed number of steps"
        if chosen.forget <= self.target + 1e-12:
            r = "" if chosen.retain != chosen.retain else f" with the best held-out retain accuracy ({100 * chosen.retain:.1f}%)"
            how = f"stopped at step {self.stopped_at} (both targets met)" if self.stopped_at else f"ran all {self.cfg.steps} steps"
            return (f"kept step {chosen.step}: of the checks where held-out forget accuracy reached the target "
                    f"({100 * self.target:.1f}%), the one{r}; {how}")
        return (f"kept step {chosen.step}: held-out forget accuracy never reached the target "
                f"({100 * self.target:.1f}%) in {self.cfg.steps} steps; this check had the lowest ({100 * chosen.forget:.1f}%)")

    def warnings(self, out) -> list[str]:
        if out["after"] is None:
            return []
        rb, ra = out["before"]["retain"], out["after"]["retain"]
        return stopping.missed_targets(out["after"]["forget"], self.chance, rb, ra,
                                       self.cfg.forget_tolerance, self.cfg.retain_tolerance)
