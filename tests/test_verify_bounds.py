"""Figures an auditor can sign: every accuracy with its 95% interval, thresholds on the interval's
bound (--confidence), the items a bound needs, and the relearning attack as a gated check."""
import json
import math

import pytest

import fastunlearn
from fastunlearn import intervals as ci
from fastunlearn.cli import main
from fastunlearn.html_report import render_html, summary_lines
from fastunlearn.checks import add_intervals, relearn_checks, threshold_checks

from conftest import asset

FAST = fastunlearn.Config(steps=4, views=0, fisher_samples=8, device="cpu")


# ---------------------------------------------------------------- interval functions


def test_clopper_pearson_matches_published_values():
    assert ci.clopper_pearson(0, 20) == (0.0, pytest.approx(1 - 0.025 ** (1 / 20), abs=1e-12))  # 0.1684
    assert ci.clopper_pearson(20, 20) == (pytest.approx(0.025 ** (1 / 20), abs=1e-12), 1.0)
    # R: binom.test(1, 20), binom.test(5, 20), binom.test(c(682, 243)) (the last from R's own documentation)
    assert ci.clopper_pearson(1, 20) == pytest.approx((0.001265089, 0.248732763), abs=1e-8)
    assert ci.clopper_pearson(5, 20) == pytest.approx((0.08657147, 0.49104587), abs=1e-8)
    assert ci.clopper_pearson(682, 925) == pytest.approx((0.7076683, 0.7654066), abs=1e-7)
    assert ci.clopper_pearson(0, 20, 0.9)[1] == pytest.approx(1 - 0.05 ** (1 / 20), abs=1e-12)


def test_wilson_matches_hand_computed_values():
    z2 = 1.959963984540054 ** 2
    assert ci.wilson(0, 20) == pytest.approx((0.0, z2 / (20 + z2)), abs=1e-9)  # 0.1611
    assert ci.wilson(20, 20) == pytest.approx((20 / (20 + z2), 1.0), abs=1e-9)  # 0.8389
    assert ci.wilson(1, 20) == pytest.approx((0.008881, 0.236131), abs=1e-6)


def test_binomial_cdf_and_bad_counts():
    assert ci.binomial_cdf(1, 3, 0.5) == pytest.approx(0.5)
    assert ci.binomial_cdf(0, 20, 0.05) == pytest.approx(0.95 ** 20)
    assert ci.binomial_cdf(2, 10, 0.3) == pytest.approx(0.3827827864, abs=1e-10)
    for k, n in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError):
            ci.clopper_pearson(k, n)
    with pytest.raises(ValueError, match="confidence"):
        ci.clopper_pearson(1, 5, 1.0)


@pytest.mark.parametrize("limit", [0.3, 0.1, 0.05, 0.01])
def test_items_needed_is_the_fewest_items_a_bound_can_pass_on(limit):
    needed = ci.items_needed(limit)
    assert needed == math.ceil(math.log(0.025) / math.log(1 - limit))  # 0 errors: 1 - 0.025^(1/n) <= limit
    assert ci.clopper_pearson(0, needed)[1] <= limit < ci.clopper_pearson(0, needed - 1)[1]
    assert ci.drop_interval(0, 0, needed)[1] <= limit < ci.drop_interval(0, 0, needed - 1)[1]


def test_items_needed_edges():
    assert ci.items_needed(0.05) == 72 and ci.items_needed(0.05, 0.9) == 59
    assert ci.items_needed(0.0) is None and ci.items_needed(1.0) == 1


def test_drop_interval_covers_the_true_drop_at_least_95_percent():
    """Exact coverage over every outcome of 20 paired items (lost, gained, unchanged ~ multinomial)."""
    n = 20
    bounds = {(b, c): ci.drop_interval(b, c, n) for b in range(n + 1) for c in range(n + 1 - b)}
    for p_lost, p_gained in ((0.0, 0.0), (0.01, 0.0), (0.05, 0.01), (0.1, 0.1), (0.3, 0.05), (0.02, 0.4)):
        drop, coverage = p_lost - p_gained, 0.0
        for (b, c), (low, high) in bounds.items():
            if low <= drop <= high:
                coverage += (math.comb(n, b) * math.comb(n - b, c) * p_lost ** b * p_gained ** c
                             * (1 - p_lost - p_gained) ** (n - b - c))
        assert coverage >= 0.95, (p_lost, p_gained, coverage)
    # paired: no item changed still leaves an interval as wide as the items allow (not [0, 0])
    assert bounds[(0, 0)] == pytest.approx((-0.168433, 0.168433), abs=1e-6)
    assert bounds[(2, 0)][1] == pytest.approx(ci.clopper_pearson(2, n)[1]) and bounds[(2, 0)][0] < 0


