"""The job's own check of its targets, printed as warnings instead of a silent success.

After the update, the job scores every forget and retain picture on one more augmented view of it
that the optimisation never saw (view `views + 1`: another shift, scale, tilt, mirror and lighting
of the same picture). The targets:

- forgetting: exact-answer accuracy on the forget pictures' unseen views <= chance + 5 points,
  where chance = 1 / (number of distinct answers the folders give to the question; for "Who is in
  this image?" that is 1 / number of people);
- retention: exact-answer accuracy on the retain pictures' unseen views falls by at most 2 points.

An unseen view is weaker evidence than an unseen picture, most of all for retention: the retain
term repairs the very pictures the job trains on, so their views recover while new pictures of the
same people do not (benchmarks/RESULTS.md, efficacy, fourth round: over 60 runs new pictures lost
4-39 points in every run, and nothing measured on the check views predicted it). A clean check is
not a proof; a missed one is a reason not to ship the result.
"""
from __future__ import annotations

from collections import defaultdict

FORGET_TOLERANCE = 0.05
RETAIN_TOLERANCE = 0.02
# what this check cannot see, as measured (benchmarks/RESULTS.md, efficacy, fourth round)
RETENTION_ON_NEW_PICTURES = ("new pictures of the kept people lost 4-39 points in every one of 60 benchmark runs, "
                             "whatever this check said")


def chance_level(items: list, pool: list) -> float:
    """Mean over `items` of 1 / (distinct answers `pool` gives to the item's question)."""
    answers: dict = defaultdict(set)
    for it in pool:
        answers[it.question].add(it.answer)
    if not items:
        return 0.0
    return sum(1.0 / max(1, len(answers[it.question])) for it in items) / len(items)


def missed_targets(forget_after: float, chance: float, retain_before: float | None, retain_after: float | None,
                   forget_tolerance: float = FORGET_TOLERANCE, retain_tolerance: float = RETAIN_TOLERANCE,
                   forget_on: str = "unseen views", retain_on: str = "unseen views") -> list[str]:
    """One warning per missed target (empty when both are met). `forget_on` / `retain_on`: what was
    scored ("held-out pictures" of the folders, or "unseen views" of the training pictures)."""
    out = []
    if forget_after > chance + forget_tolerance + 1e-12:
        out.append(f"forgetting missed its target on {forget_on} of the forget folders: exact-answer accuracy "
                   f"{100 * forget_after:.1f}% > chance {100 * chance:.1f}% + {100 * forget_tolerance:.0f} points")
    if retain_before is not None and retain_after is not None and retain_after < retain_before - retain_tolerance - 1e-12:
        out.append(f"retention missed its target on {retain_on} of the retain folder: exact-answer accuracy "
                   f"{100 * retain_before:.1f}% -> {100 * retain_after:.1f}% (more than {100 * retain_tolerance:.0f} points lost)")
    return out
