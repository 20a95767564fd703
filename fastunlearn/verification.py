"""`fastunlearn verify ORIGINAL UNLEARNED FORGET_DIR [--retain DIR]`: recompute, independently of the
apply report, what changed byte for byte and how both checkpoints score on the given data."""
from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path

import torch

from . import evaluate as ev
from . import intervals as ci
from . import journal
from . import safetensors_io as st
from .batches import make_batches
from .config import pick_device
from .data import Item, read_folder
from .checks import add_intervals, byte_checks, relearn_checks, threshold_checks
from .errors import UserError
from .features import cache_samples, drop_vision_tower, fill_answers
from .forward import score, summarize
from .load import inspect_checkpoint, master_params, open_checkpoint, scoped_adapter
from .scope import tower_layers
from .report import describe_items, environment
from .write import checkpoint_files, hash_files

APPLY_REPORT = "unlearning_report.json"  # the one file apply adds to a checkpoint it writes
RELEARN_BUDGET = 40  # projector fine-tuning steps the relearning attack gets, unless --min-relearn-steps asks for more


def evaluate_checkpoint(ckpt: Path, item_sets: dict[str, list[Item]], device: torch.device, batch_size: int = 16,
                        per_item: bool = False) -> dict:
    """Score one checkpoint on each named item set (greedy exact match and answer NLL)."""
    loaded = open_checkpoint(ckpt, device)
    samples = {name: cache_samples(loaded, items, name) for name, items in item_sets.items()}
    drop_vision_tower(loaded)
    params = master_params(loaded)
    out = {}
    for name, s in samples.items():
        batches = make_batches(loaded, s, batch_size)
        scores = score(loaded, params, batches)
        out[name] = summarize(scores, batches)
        if per_item:
            out[name]["correct"] = scores["correct"].tolist()
    del loaded
    gc.collect()
    return out


def compare_checkpoints(original: Path, unlearned: Path, scope: str = "connector") -> dict:
    """Byte-level comparison: every file's sha256, then tensor by tensor inside differing weight files.
    Only the tensors of the edit's room `scope` (the connector, and with vision:K the tower's last K
    layers) may differ."""
    original, unlearned = Path(original), Path(unlearned)
    files_a, files_b = checkpoint_files(original), checkpoint_files(unlearned)
    sha_a, _ = hash_files(original, files_a, desc="hashing original")
    sha_b, _ = hash_files(unlearned, files_b, desc="hashing unlearned")
    tensors_a, tensors_b = st.read_checkpoint(original), st.read_checkpoint(unlearned)
    adapter = scoped_adapter(original, tower_layers(scope))

    changed, headers_equal = [], True
    for name, a in tensors_a.items():
        b = tensors_b.get(name)
        if b is None or sha_a.get(a.file.name) == sha_b.get(b.file.name):
            continue
        bytes_a, bytes_b = st.read_bytes(a), st.read_bytes(b)
        if a.dtype != b.dtype or a.shape != b.shape or a.start != b.start:
            headers_equal = False
        if bytes_a == bytes_b:
            continue
        entry = {"name": name, "file": a.file.name, "byte_range": [a.start, a.end], "dtype": a.dtype,
                 "projector": adapter.is_projector_name(name),
                 "sha256_original": st.sha256_bytes(bytes_a), "sha256_unlearned": st.sha256_bytes(bytes_b)}
        if a.dtype in st.TORCH_DTYPES and a.dtype == b.dtype and a.shape == b.shape:
            ta, tb = st.bytes_to_tensor(bytes_a, a.dtype, a.shape), st.bytes_to_tensor(bytes_b, b.dtype, b.shape)
            entry["elements_changed"] = int((ta != tb).sum())
            entry["max_abs_delta"] = float((tb.double() - ta.double()).abs().max())
        changed.append(entry)
    for path in st.weight_files(original):
        ha, hb = st.read_header(path), st.read_header(unlearned / path.name) if (unlearned / path.name).exists() else None
        if hb is None or ha.length != hb.length or ha.metadata != hb.metadata:
            headers_equal = False
        else:
            with open(path, "rb") as fa, open(unlearned / path.name, "rb") as fb:
                headers_equal &= fa.read(8 + ha.length) == fb.read(8 + hb.length)

    files = [{"name": n, "sha256_original": sha_a.get(n), "sha256_unlearned": sha_b.get(n),
              "identical": sha_a.get(n) == sha_b.get(n)} for n in sorted(set(sha_a) | set(sha_b))]
    weight_names = {p.name for p in st.weight_files(original)}
    result = {
        "files": files,
        "scope": {"scope": scope, "may_change": list(adapter.connector_paths() + adapter.edited_stems)},
        "changed_tensors": changed,
        "tensor_names_equal": set(tensors_a) == set(tensors_b),
        "headers_identical": headers_equal,
        "only_projector_changed": all(c["projector"] for c in changed),
        "files_missing": [f["name"] for f in files if f["sha256_unlearned"] is None],
        "files_added": [f["name"] for f in files if f["sha256_original"] is None and f["name"] != APPLY_REPORT],
        "non_weight_files_identical": all(
            f["identical"] for f in files if f["name"] not in weight_names and f["sha256_original"] is not None
        ),
    }
    # headers are validated contiguous (no holes): equal headers + equal tensor bytes = equal files
    result["all_other_bytes_unchanged"] = (result["tensor_names_equal"] and headers_equal
                                           and result["only_projector_changed"] and result["non_weight_files_identical"]
                                           and not result["files_missing"] and not result["files_added"])
    result["bytes_changed_in_ranges"] = sum(c["byte_range"][1] - c["byte_range"][0] for c in changed)
    return result