# ---------------------------------------------------------------- checks, on measured numbers


def measured(forget_right, forget_items, retain_before, retain_after):
    """An evaluation as verify measures it: forget accuracy after, and retain answers per item."""
    def one_set(correct):
        acc = sum(correct) / len(correct)
        return {"items": len(correct), "exact_accuracy": acc, "mc_accuracy": acc, "generation_contains_answer": acc,
                "exact_correct": correct}

    forget_after = [1] * forget_right + [0] * (forget_items - forget_right)
    evaluation = {"before": {"forget": one_set([1] * forget_items), "retain": one_set(retain_before)},
                  "after": {"forget": one_set(forget_after), "retain": one_set(retain_after)}}
    add_intervals(evaluation, {})
    return evaluation


def test_every_accuracy_carries_its_interval():
    e = measured(1, 20, [1] * 20, [1] * 19 + [0])
    assert e["after"]["forget"]["intervals"]["exact_accuracy"] == pytest.approx([0.001265, 0.248733], abs=1e-6)
    assert e["before"]["forget"]["intervals"]["mc_accuracy"] == pytest.approx([1 - 0.168433, 1.0], abs=1e-6)
    d = e["retain_drop"]
    assert (d["lost"], d["gained"], d["items"]) == (1, 0, 20) and d["value"] == pytest.approx(0.05)
    assert d["interval"] == pytest.approx([-0.168433, ci.clopper_pearson(1, 20)[1]], abs=1e-6)


def test_point_passes_where_the_bound_fails():
    e = measured(1, 20, [1] * 20, [1] * 20)
    limits = {"max_forget_accuracy": 0.1, "max_forget_choice_accuracy": None, "max_retain_drop": None,
              "max_text_nll_change": None}
    (point,) = threshold_checks(e, limits)
    assert point["passed"] and point["value"] == 0.05 and point["interval"][1] > 0.1 and "items_needed" not in point
    (bound,) = threshold_checks(e, limits, confidence=0.95)
    assert not bound["passed"] and bound["bound"] == pytest.approx(0.248733, abs=1e-6)
    assert "upper end of its 95% interval" in bound["check"]
    # 0.1 can be shown with 36 items: 20 are too few whatever the answers
    assert bound["items_needed"] == 36 and "it needs at least 36 items" in bound["detail"] and "\n" not in bound["detail"]


def test_bound_passes_with_enough_items_and_none_right():
    e = measured(0, 40, [1] * 40, [1] * 40)
    limits = {"max_forget_accuracy": 0.1, "max_forget_choice_accuracy": None, "max_retain_drop": 0.1,
              "max_text_nll_change": None}
    forget, drop = threshold_checks(e, limits, confidence=0.95)
    assert forget["passed"] and forget["bound"] == pytest.approx(1 - 0.025 ** (1 / 40), abs=1e-6)
    assert drop["passed"] and drop["bound"] == pytest.approx(1 - 0.025 ** (1 / 40), abs=1e-6)
    assert "needs at least" not in forget["detail"] + drop["detail"]
    # one kept item lost: the drop's bound is now above 0.1, its point (0.025) still under
    (drop,) = threshold_checks(measured(0, 40, [1] * 40, [1] * 39 + [0]), {"max_retain_drop": 0.1}, confidence=0.95)
    assert not drop["passed"] and drop["value"] == 0.025 and drop["bound"] > 0.1


def test_relearn_check_per_request():
    def request(steps, budget=40):
        return {"folder_sha256": "ab" * 32, "relearn": {"after": {"steps": steps, "max_steps": budget}}}

    results = relearn_checks([request(None), request(6), request(10), request(0), request(None, 8)], 10)
    assert [c["passed"] for c in results] == [True, False, True, False, False]
    assert [c["request"] for c in results] == [1, 2, 3, 4, 5]
    assert "within the attack's budget of 40 steps" in results[0]["detail"]
    assert "not forgotten" in results[3]["detail"] and results[1]["steps"] == 6
    assert all(c["check"].startswith("relearning: request ") and ">= 10" in c["check"] for c in results)


# ---------------------------------------------------------------- verify runs on the demo checkpoint


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory, folders):
    root = tmp_path_factory.mktemp("bounds")
    fastunlearn.apply(asset("llava"), folders / "forget", folders / "retain", out=root / "out", config=FAST,
                      log=lambda *a: None)
    return root / "out"


@pytest.fixture(scope="module")
def plain(unlearned, folders):
    """verify with no accuracy threshold, the relearning attack gated at 2 steps: what the demo job left."""
    return fastunlearn.verify(asset("llava"), unlearned, folders / "forget", folders / "retain", device="cpu",
                              min_relearn_steps=2)


