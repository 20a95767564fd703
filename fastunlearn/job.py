"""The erasure job: cache -> reference -> mask -> optimise -> evaluate -> write -> report.

Only the projector changes, so:
- vision features are computed once per image, then the vision tower is dropped;
- the reference model differs only in the projector: reference answer NLLs are computed once,
  with the original projector, and no second model is kept;
- the LLM, embeddings and lm_head are frozen (no grads, no optimizer state); gradients flow
  through their activations into fp32 master copies of the projector tensors, read from the
  stored bytes;
- only answer positions reach the lm_head (`linear_nll`), never full-sequence logits;
- AdamW updates only elements selected by the saliency mask; the rest stay bit-identical, so
  the stored delta is sparse and exact.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import journal
from . import safetensors_io as st
from .batches import make_batches, make_groups
from .config import Config, pick_device, seed_everything, trim_heap
from .data import read_folder
from .delta import save_delta, tensor_changes
from .errors import UserError
from .features import cache_samples, drop_vision_tower, fill_answers
from .forward import score, summarize
from .load import check_weights_match_config, compute_dtype, master_params, open_checkpoint
from .mask import fisher_diagonal, saliency_mask
from .optimise import optimise
from .write import preflight, write_result

logger = logging.getLogger("fastunlearn")
FISHER_CHUNK = 4  # samples per batched per-sample-gradient pass (bounds its activations)
MICRO_BATCH = 4  # sequences per forward/backward within an optimisation step (same update, fewer activations)
# Trade-off, measured on 2 shared cores with 2 torch threads (16 sequences of 79 tokens, LLaVA-CPU
# set-up, one process, alternating): one forward/backward of 16 took 6.3-7.8 s, 2 x 8 9.3-9.7 s,
# 4 x 4 17.5-18.5 s (contended threads pay per op); yet whole jobs at 40 steps measured 6.8 s/step
# with 4 and 7.1 s/step with 8, and 8 raised peak RSS from 713 to 787 MB: 4 kept (memory goal).


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_memory() -> None:
    """Give freed heap pages back to the OS between phases (glibc keeps them otherwise), so that
    one phase's peak does not sit on top of the previous phase's garbage."""
    gc.collect()
    trim_heap()


def unlearn(ckpt: Path, forget_dir: Path, retain_dir: Path | None, cfg: Config, log=logger.info) -> dict:
    """Run the job in memory. Returns the result: the changes to write and everything for the report."""
    cfg.check()
    seed_everything(cfg.seed)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()

    def phase(name):
        nonlocal t0
        release_free_memory()
        now = time.perf_counter()
        phases[name] = round(now - t0, 3)
        t0 = now

    forget_items = read_folder(forget_dir, "forget")
    retain_items = read_folder(retain_dir, "retain") if retain_dir is not None else []
    device = pick_device(cfg.device)
    loaded = open_checkpoint(ckpt, device, llm_later=True)
    phase("load")

    if any(it.answer is None for it in forget_items + retain_items):
        compute_dtype(loaded)  # the model's own greedy answers need the whole model
    forget_items = fill_answers(loaded, forget_items, cfg.max_new_tokens)
    retain_items = fill_answers(loaded, retain_items, cfg.max_new_tokens)
    if not forget_items:
        raise UserError(f"{forget_dir}: the model gives no answer to any forget question; nothing to forget")
    phase("answers")
    forget_samples = cache_samples(loaded, forget_items, "forget", cfg.views, cfg.seed)
    retain_samples = cache_samples(loaded, retain_items, "retain", cfg.views, cfg.seed)
    drop_vision_tower(loaded)
    compute_dtype(loaded, embeddings=False)
    forget_batches = make_groups(loaded, forget_samples, cfg.batch_size, MICRO_BATCH)
    retain_batches = make_groups(loaded, retain_samples, cfg.batch_size, MICRO_BATCH)
    # metrics are measured on the pictures themselves, not on their augmented views
    forget_eval = make_batches(loaded, [s for s in forget_samples if s.view == 0], cfg.batch_size)
    retain_eval = make_batches(loaded, [s for s in retain_samples if s.view == 0], cfg.batch_size)
    phase("cache")

    params = master_params(loaded)
    # the original projector, computed once: reference NLLs of every forget view, and the "before"
    # metrics of the pictures themselves (view 0) from the same pass
    forget_micro = [b for group in forget_batches for b in group]
    forget_scores = score(loaded, params, forget_micro)
    reference = forget_scores["nll"]
    view0 = torch.tensor([s.view == 0 for s in forget_samples], dtype=torch.bool)
    forget_before = {k: v[view0] for k, v in forget_scores.items()}
    retain_before = score(loaded, params, retain_eval)
    for batch, ref in zip(forget_micro, reference.split([len(b.lengths) for b in forget_micro])):
        batch.ref_nll = ref.to(device)
    phase("reference")

    if cfg.mask == "fisher" and retain_samples:
        forget_fisher = fisher_diagonal(loaded, params, forget_samples, cfg.fisher_samples, FISHER_CHUNK)
        retain_fisher = fisher_diagonal(loaded, params, retain_samples, cfg.fisher_samples, FISHER_CHUNK)
        mask = saliency_mask(forget_fisher, retain_fisher, cfg.mask_threshold)
    else:
        if cfg.mask == "fisher":
            log("note: no --retain folder: the saliency mask and the retain term are off, nothing protects other images")
        mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    phase("mask")

    losses = optimise(loaded, params, mask, forget_batches, retain_batches, cfg, log)
    phase("optimise")

    # What will be stored: cast once from fp32; evaluate exactly those values.
    new = {n: params[n].to(loaded.original[n].dtype).cpu() for n in params}
    stored_params = master_params(loaded, new)
    forget_after = score(loaded, stored_params, forget_eval)
    retain_after = score(loaded, stored_params, retain_eval)
    phase("evaluate")

    changes = tensor_changes(loaded, new)
    mask_density = sum(int(m.sum()) for m in mask.values()) / max(1, sum(m.numel() for m in mask.values()))
    result = {
        "adapter": loaded.adapter.family,
        "model_type": loaded.model.config.model_type,
        "device": str(device),
        "compute_dtype": str(loaded.model.get_output_embeddings().weight.dtype).replace("torch.", ""),
        "changes": changes,
        "items": {"forget": forget_items, "retain": retain_items},
        "metrics": {
            "forget": {"before": summarize(forget_before, forget_eval), "after": summarize(forget_after, forget_eval)},
            "retain": {"before": summarize(retain_before, retain_eval), "after": summarize(retain_after, retain_eval)},
        },
        "mask_density": round(mask_density, 6),
        "losses": [round(x, 6) for x in losses],
        "phases_s": phases,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "config": asdict(cfg),
    }
    del loaded  # nothing may hold the checkpoint's files (mmap) once writing starts
    return result


def apply(ckpt, forget_dir, retain_dir=None, *, out=None, report_path=None, delta_path=None, dry_run=False,
          config: Config | None = None, log=None) -> dict:
    """Erase what `forget_dir` shows from the checkpoint folder `ckpt`; keep what `retain_dir` shows.

    Patches `ckpt` in place (crash-safe), or writes a new checkpoint folder `out`; `dry_run` writes
    no checkpoint. Writes the JSON report (default: unlearning_report.json in the written
    checkpoint) and, with `delta_path`, the delta for `patch`. Returns the report as a plain dict.
    Raises UserError (or a subclass, see errors.py) for input it cannot use, before any write.
    `log` receives one-line notes (default: the "fastunlearn" logger)."""
    cfg = config or Config()
    log = log or logger.info
    cfg.check()
    started = time.perf_counter()
    ckpt = Path(ckpt)
    check_weights_match_config(ckpt)
    in_place = out is None and not dry_run
    # an in-place job holds the checkpoint's lock from start to end: a second one says "busy" at once
    with journal.locked(ckpt) if in_place else contextlib.nullcontext():
        if (ckpt / journal.JOURNAL).exists() or (ckpt / (journal.JOURNAL + ".tmp")).exists():
            if journal.recover(ckpt):
                log(f"finished an interrupted patch of {ckpt}")
        preflight(ckpt, out, dry_run)
        stamps = {p.resolve(): st.file_stamp(p) for p in st.weight_files(ckpt)}

        result = unlearn(ckpt, Path(forget_dir), Path(retain_dir) if retain_dir else None, cfg, log)
        gc.collect()
        journal.test_pause("before-write")
        t_write = time.perf_counter()
        proof = write_result(ckpt, result, Path(out) if out else None, dry_run, stamps)
        result["phases_s"]["write"] = round(time.perf_counter() - t_write, 3)
        result["phases_s"]["total"] = round(time.perf_counter() - started, 3)
        return _finish(result, proof, ckpt, forget_dir, retain_dir, report_path, delta_path, dry_run)


def _finish(result, proof, ckpt, forget_dir, retain_dir, report_path, delta_path, dry_run) -> dict:
    from .report import build_report

    report = build_report(result, proof, source=ckpt, forget_dir=forget_dir, retain_dir=retain_dir)
    if report_path is None and not dry_run:
        report_path = Path(proof["written_to"]) / "unlearning_report.json"
    if report_path is not None:
        journal.write_file_atomic(Path(report_path), (json.dumps(report, indent=2) + "\n").encode())
        report["report_path"] = str(report_path)
    if delta_path is not None:
        save_delta(Path(delta_path), result["changes"])
    if not report["byte_proof"]["all_other_bytes_unchanged"] and not dry_run:
        raise UserError(f"bytes outside the projector changed in {proof['written_to']} during the write; see {report_path}")
    return report
