"""Stopping on evidence: held-out pictures inside the job, the stopping rule, the state kept, and the
warnings `apply` prints when its own held-out check says a target was missed. Plain functions.

- `split_pictures` sets aside some pictures (all their questions, and later all their augmented
  views) that the optimisation never sees, per subject, always leaving each subject at least one
  picture to train on.
- `chance_level`: exact-answer chance of a question = 1 / number of distinct answers the forget
  and retain folders give to that question (1/number of people for "Who is in this image?").
- `stop_now` / `choose`: checks are (step, held-out forget measure, held-out retain accuracy); the
  job's forget measure (guard.py) is the larger of greedy exact-answer accuracy and the mean
  probability of the whole answer, a margin below the greedy threshold.
  Stop once `confirm` checks in a row have forget accuracy at or below the target (chance) AND
  retain accuracy within `retain_tolerance` of before (both targets met: nothing left to gain).
  Keep, among the checks at the forget target, the one with the best retain accuracy (ties: the
  earliest); when no check reaches the target, the one with the lowest forget accuracy (ties: the
  better retain accuracy, then the earliest). Stopping at the FIRST check at the target is not
  enough: NPO reaches it with a burst that also hurts retain pictures, which the retain terms
  then repair over the next steps while forgetting holds (measured: 8-20 retain points).
- `missed_targets`: the warnings (forgetting above chance + tolerance, retention down by more than
  the tolerance) the job reports and `apply` prints.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass


def split_pictures(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train items, held-out items): about `fraction` of the pictures set aside, taken in turn from
    the subjects that have at least two pictures (each subject keeps at least one to train on).
    Text-only items always train."""
    if fraction <= 0:
        return items, []
    pictures: dict = defaultdict(list)  # subject -> pictures in first-seen order
    for it in items:
        if it.image is not None and it.image not in pictures[it.subject]:
            pictures[it.subject].append(it.image)
    total = sum(len(p) for p in pictures.values())
    wanted = int(round(fraction * total))
    rng = random.Random(seed)
    pools = {s: rng.sample(p, len(p)) for s, p in sorted(pictures.items(), key=lambda kv: str(kv[0]))}
    held: set = set()
    while len(held) < wanted:
        progressed = False
        for subject, pool in pools.items():
            left = [p for p in pool if p not in held]
            if len(left) >= 2 and len(held) < wanted:
                held.add(left[0])
                progressed = True
        if not progressed:
            break
    return [it for it in items if it.image not in held], [it for it in items if it.image in held]


def chance_level(items: list, pool: list) -> float:
    """Mean over `items` of 1 / (distinct answers `pool` gives to the item's question)."""
    answers: dict = defaultdict(set)
    for it in pool:
        answers[it.question].add(it.answer)
    if not items:
        return 0.0
    return sum(1.0 / max(1, len(answers[it.question])) for it in items) / len(items)


@dataclass
class Check:
    step: int
    forget: float  # held-out forget exact-answer accuracy
    retain: float  # held-out retain exact-answer accuracy (nan when there is none)


def _retain_ok(c: Check, retain_before: float, tolerance: float) -> bool:
    return c.retain != c.retain or retain_before != retain_before or c.retain >= retain_before - tolerance - 1e-12


def stop_now(checks: list[Check], target: float, confirm: int = 1, retain_before: float = float("nan"),
             retain_tolerance: float = 0.02) -> bool:
    """True once the last `confirm` checks all have forget accuracy <= target and retain accuracy
    within `retain_tolerance` of `retain_before` (nan: no retain check)."""
    if len(checks) < confirm:
        return False
    return all(c.forget <= target + 1e-12 and _retain_ok(c, retain_before, retain_tolerance) for c in checks[-confirm:])


def choose(checks: list[Check], target: float) -> int:
    """Index of the check whose state the job keeps (see the module docstring)."""
    if not checks:
        raise ValueError("no checks")
    retain = lambda i: checks[i].retain if checks[i].retain == checks[i].retain else 0.0
    at_target = [i for i, c in enumerate(checks) if c.forget <= target + 1e-12]
    if at_target:
        return min(at_target, key=lambda i: (-retain(i), checks[i].step))
    return min(range(len(checks)), key=lambda i: (checks[i].forget, -retain(i), checks[i].step))


def missed_targets(forget_after: float, chance: float, retain_before: float | None, retain_after: float | None,
                   forget_tolerance: float = 0.05, retain_tolerance: float = 0.02) -> list[str]:
    """Warnings for the job's own held-out check (empty when both targets are met)."""
    out = []
    if forget_after > chance + forget_tolerance + 1e-12:
        out.append(f"forgetting missed its target on the job's held-out pictures: exact-answer accuracy "
                   f"{100 * forget_after:.1f}% > chance {100 * chance:.1f}% + {100 * forget_tolerance:.0f} points")
    if retain_before is not None and retain_after is not None and retain_after < retain_before - retain_tolerance - 1e-12:
        out.append(f"retention missed its target on the job's held-out pictures: exact-answer accuracy "
                   f"{100 * retain_before:.1f}% -> {100 * retain_after:.1f}% (more than {100 * retain_tolerance:.0f} points lost)")
    return out