def verify_json(capsys, unlearned_dir, folders, *options):
    rc = main(["verify", str(asset("llava")), str(unlearned_dir), str(folders / "forget"), "--retain",
               str(folders / "retain"), "--device", "cpu", "--json", *options])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def test_verify_gates_on_the_bound_only_when_asked(unlearned, folders, plain, capsys):
    measured_accuracy = plain["evaluation"]["after"]["forget"]["exact_accuracy"]
    assert measured_accuracy < 1, "the demo job should forget some answers"
    limit = str(round(measured_accuracy + 0.01, 6))  # over the point; under the bound of any k < n of 12 items
    rc, point, _ = verify_json(capsys, unlearned, folders, "--no-probes", "--max-forget-accuracy", limit,
                               "--max-retain-drop", "0.1")
    assert rc == 0 and point["passed"], [c for c in point["checks"] if not c["passed"]]
    assert all("interval" in c for c in point["checks"] if c["check"].startswith("threshold:"))
    assert point["intervals"]["method"] == "Clopper-Pearson" and point["intervals"]["gate_confidence"] is None
    assert all("greedy_accuracy_interval" in m[w] for m in point["metrics"].values() for w in ("before", "after"))

    rc, bound, _ = verify_json(capsys, unlearned, folders, "--no-probes", "--max-forget-accuracy", limit,
                               "--max-retain-drop", "0.1", "--max-forget-choice-accuracy", "0.2", "--confidence", "0.95")
    assert rc == 4
    checks = {c["check"].split(" <=")[0]: c for c in bound["checks"] if c["check"].startswith("threshold:")}
    exact = checks["threshold: forgotten pictures, exact-answer accuracy"]
    assert not exact["passed"] and exact["value"] <= float(limit) < exact["bound"]  # the point passed, its bound does not
    drop = checks["threshold: kept pictures, drop of exact-answer accuracy"]
    retain_items = bound["evaluation"]["retain_drop"]["items"]
    assert retain_items >= ci.items_needed(0.1)
    assert drop["passed"] == (drop["bound"] <= 0.1) and drop["passed"] == (bound["evaluation"]["retain_drop"]["lost"] == 0)
    choice = checks["threshold: forgotten pictures, multiple-choice accuracy"]
    assert choice["items"] < ci.items_needed(0.2) == choice["items_needed"] == 17
    assert f"{choice['items']} items can never show <= 0.2 at 95% confidence" in choice["detail"]
    assert "it needs at least 17 items" in choice["detail"]


def test_summary_and_page_show_the_intervals(plain):
    result = plain
    assert result["passed"]
    text = "\n".join(summary_lines(result))
    assert "95% interval (Clopper-Pearson" in text
    after = result["evaluation"]["after"]["forget"]
    low, high = after["intervals"]["exact_accuracy"]
    shown = f"{100 * after['exact_accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
    assert shown in text
    assert "Kept pictures, drop of exact answer" in text
    page = render_html(result)
    assert shown in page and page.count("<path d=\"M") >= 2 and "95% interval" in page


def test_usage_errors_exit_2(unlearned, folders, capsys):
    for options, message in ((["--no-probes", "--min-relearn-steps", "5"], "--min-relearn-steps needs the relearning"),
                             (["--min-relearn-steps", "-1"], "whole number of steps"),
                             (["--confidence", "95"], "--confidence must be between 0 and 1")):
        rc, _, err = verify_json(capsys, unlearned, folders, *options)
        assert rc == 2 and message in err and err.count("\n") == 1, err


def test_relearn_threshold_fails_on_a_checkpoint_that_never_forgot(folders, capsys):
    # the original against itself: the attack names the forgotten at step 0
    rc, result, err = verify_json(capsys, asset("llava"), folders, "--min-relearn-steps", "41")
    assert rc == 4, err
    (check,) = [c for c in result["checks"] if c["check"].startswith("relearning:")]
    assert not check["passed"] and check["steps"] == 0 and check["limit"] == 41
    assert check["check"].startswith("relearning: request 1 (forget folder sha256 ")
    relearn = result["requests"][0]["relearn"]["after"]
    assert relearn["max_steps"] == 41  # the budget grows to the asked threshold


def test_relearn_threshold_passes_when_the_attack_needs_the_steps(plain):
    result = plain
    relearn = result["requests"][0]["relearn"]["after"]
    assert relearn["curve"][0][1] < relearn["target"], "the demo job should leave the forgotten unnamed at step 0"
    # below the target at step 0 and checked every 2 steps: it needs at least 2 steps, or never relearns
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    (check,) = [c for c in result["checks"] if c["check"].startswith("relearning:")]
    assert check["passed"] and (check["steps"] is None or check["steps"] >= 2)
    assert relearn["max_steps"] == 40 and relearn["lr"] == 1e-3
    assert "Relearning attack, request 1" in "\n".join(summary_lines(result))