def read_text_questions(path: Path) -> list[Item]:
    """Text-only questions, a JSON object a line: {"question": "...", "answer": "...", "subject": "..." (optional)}."""
    items = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip() for k in ("question", "answer")):
            raise UserError(f"{path}:{lineno}: expected {{\"question\": \"...\", \"answer\": \"...\"}}")
        items.append(Item(None, obj["question"].strip(), obj["answer"].strip(), str(obj.get("subject", ""))))
    if not items:
        raise UserError(f"{path}: no questions")
    return items


def split_pictures(items: list[Item]) -> tuple[list[Item], list[Item]]:
    """Alternate each subject's pictures between a probe-training half and a probe-test half."""
    pictures: dict[str, list] = {}
    for it in sorted(items, key=lambda it: (it.subject, str(it.image))):
        if it.image not in pictures.setdefault(it.subject, []):
            pictures[it.subject].append(it.image)
    halves: tuple[list[Item], list[Item]] = ([], [])
    for it in items:  # every question about a picture goes with the picture
        halves[pictures[it.subject].index(it.image) % 2].append(it)
    return halves


PROBE_VIEWS = 4  # augmented views of each probe-training picture, as the job uses


def forgetting_metrics(loaded, forget: list[Item], retain: list[Item], text: list[Item],
                       probes: bool = True, relearn_max_steps: int = RELEARN_BUDGET) -> dict:
    """fastunlearn.evaluate's metrics of one opened checkpoint on the given data: exact answer, multiple
    choice, generation containment; with `probes`, relearning steps (at most `relearn_max_steps`) and a
    linear identity probe, both trained on one half of the given pictures and tested on the other.
    Under "summary", the job's own forget / retain summary (greedy exact match and answer NLL, as apply
    reports it). Drops the checkpoint's vision tower."""
    pool = forget + retain
    plain = {"forget": cache_samples(loaded, forget, "forget")}
    if retain:
        plain["retain"] = cache_samples(loaded, retain, "retain")
    sets = {"forget": ev.with_options(forget, pool)}
    if retain:
        sets["retain"] = ev.with_options(retain, pool)
    if text:
        sets["text"] = ev.with_options(text)
    prepared = {name: ev.prepare(loaded, qs) for name, qs in sets.items()}
    if probes:
        forget_train, forget_test = split_pictures(forget)
        probe_train, probe_test = split_pictures(pool)
        relearn_train = cache_samples(loaded, forget_train, "relearn")
        relearn_test = make_batches(loaded, cache_samples(loaded, forget_test, "relearn test"), 32)
        train_samples = cache_samples(loaded, probe_train, "probe", PROBE_VIEWS)
        test_samples = cache_samples(loaded, probe_test, "probe test")
    drop_vision_tower(loaded)
    params = master_params(loaded)
    out = {name: ev.evaluate_set(loaded, params, p) for name, p in prepared.items()}
    out["summary"] = {}
    for name, samples in plain.items():
        batches = make_batches(loaded, samples, 16)
        out["summary"][name] = summarize(score(loaded, params, batches), batches)
    if probes and forget_train and forget_test:
        out["relearn"] = ev.relearn_steps(loaded, params, relearn_train, relearn_test, max_steps=relearn_max_steps)
    if probes and forget_train and forget_test and len({it.subject for it in pool}) >= 2:
        train_subjects = [it.subject for it in probe_train for _ in range(1 + PROBE_VIEWS)]
        out["probe"] = ev.identity_probe(loaded, params, train_samples, train_subjects, test_samples,
                                         [it.subject for it in probe_test], {it.subject for it in forget})
    return out


