"""How MLLMU-Bench and CLEAR rows become our qa.jsonl lines (fastunlearn.data's format): which
columns a split must have, and how one row becomes its person, its pictures, its QA lines and its
text-only lines. convert.py reads the parquet files and writes the folders; the column-by-column
account is its docstring.
"""
from __future__ import annotations

import json
import re

from .errors import UserError

WHO, DESCRIBE = "Who is in this image?", "Describe this image."


def _text(value) -> list[str]:
    """A text cell (or a list of them, as some captions are) -> its non-empty strings."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _line(kind: str, question, answer, options=None) -> dict | None:
    """One QA line (fastunlearn.data's format), or None when the question or the answer is empty."""
    q, a = _text(question), _text(answer)
    if not (q and a):
        return None
    line = {"question": q[0], "answer": a[0], "kind": kind}
    if options is not None:
        line["options"] = options
    return line


def _choice(entry: dict) -> dict | None:
    """A Classification_Task question -> a choice line: the options in their stored order, the
    answer the correct option's text. None when the correct letter is no option, or when two
    options have its text (the line could not say which one is right)."""
    options = entry.get("Options")
    if isinstance(options, list):  # a parquet map column reads as (key, value) pairs
        options = dict(o for o in options if isinstance(o, (list, tuple)) and len(o) == 2)
    if not isinstance(options, dict):
        return None
    options = {str(k).strip(): _text(v)[0] for k, v in options.items() if str(k).strip() and _text(v)}
    correct = _text(entry.get("Correct_Answer"))
    if len(options) < 2 or not correct or correct[0] not in options:
        return None
    answer = options[correct[0]]
    if list(options.values()).count(answer) != 1:
        return None
    return _line("choice", entry.get("Question"), answer, options)


def _mllmu_tasks(row) -> tuple[list[dict], list[dict], int]:
    """(picture lines, text lines, entries skipped) of a profile row's three tasks."""
    picture, text, skipped = [], [], 0

    def add(visual: bool | None, line):
        nonlocal skipped
        if line is None or visual is None:
            skipped += 1
        else:
            (picture if visual else text).append(line)

    def visual(entry) -> bool | None:
        return {"Image_Textual": True, "Pure_Text": False}.get(entry.get("Type"))

    for task, kind in (("Generation_Task", "generation"), ("Mask_Task", "cloze")):
        for entry in row.get(task) or []:
            if isinstance(entry, dict):
                add(visual(entry), _line(kind, entry.get("Question"), entry.get("Ground_Truth")))
    classification = row.get("Classification_Task")
    if isinstance(classification, dict):
        for key, is_visual in (("Image_Textual_Questions", True), ("Pure_Text_Questions", False)):
            for entry in classification.get(key) or []:
                if isinstance(entry, dict):
                    add(is_visual, _choice(entry))
    return picture, text, skipped


def _mllmu_profile(row):
    picture, text, skipped = _mllmu_tasks(row)
    images = row.get("images") if row.get("images") else [row.get("image")]
    return row.get("ID"), images, picture, text, skipped


def _mllmu_train(row):
    meta = row.get("metadata")
    if isinstance(meta, (str, bytes)):
        try:
            meta = json.loads(meta)
        except (ValueError, RecursionError):
            raise ValueError("`metadata` is not valid JSON") from None
    if isinstance(meta, dict):
        meta = [meta]
    qa = [_line("generation", e.get("Question"), e.get("Answer")) for e in meta or [] if isinstance(e, dict)]
    return row.get("ID"), [row.get("image")], [line for line in qa if line], [], 0


def _clear_caption(row):
    names = _text(row.get("name"))
    qa = [_line("generation", WHO, names[0])] if names else []
    qa += [_line("generation", DESCRIBE, c) for c in _text(row.get("caption"))]
    text = [_line("generation", row.get("question"), row.get("answer"))]  # +tofu: the TOFU questions
    return (names[0] if names else None), [row.get("image")], qa, [t for t in text if t], 0


def _clear_qa(row):
    questions = _text(row.get("question"))
    qa = [_line("generation", questions[0] if questions else WHO, a) for a in _text(row.get("answer"))]
    return None, [row.get("image")], qa, [], 0


# (required columns, row function); "a|b" means either column
SCHEMAS = {
    "mllmu-bench": [(("ID", "image|images", "Generation_Task"), _mllmu_profile),
                    (("image", "metadata"), _mllmu_train)],
    "clear": [(("image", "caption"), _clear_caption),
              (("image", "answer"), _clear_qa)],
}
TITLE = {"mllmu-bench": "an MLLMU-Bench", "clear": "a CLEAR"}


def _missing(required, columns) -> list[str]:
    return [r.split("|")[0] for r in required if not any(c in columns for c in r.split("|"))]


def pick_schema(kind: str, columns, where: str):
    """The row function for these columns, or UserError naming the columns that are missing."""
    candidates = [(_missing(req, columns), fn) for req, fn in SCHEMAS[kind]]
    for missing, fn in candidates:
        if not missing:
            return fn
    missing = min((m for m, _ in candidates), key=len)
    found = re.sub(r"\s+", " ", ", ".join(sorted(columns)))[:300] or "none"
    raise UserError(f"{where}: not {TITLE[kind]} split: missing column(s) {', '.join(missing)} (found: {found})")
