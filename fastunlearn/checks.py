"""verify's judgement: the byte proof's checks, the thresholds (on the measured value, or on the bound of
its interval with --confidence), the relearning attack's, and the exit status they give."""
from __future__ import annotations

from . import intervals as ci
from .errors import EXIT_PROOF_FAILED, EXIT_THRESHOLD_FAILED


def byte_checks(comparison: dict) -> list[dict]:
    """The byte proof as named checks; all must pass for verify to exit 0."""
    others = [c["name"] for c in comparison["changed_tensors"] if not c["projector"]]
    return [
        _check(f"byte proof: only --scope {comparison['scope']['scope']} tensors changed", comparison["only_projector_changed"],
               f"also changed: {', '.join(others[:5])}" if others else
               f"allowed: {', '.join(comparison['scope']['may_change'])}"),
        _check("byte proof: safetensors headers identical", comparison["headers_identical"]),
        _check("byte proof: same tensor names in both checkpoints", comparison["tensor_names_equal"]),
        _check("byte proof: no file missing or added", not comparison["files_missing"] and not comparison["files_added"],
               "; ".join(filter(None, [f"missing: {', '.join(comparison['files_missing'])}" if comparison["files_missing"] else "",
                                       f"added: {', '.join(comparison['files_added'])}" if comparison["files_added"] else ""]))),
        _check("byte proof: every non-weight file identical", comparison["non_weight_files_identical"]),
    ]


THRESHOLD_LABELS = {"max_forget_accuracy": "forgotten pictures, exact-answer accuracy",
                    "max_forget_choice_accuracy": "forgotten pictures, multiple-choice accuracy",
                    "max_retain_drop": "kept pictures, drop of exact-answer accuracy",
                    "max_text_nll_change": "text-only answers, largest NLL change"}
FORGET_ACCURACIES = {"max_forget_accuracy": "exact_accuracy", "max_forget_choice_accuracy": "mc_accuracy"}


def threshold_checks(evaluation: dict, limits: dict, confidence: float | None = None) -> list[dict]:
    """The thresholds a pipeline asked for (fractions: 0.3 = 30%), each measured on the data given.
    Accuracies and the retain drop carry their 95% interval; with `confidence`, they pass only when
    the upper end of their interval at that confidence is at or under the limit."""
    checks = []
    for name, limit in limits.items():
        if limit is None:
            continue
        label = f"threshold: {THRESHOLD_LABELS[name]} <= {limit:g}"
        if name == "max_text_nll_change":  # not a proportion: no interval
            value = round(float(evaluation["text_answer_nll_max_change"]), 6)
            checks.append(_check(label, value <= limit, f"measured {value:g}", value=value, limit=limit))
            continue
        value, n, interval, bound_at = _proportion(evaluation, name)
        extra = {"value": value, "limit": limit, "items": n, "interval": interval,
                 "interval_confidence": ci.CONFIDENCE}
        detail = f"measured {value:.4g} on {n} items, {_pct(ci.CONFIDENCE)} interval {_span(interval)}"
        if confidence is None:
            checks.append(_check(label, value <= limit, detail, **extra))
            continue
        bound = bound_at(confidence)  # compared unrounded: the same number items_needed is computed with
        needed = ci.items_needed(limit, confidence)
        if confidence != ci.CONFIDENCE:
            detail += f", upper end of its {_pct(confidence)} interval {bound:.4g}"
        if needed is None or n < needed:
            best = "0 right answers" if name in FORGET_ACCURACIES else "no kept item lost"
            detail += (f"; no number of items can show <= {limit:g}" if needed is None else
                       f"; {n} items can never show <= {limit:g} at {_pct(confidence)} confidence (not even with {best}): "
                       f"it needs at least {needed} items")
        checks.append(_check(f"{label} (upper end of its {_pct(confidence)} interval)", bound <= limit, detail,
                             bound=round(bound, 6), confidence=confidence, items_needed=needed, **extra))
    return checks


