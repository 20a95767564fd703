"""Human-readable views of a report (`apply`'s unlearning_report.json or `verify --report`'s JSON):
a plain-text summary and a single self-contained HTML page (inline CSS and SVG, no scripts, no
external resources) with a before/after chart of the metrics.

    fastunlearn report REPORT.json [--html OUT.html]

Both views show only what the report holds: hashes, numbers and settings, never forgotten content.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from .errors import UserError

METRIC_LABELS = {
    "mc_accuracy": "multiple choice",
    "exact_accuracy": "exact answer",
    "generation_contains_answer": "generation names it",
    "greedy_accuracy": "exact answer",
}
SET_LABELS = {"forget": "forgotten", "retain": "kept (retain)", "text": "text-only questions"}


def load_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    if not isinstance(report, dict) or not ("fastunlearn_report" in report or "fastunlearn_verify" in report):
        raise UserError(f"{path}: not a fastunlearn report (written by `fastunlearn apply` or `fastunlearn verify --report`)")
    return report


def kind(report: dict) -> str:
    return "verify" if "fastunlearn_verify" in report else "apply"


def chart_rows(report: dict) -> list[tuple]:
    """(label, before, after, before's interval, after's interval) for each accuracy-like metric of each
    data set, in [0, 1]; an interval is None where the report has none (apply's, older verify's)."""
    rows = []
    if "evaluation" in report:
        before, after = report["evaluation"]["before"], report["evaluation"]["after"]
        for name in ("forget", "retain", "text"):
            if name not in before:
                continue
            for key in ("mc_accuracy", "exact_accuracy", "generation_contains_answer"):
                rows.append((f"{SET_LABELS[name]}: {METRIC_LABELS[key]}", before[name][key], after[name][key],
                             interval(before[name], key), interval(after[name], key)))
        if "probe" in before and "probe" in after:
            rows.append(("forgotten: identity linear probe", before["probe"]["forgotten_accuracy"],
                         after["probe"]["forgotten_accuracy"], interval(before["probe"], "forgotten_accuracy"),
                         interval(after["probe"], "forgotten_accuracy")))
    else:  # apply's: pictures held out of training first (the figures that matter), then the training pictures
        held = report.get("heldout") or {}
        measured = [(f"{SET_LABELS[name]}, held-out pictures", held[name]) for name in ("forget", "retain") if name in held]
        measured += [(f"{SET_LABELS.get(name, name)}, training pictures", m) for name, m in report.get("metrics", {}).items()]
        for label, m in measured:
            rows.append((f"{label}: exact answer", m["before"]["greedy_accuracy"], m["after"]["greedy_accuracy"],
                         m["before"].get("greedy_accuracy_interval"), m["after"].get("greedy_accuracy_interval")))
    return rows


def interval(m: dict, key: str):
    """The 95% interval verify stored for the accuracy m[key], or None."""
    return (m.get("intervals") or {}).get(key)


def byte_facts(report: dict) -> dict:
    """The byte-level proof in one shape for both kinds of report."""
    if kind(report) == "verify":
        b = report["bytes"]
        return {"changed": b["changed_tensors"], "all_other_bytes_unchanged": b.get("all_other_bytes_unchanged"),
                "bytes": b.get("bytes_changed_in_ranges"),
                "files": [(f["name"], f["sha256_original"], f["sha256_unlearned"]) for f in b["files"]]}
    return {"changed": report["changed_tensors"], "all_other_bytes_unchanged": report["byte_proof"]["all_other_bytes_unchanged"],
            "bytes": report["byte_proof"]["bytes_written"],
            "files": [(f["name"], f["sha256_before"], f["sha256_after"]) for f in report["files"]]}


def config_and_reproduce(report: dict) -> tuple[dict | None, dict | None]:
    if kind(report) == "verify":
        job = report.get("job") or {}
        return job.get("config"), job.get("reproduce")
    return report.get("config"), report.get("reproduce")


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def pct_ci(x, ci) -> str:
    """An accuracy with its interval, e.g. "5.0% [0.1, 24.9]"; as pct() when there is no interval."""
    if ci is None:
        return pct(x)
    return f"{100 * x:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def acc(m: dict, key: str) -> str:
    return pct_ci(m[key], interval(m, key))


def relearn_lines(report: dict) -> list[str]:
    """The relearning attack, per erasure request (older reports: the one measured on all forget pictures)."""
    before, after = report["evaluation"]["before"], report["evaluation"]["after"]
    requests = [r for r in report.get("requests", []) if "relearn" in r]
    if not requests:
        requests = [{"relearn": {"before": before["relearn"], "after": after["relearn"]}}] if "relearn" in after else []

    def steps(r):
        return str(r["steps"]) if r["steps"] is not None else f"not within {r['max_steps']}"

    lines = []
    for i, r in enumerate(requests, 1):
        b, a = r["relearn"]["before"], r["relearn"]["after"]
        who = f", request {i} (forget folder sha256 {r['folder_sha256'][:12]})" if "folder_sha256" in r else ""
        lr = f", Adam lr {a['lr']:g}" if "lr" in a else ""
        lines.append(f"Relearning attack{who} (connector fine-tuning on half the forget pictures{lr}, budget "
                     f"{a['max_steps']} steps, until {pct(a['target'])} exact answers on the other half): "
                     f"{steps(b)} steps before, {steps(a)} after.")
    return lines


def summary_lines(report: dict) -> list[str]:
    """A plain-language summary of the report, a finding a line."""
    lines = []
    facts = byte_facts(report)
    names = ", ".join(c["name"] for c in facts["changed"]) or "none"
    lines.append(f"Changed tensors: {len(facts['changed'])} ({names}); {facts['bytes']} bytes in their byte ranges.")
    verdict = {True: "yes", False: "NO", None: "not checked (dry run)"}[facts["all_other_bytes_unchanged"]]
    lines.append(f"Every other byte of every file unchanged (sha256): {verdict}.")
    if "evaluation" in report:
        before, after = report["evaluation"]["before"], report["evaluation"]["after"]
        f0, f1 = before["forget"], after["forget"]
        if "intervals" in report:
            lines.append(f"Accuracies in brackets: their {report['intervals']['confidence']:.0%} interval "
                         f"({report['intervals']['method']}, from the number of questions).")
        lines.append(f"Forgotten pictures ({f0['items']} questions): multiple choice {acc(f0, 'mc_accuracy')} -> "
                     f"{acc(f1, 'mc_accuracy')} (chance {pct(f1['mc_chance'])}), exact answer {acc(f0, 'exact_accuracy')} -> "
                     f"{acc(f1, 'exact_accuracy')}, generation names the answer {acc(f0, 'generation_contains_answer')} -> "
                     f"{acc(f1, 'generation_contains_answer')}.")
        if "retain" in before:
            r0, r1 = before["retain"], after["retain"]
            lines.append(f"Kept pictures ({r0['items']} questions): multiple choice {acc(r0, 'mc_accuracy')} -> "
                         f"{acc(r1, 'mc_accuracy')}, exact answer {acc(r0, 'exact_accuracy')} -> {acc(r1, 'exact_accuracy')}.")
            drop = report["evaluation"].get("retain_drop")
            if drop:
                lines.append(f"Kept pictures, drop of exact answer: {pct_ci(drop['value'], drop['interval'])} "
                             f"({drop['lost']} questions lost, {drop['gained']} gained; paired interval).")
        if "text" in before:
            change = report["evaluation"].get("text_answer_nll_max_change")
            lines.append(f"Text-only questions ({before['text']['items']}): exact answer {acc(before['text'], 'exact_accuracy')} -> "
                         f"{acc(after['text'], 'exact_accuracy')}; largest change of an answer's NLL: {change:.3g}"
                         + (" (identical)" if change == 0 else "") + ".")
        lines += relearn_lines(report)
        if "probe" in after:
            lines.append(f"Identity linear probe on projected visual tokens, forgotten subjects: "
                         f"{acc(before['probe'], 'forgotten_accuracy')} -> {acc(after['probe'], 'forgotten_accuracy')} "
                         f"(chance {pct(after['probe']['chance'])}).")
    else:
        for label, b, a, b_ci, a_ci in chart_rows(report):
            lines.append(f"{label}: {pct_ci(b, b_ci)} -> {pct_ci(a, a_ci)}.")
    config, reproduce = config_and_reproduce(report)
    if config:
        lines.append(f"Job: method {config['method']}, mask {config['mask']}, {config['steps']} steps, lr {config['lr']}, "
                     f"seed {config['seed']}.")
    if reproduce and reproduce.get("delta_sha256"):
        lines.append(f"Delta sha256 {reproduce['delta_sha256']}: {reproduce.get('note', '')}")
    return lines


# ---------------------------------------------------------------- HTML


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#1c1c1c;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;word-break:break-all}
code{font-size:.8rem;word-break:break-all}.ok{color:#0a6b2d;font-weight:600}.bad{color:#a4161a;font-weight:600}
ul.summary li{margin:.3rem 0}.note{color:#555;font-size:.85rem}
"""


