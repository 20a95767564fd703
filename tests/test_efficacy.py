"""The job's own check of its targets (targets.py) and the warning `apply` prints when it
misses. The efficacy protocol itself (5 draws, both families, look-alikes) is benchmarks/efficacy.py."""
from pathlib import Path

import pytest

from fastunlearn import targets
from fastunlearn.config import Config
from fastunlearn.data import Item
from fastunlearn.applying import apply


def test_chance_is_one_over_the_distinct_answers():
    items = [Item(Path(f"{s}/{k}.png"), q, f"{s}-{q}", s) for s in "abc" for k in range(2) for q in ("who", "job")]
    assert targets.chance_level([it for it in items if it.question == "who"], items) == pytest.approx(1 / 3)
    assert targets.chance_level([], items) == 0.0


def test_missed_targets():
    assert targets.missed_targets(0.10, 0.05, 0.9, 0.89) == []  # exactly chance + 5 and - 1 point: met
    warnings = targets.missed_targets(0.3, 0.05, 0.9, 0.8)
    assert len(warnings) == 2 and "forgetting" in warnings[0] and "retention" in warnings[1]
    assert targets.missed_targets(0.0, 0.05, None, None) == []


def test_apply_warns_when_its_own_check_misses(variant, folders):
    """One step cannot forget: the job's check on unseen views (no picture held out) says so, and
    apply logs a WARNING."""
    notes = []
    report = apply(variant("llava"), folders / "forget", folders / "retain", dry_run=True,
                   config=Config(steps=1, views=1, fisher_samples=8, holdout=False), log=notes.append)
    check = report["check"]
    assert check["chance"] == pytest.approx(1 / 8)  # 8 people, one name each
    assert check["forget_after"] > check["chance"] + 0.05
    assert any(n.startswith("WARNING: forgetting missed its target") for n in notes), notes
    assert check["warnings"] and all(f"WARNING: {w}" in notes for w in check["warnings"])
    # the retain check cannot see new pictures: apply says so and names the gate that can
    assert any(n.startswith("note: retention was checked on new views") and "--max-retain-drop" in n for n in notes)


def test_a_successful_erasure_passes_its_check(variant, folders):
    notes = []
    report = apply(variant("llava"), folders / "forget", folders / "retain", dry_run=True, config=Config(),
                   log=notes.append)
    check = report["check"]
    assert check["on"] == {"forget": "held-out pictures", "retain": "held-out pictures"}
    assert check["forget_after"] <= check["chance"] + 0.05
    assert not any(n.startswith("WARNING: forgetting") for n in notes)
    assert check["retain_before"] is not None and check["retain_after"] is not None
    # the retain views' answer NLL, before and after (RESULTS.md: what it does and does not predict)
    assert 0 <= check["retain_nll_before"] < 1 and 0 <= check["retain_nll_after"] < 1
    assert check["retain_nll_after"] != check["retain_nll_before"]  # the update moved the retain answers