def _proportion(evaluation: dict, name: str):
    """(point value, items, 95% interval, bound_at(confidence) -> upper end) of an accuracy threshold."""
    if name == "max_retain_drop":
        d = evaluation["retain_drop"]
        return d["value"], d["items"], d["interval"], lambda c: ci.drop_interval(d["lost"], d["gained"], d["items"], c)[1]
    m = evaluation["after"]["forget"]
    key = FORGET_ACCURACIES[name]
    k = round(m[key] * m["items"])
    return m[key], m["items"], m["intervals"][key], lambda c: ci.clopper_pearson(k, m["items"], c)[1]


def _span(interval) -> str:
    return f"[{interval[0]:.4g}, {interval[1]:.4g}]"


def _pct(confidence: float) -> str:
    return f"{100 * confidence:g}%"


def relearn_checks(requests: list[dict], min_steps: int) -> list[dict]:
    """Per erasure request: the unlearned checkpoint must need at least `min_steps` steps of the
    relearning attack. A run that never relearns within its budget needed more steps than the budget,
    and verify makes the budget at least `min_steps`, so such a run passes."""
    checks = []
    for i, request in enumerate(requests, 1):
        after = request["relearn"]["after"]
        steps, budget = after["steps"], after["max_steps"]
        if steps is None:
            passed, detail = budget >= min_steps, f"not named again within the attack's budget of {budget} steps"
        else:
            passed = steps >= min_steps
            detail = f"named again after {steps} steps" + (" (already at the start: not forgotten)" if steps == 0 else "")
        checks.append(_check(f"relearning: request {i} (forget folder sha256 {request['folder_sha256'][:12]}) needs "
                             f">= {min_steps} fine-tuning steps", passed, detail, request=i, steps=steps, budget=budget,
                             limit=min_steps))
    return checks


def add_intervals(evaluation: dict, metrics: dict) -> None:
    """Attach the 95% interval (Clopper-Pearson, from the item counts) to every accuracy, and the
    paired interval of the retain drop."""
    for when in ("before", "after"):
        for name in ("forget", "retain", "text"):
            m = evaluation[when].get(name)
            if m and m["items"]:
                m["intervals"] = {key: ci.accuracy_interval(round(m[key] * m["items"]), m["items"])
                                  for key in ("exact_accuracy", "mc_accuracy", "generation_contains_answer")}
        probe = evaluation[when].get("probe")
        if probe:
            probe["intervals"] = {f"{group}_accuracy": ci.accuracy_interval(round(probe[f"{group}_accuracy"] * n), n)
                                  for group, n in probe["test_items"].items() if n}
    for sides in metrics.values():
        for m in sides.values():
            if m["items"]:
                m["greedy_accuracy_interval"] = ci.accuracy_interval(round(m["greedy_accuracy"] * m["items"]), m["items"])
    if "retain" in evaluation["before"] and evaluation["before"]["retain"]["items"]:
        pairs = list(zip(evaluation["before"]["retain"]["exact_correct"], evaluation["after"]["retain"]["exact_correct"]))
        lost, gained = sum(b > a for b, a in pairs), sum(a > b for b, a in pairs)
        evaluation["retain_drop"] = {
            "value": round(evaluation["before"]["retain"]["exact_accuracy"] - evaluation["after"]["retain"]["exact_accuracy"], 6),
            "items": len(pairs), "lost": lost, "gained": gained,
            "interval": [round(x, 6) for x in ci.drop_interval(lost, gained, len(pairs))],
            "interval_method": "paired, exact: [-(upper bound of the gained rate), upper bound of the lost rate]",
        }


def _check(name: str, passed: bool, detail: str = "", **extra) -> dict:
    return {"check": name, "passed": bool(passed), "detail": detail, **extra}


def exit_status(result: dict) -> int:
    """0 when every check passed; 3 when the byte proof failed; 4 when only a threshold failed."""
    failed = [c["check"] for c in result["checks"] if not c["passed"]]
    if any(name.startswith("byte proof") for name in failed):
        return EXIT_PROOF_FAILED
    return EXIT_THRESHOLD_FAILED if failed else 0
