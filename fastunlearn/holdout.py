"""Whole pictures a first run does not see: the erasure measured on them, and, when asked, the choice they make.

A new picture of a person is what the erasure must hold on, and an augmented view of a training
picture is a poor stand-in for one: the retain term restores the very pictures it trains on, so
their views recover while new pictures of the same people do not (benchmarks/RESULTS.md). So, in
each folder, every subject (first folder under it) with two or more pictures lends one, chosen by
the seed, with all its questions, to a held-out set. A first run trains on the rest and is scored
on the held-out pictures: those are the report's headline figures. The last run then trains, with
the same settings and steps, on every picture, so holding out costs time, not training data.

With `select`, the held-out pictures also choose the step (scored every tenth of the steps); with
`search`, between the given settings and a gentler one. The rule: a projector whose held-out forget
accuracy is within FORGET_TOLERANCE of chance beats one that is not; among those, the smaller
held-out retain drop wins, then the higher forget answer NLL (one picture a person is too few to
certify "at chance", so the first checkpoint that reaches it is not taken when a later one costs no
more retain accuracy); among the others, the lower forget accuracy wins, then the same. Remaining
ties go to the earlier setting (the given one first) and the earlier step. Both are off by default:
measured on the demo world they cut the mean retain drop and raised the worst forget accuracy on
new pictures (benchmarks/RESULTS.md, "Held-out pictures").
"""
from __future__ import annotations

import math
import random
from dataclasses import replace

from .data import Item
from .forward import score, summarize
from .optimise import optimise
from .ranks import ONE_PROCESS
from .targets import FORGET_TOLERANCE



def split(items: list[Item], seed: int) -> tuple[list[Item], list[Item], list[str]]:
    """(training items, held-out items, subjects too thin to lend a picture). Text-only items train."""
    pictures: dict[str, list] = {}
    for it in items:
        if it.image is not None and it.image not in pictures.setdefault(it.subject, []):
            pictures[it.subject].append(it.image)
    held = set()
    for subject, images in pictures.items():
        if len(images) >= 2:
            held.add(random.Random(f"{seed}:{subject}").choice(sorted(images)))
    thin = sorted(s for s, images in pictures.items() if len(images) < 2)
    return [it for it in items if it.image not in held], [it for it in items if it.image in held], thin


def sample_flags(items: list[Item], views: int, held_images: set) -> list[bool]:
    """Per cached sample of `items` (features.cache_samples: one per text item, 1 + views per picture's
    item, in order): is its picture held out?"""
    return [it.image in held_images for it in items for _ in range(1 if it.image is None else 1 + views)]


ANCHORED = 10.0  # the anchor weight of the anchored candidate


def candidates(cfg) -> list:
    """The settings to try: the given ones and, when cfg.search, an anchored one (the anchor term on the
    retain pictures' visual tokens at weight ANCHORED, where the given settings have none: it keeps more
    and forgets less, so which one a folder needs is for its held-out pictures to say) and a gentler one:
    a tenth of the step, no mask, a retain term 2 stronger, a fifth more steps (from the defaults: --lr
    1e-3 --mask none --retain-weight 5 --steps 120, which on a world where single patches already tell
    people apart forgot everyone and kept the rest where the defaults lost 3-16 retain points)."""
    if not cfg.search:
        return [cfg]
    anchored = [replace(cfg, anchor_weight=ANCHORED)] if not cfg.anchor_weight else []
    gentler = replace(cfg, lr=cfg.lr / 10, mask="none", retain_weight=cfg.retain_weight + 2,
                      steps=math.ceil(cfg.steps * 1.2))
    return [cfg, *anchored, gentler]


def eval_every(steps: int) -> int:
    return max(1, steps // 10)


def rank_key(forget_acc: float, chance: float, retain_drop: float, forget_nll: float) -> tuple:
    """Smaller is better (module docstring)."""
    forgotten = forget_acc <= chance + FORGET_TOLERANCE + 1e-12
    return (not forgotten, 0.0 if forgotten else round(forget_acc, 6), round(retain_drop, 6), -forget_nll)


def describe_setting(cfg) -> str:
    return (f"--method {cfg.method} --lr {cfg.lr:g} --mask {cfg.mask} --retain-weight {cfg.retain_weight:g} "
            f"--anchor-weight {cfg.anchor_weight:g} --steps {cfg.steps}")


def first_runs(loaded, original, settings, masks, everything, forget_batches, retain_batches, heldout,
               heldout_before, chance, select, log, ranks=ONE_PROCESS, anchors=None, others=None) -> dict:
    """Each setting from the original projector, on the pictures not held out (`masks`: taken on them too),
    scored on the held-out ones at its last step (and every tenth of its steps when `select`); returns the
    best (rank_key): setting index, step, projector, and the trace of every score."""
    best: dict = {"key": None, "trace": []}
    for index, setting in enumerate(settings):
        mask = masks.get(setting.mask, everything)

        def checkpoint(step, current, index=index):
            f, r = (summarize(score(loaded, current, heldout[role], ranks), heldout[role], ranks)
                    for role in ("forget", "retain"))
            drop = heldout_before["retain"]["greedy_accuracy"] - r["greedy_accuracy"] if heldout["retain"] else 0.0
            key = rank_key(f["greedy_accuracy"] if heldout["forget"] else 0.0, chance, drop, f["mean_token_nll"])
            best["trace"].append({"setting": index, "step": step, "forget_accuracy": f["greedy_accuracy"],
                                  "forget_nll": f["mean_token_nll"], "retain_accuracy": r["greedy_accuracy"],
                                  "retain_nll": r["mean_token_nll"]})
            if best["key"] is None or key < best["key"]:
                best.update(key=key, setting=index, step=step, params={n: p.detach().clone() for n, p in current.items()})

        trial = {n: p.detach().clone() for n, p in original.items()}
        optimise(loaded, trial, mask, forget_batches, retain_batches, setting, log, checkpoint,
                 eval_every(setting.steps) if select else setting.steps, ranks, anchors, others)
    return best