def apply_report_of(unlearned: Path) -> dict | None:
    """The report `apply` wrote into the unlearned checkpoint, if any (it holds hashes, never content)."""
    path = Path(unlearned) / APPLY_REPORT
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def verify(original: Path, unlearned: Path, forget_dir: Path, retain_dir: Path | None = None, device="auto",
           text_path: Path | None = None, probes: bool = True, max_forget_accuracy: float | None = None,
           max_forget_choice_accuracy: float | None = None, max_retain_drop: float | None = None,
           max_text_nll_change: float | None = None, min_relearn_steps: int | None = None,
           confidence: float | None = None, scope: str = "connector") -> dict:
    """Recompute, independently of apply's report, what changed byte for byte between two checkpoints
    and how both score on the given data. Returns the verification report as a plain dict; its
    "checks" list says which checks passed, "passed" whether all did (`exit_status` maps it to the
    CLI's exit status). Thresholds are fractions (0.3 = 30%); None leaves a threshold unchecked.
    Every accuracy carries its 95% Clopper-Pearson interval; with `confidence` (e.g. 0.95) the
    accuracy thresholds and the retain drop are applied to the upper end of the interval at that
    confidence instead of the point. `min_relearn_steps`: the unlearned checkpoint must need at
    least that many steps of the relearning attack (needs the probes)."""
    limits = {"max_forget_accuracy": max_forget_accuracy, "max_forget_choice_accuracy": max_forget_choice_accuracy,
              "max_retain_drop": max_retain_drop, "max_text_nll_change": max_text_nll_change}
    tower_layers(scope)  # a bad --scope fails before any work
    if confidence is not None and not 0 < confidence < 1:
        raise UserError(f"--confidence must be between 0 and 1, e.g. 0.95 for 95% (got {confidence:g})")
    if min_relearn_steps is not None:
        if not probes:
            raise UserError("--min-relearn-steps needs the relearning attack, which --no-probes turns off: drop one of them")
        if isinstance(min_relearn_steps, bool) or not isinstance(min_relearn_steps, int) or min_relearn_steps < 0:
            raise UserError(f"--min-relearn-steps must be a whole number of steps, 0 or more (got {min_relearn_steps})")
    if max_retain_drop is not None and retain_dir is None:
        raise UserError("--max-retain-drop needs --retain DIR: the kept pictures to measure the drop on")
    if max_text_nll_change is not None and text_path is None:
        raise UserError("--max-text-nll-change needs --text QUESTIONS.jsonl: the text questions to measure it on")
    device = pick_device(device)
    for ckpt in (original, unlearned):
        inspect_checkpoint(ckpt)
        journal.recover(ckpt)
    forget = read_folder(forget_dir, "forget")
    if min_relearn_steps is not None and not all(split_pictures(forget)):
        raise UserError(f"{forget_dir}: --min-relearn-steps needs at least two pictures of a forgotten person "
                        "(the attack fine-tunes on one and tests on the other)")
    retain = read_folder(retain_dir, "retain") if retain_dir else []
    comparison = compare_checkpoints(original, unlearned, scope)

    text = read_text_questions(text_path) if text_path else []
    # targets without QA lines are the ORIGINAL model's greedy answers; each checkpoint is opened once
    loaded = open_checkpoint(original, device)
    forget = fill_answers(loaded, forget, 32)
    retain = fill_answers(loaded, retain, 32)
    torch.manual_seed(0)
    budget = max(RELEARN_BUDGET, min_relearn_steps or 0)
    evaluation = {"before": forgetting_metrics(loaded, forget, retain, text, probes, budget)}
    del loaded
    gc.collect()
    evaluation["after"] = forgetting_metrics(open_checkpoint(unlearned, device), forget, retain, text, probes, budget)
    gc.collect()
    summaries = {when: evaluation[when].pop("summary") for when in ("before", "after")}
    metrics = {name: {when: summaries[when][name] for when in ("before", "after")} for name in summaries["before"]}
    if text:
        evaluation["text_answer_nll_max_change"] = ev.max_nll_change(evaluation["before"]["text"],
                                                                     evaluation["after"]["text"])
    add_intervals(evaluation, metrics)
    # one erasure request per forget folder; verify takes one folder today
    requests = [{"folder_sha256": hashlib.sha256(str(Path(forget_dir).resolve()).encode()).hexdigest(),
                 "items": len(forget)}]
    if "relearn" in evaluation["after"]:
        requests[0]["relearn"] = {when: evaluation[when]["relearn"] for when in ("before", "after")}
    job = apply_report_of(unlearned)
    checks = byte_checks(comparison) + threshold_checks(evaluation, limits, confidence)
    if min_relearn_steps is not None:
        checks += relearn_checks(requests, min_relearn_steps)
    return {
        "fastunlearn_verify": 1,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "original": str(Path(original).resolve()),
        "unlearned": str(Path(unlearned).resolve()),
        "passed": all(c["passed"] for c in checks),
        "checks": checks,
        "bytes": comparison,
        "metrics": metrics,
        "evaluation": evaluation,
        "intervals": {"method": ci.METHOD, "confidence": ci.CONFIDENCE, "gate_confidence": confidence,
                      "note": "every accuracy's interval from its item count; a gate with gate_confidence passes "
                              "only when the upper end of its interval at that confidence is at or under the limit"},
        "requests": requests,
        "data": {
            "note": "the data given to verify; pictures, questions and answers appear only as sha256 hashes",
            "forget": describe_items(forget),
            "retain": describe_items(retain) if retain else None,
            "text": describe_items(text) if text else None,
            "probe_split": "each subject's pictures alternate between the probes' training and test halves",
        },
        "job": None if job is None else {k: job.get(k) for k in ("config", "reproduce", "changed_tensors", "byte_proof",
                                                                   "environment", "timing_s", "peak_memory_mb")},
        "environment": environment(str(device)),
    }