def chart_svg(rows: list[tuple]) -> str:
    """Horizontal grouped bars, before (grey) and after (blue), 0-100%; where a row has intervals, a
    black whisker across each bar spans the interval and the label gives it ("5.0% [0.1, 24.9]")."""
    label_w, bar_w, row_h = 260, 360, 38
    height = 30 + row_h * len(rows) + 10
    parts = [f'<svg width="{label_w + bar_w + 150}" height="{height}" '
             f'role="img" aria-label="metrics before and after, with 95% intervals">',
             f'<rect x="{label_w}" y="4" width="12" height="12" fill="#9aa0a6"/><text x="{label_w + 16}" y="15" '
             f'font-size="12">before</text><rect x="{label_w + 80}" y="4" width="12" height="12" fill="#1f6feb"/>'
             f'<text x="{label_w + 96}" y="15" font-size="12">after</text>']
    if any(r[3] or r[4] for r in rows):
        parts.append(f'<line x1="{label_w + 160}" y1="10" x2="{label_w + 180}" y2="10" stroke="#000"/>'
                     f'<text x="{label_w + 186}" y="15" font-size="12">95% interval</text>')
    for i, (label, before, after, before_ci, after_ci) in enumerate(rows):
        y = 30 + i * row_h
        parts.append(f'<text x="{label_w - 8}" y="{y + 19}" font-size="12" text-anchor="end">{html.escape(label)}</text>')
        for j, (value, ci, colour) in enumerate(((before, before_ci, "#9aa0a6"), (after, after_ci, "#1f6feb"))):
            yy = y + 2 + j * 15
            parts.append(f'<rect x="{label_w}" y="{yy}" width="{bar_w * value:.1f}" height="13" fill="{colour}"/>')
            if ci:
                x0, x1 = label_w + bar_w * ci[0], label_w + bar_w * ci[1]
                parts.append(f'<path d="M{x0:.1f} {yy + 2}v9M{x0:.1f} {yy + 6.5}H{x1:.1f}M{x1:.1f} {yy + 2}v9" '
                             f'stroke="#000" fill="none"/>')
            end = label_w + bar_w * max(value, ci[1] if ci else 0)
            parts.append(f'<text x="{end + 4:.1f}" y="{yy + 11}" font-size="11">{pct_ci(value, ci)}</text>')
    parts.append(f'<line x1="{label_w}" y1="24" x2="{label_w}" y2="{height - 6}" stroke="#444"/></svg>')
    return "".join(parts)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('(absent)' if c is None else str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict) -> str:
    facts = byte_facts(report)
    config, reproduce = config_and_reproduce(report)
    env = report.get("environment", {})
    ok = facts["all_other_bytes_unchanged"]
    title = "fastunlearn verification report" if kind(report) == "verify" else "fastunlearn unlearning report"
    sections = [
        f"<h1>{title}</h1>",
        f'<p class="note">Created {html.escape(str(report.get("created_utc", "")))}. This page shows hashes, numbers and '
        "settings only: the forgotten pictures, questions and answers are not in it.</p>",
        "<h2>Summary</h2><ul class=\"summary\">" + "".join(f"<li>{html.escape(l)}</li>" for l in summary_lines(report)) + "</ul>",
        *(["<h2>Checks</h2>", _table(["check", "result", "detail"],
                                      [[c["check"], "pass" if c["passed"] else "FAIL", c.get("detail", "")]
                                       for c in report["checks"]])] if "checks" in report else []),
        "<h2>Before and after</h2>",
        '<p class="note">Share of questions answered correctly. On forgotten pictures the aim is chance level; '
        "on everything else the aim is no change."
        + (" The whiskers span each share's 95% interval (Clopper-Pearson, from the number of questions): "
           "the range of true rates the questions asked cannot rule out." if "intervals" in report else "") + "</p>",
        chart_svg(chart_rows(report)),
        "<h2>What changed in the checkpoint</h2>",
        f'<p>Every byte outside the listed ranges is unchanged: <span class="{"ok" if ok else "bad"}">'
        f'{html.escape({True: "yes", False: "NO", None: "not checked (dry run)"}[ok])}</span></p>',
        _table(["tensor", "file", "byte range", "elements changed", "max |delta|"],
               [[c["name"], c["file"], f"{c['byte_range'][0]}-{c['byte_range'][1]}", c.get("elements_changed", ""),
                 f"{c['max_abs_delta']:.3g}" if "max_abs_delta" in c else ""] for c in facts["changed"]]),
        "<h3>Files (sha256 before / after)</h3>",
        _table(["file", "before", "after"], [[n, a, b] for n, a, b in facts["files"]]),
    ]
    if config:
        sections += ["<h2>Configuration</h2>", _table(["setting", "value"], [[k, v] for k, v in config.items()])]
    if reproduce:
        sections += ["<h2>Reproducing the run</h2>", _table(["item", "value"], [[k, v] for k, v in reproduce.items()])]
    if env:
        sections += ["<h2>Environment</h2>", _table(["item", "value"], [[k, v] for k, v in env.items()])]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{CSS}</style></head><body>" + "\n".join(sections) + "</body></html>\n")
