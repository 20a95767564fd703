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
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import dist_samples as shards
from . import distributed as dist  # torchrun data parallelism (identity on one process)
from . import journal
from . import safetensors_io as st
from .config import Config, pick_device, seed_everything, trim_heap
from .data import read_folder
from .delta import save_delta, tensor_changes
from .errors import UserError
from .features import drop_vision_tower
from .fingerprints import config_fingerprint, fingerprint_checkpoint, fingerprint_folder
from .load import check_weights_match_config, compute_dtype, master_params, open_checkpoint
from .mask import fisher_diagonal, saliency_mask
from . import holdout
from .optimise import optimise
from .targets import RETENTION_ON_NEW_PICTURES, chance_level, missed_targets
from .write import preflight, write_result

logger = logging.getLogger("fastunlearn")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forget_folders(forget_dir) -> list[Path]:
    """The forget requests of one job: a folder, a list of folders, or a manifest file (one folder a
    line, relative to the manifest; blank lines and # comments skipped)."""
    dirs = [forget_dir] if isinstance(forget_dir, (str, Path)) else list(forget_dir)
    if not dirs:
        raise UserError("no forget folder given")
    out = []
    for d in map(Path, dirs):
        if d.is_file():
            try:
                if d.stat().st_size > 1 << 20:
                    raise UserError(f"{d}: a file, not a folder; too large for a manifest (one forget folder a line)")
                lines = d.read_bytes().decode("utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{d}: a file, not a folder; not usable as a manifest (one forget folder a line: "
                                f"{e.__class__.__name__})") from None
            listed = [d.parent / line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not listed:
                raise UserError(f"{d}: manifest lists no forget folder")
            out += listed
        else:
            out.append(d)
    return out


def fisher_masks(loaded, params, forget: list, retain: list, cfg: Config) -> dict:
    """{"fisher": the saliency mask of these forget and retain samples}."""
    forget_fisher = fisher_diagonal(loaded, params, forget, cfg.fisher_samples)
    retain_fisher = fisher_diagonal(loaded, params, retain, cfg.fisher_samples)
    return {"fisher": saliency_mask(forget_fisher, retain_fisher, cfg.mask_threshold)}


def unlearn(ckpt: Path, forget_dir, retain_dir: Path | None, cfg: Config, log=logger.info) -> dict:
    """Run the job in memory. Returns the result: the changes to write and everything for the report.
    `forget_dir`: one folder, or several (one erasure request each: one load, one cache, one write)."""
    cfg.check()
    seed_everything(cfg.seed)
    phases: dict[str, float] = {}
    t0 = time.perf_counter()

    def phase(name):
        nonlocal t0
        if device.type == "cpu":  # one phase's garbage must not sit under the next one's peak
            gc.collect()
            trim_heap()
        now = time.perf_counter()
        phases[name] = round(now - t0, 3)
        t0 = now

    folders = forget_folders(forget_dir)
    requests = [read_folder(d, "forget") for d in folders]  # one list of items per erasure request
    retain_items = read_folder(retain_dir, "retain") if retain_dir is not None else []
    device = dist.init(pick_device(cfg.device), shard=cfg.shard_llm)  # cuda:LOCAL_RANK under torchrun
    loaded = open_checkpoint(ckpt, device, llm_later=True)  # the LLM cast once the tower is dropped
    phase("load")
    if any(it.answer is None for items in requests + [retain_items] for it in items):
        compute_dtype(loaded)  # the model's own greedy answers need the whole model

    # shards.fill_answers / shards.cache_samples / shards.make_batches / shards.score are the
    # features / batches / forward functions themselves on one process; under torchrun each rank
    # computes its own pictures' share and holds the others' as stubs
    requests = [shards.fill_answers(loaded, items, cfg.max_new_tokens) for items in requests]
    retain_items = shards.fill_answers(loaded, retain_items, cfg.max_new_tokens)
    for d, items in zip(folders, requests):
        if not items:
            raise UserError(f"{d}: the model gives no answer to any forget question; nothing to forget")
    forget_items = [it for items in requests for it in items]
    chance = chance_level(forget_items, forget_items + retain_items)
    # whole pictures held out of a first run (holdout.py): the erasure is measured on pictures it did not
    # train on (and, when asked, they choose the step and the settings); the last run is the job itself
    held_images, thin = set(), {"forget": [], "retain": []}
    if cfg.holdout:
        for role, folder_items in [("forget", items) for items in requests] + [("retain", retain_items)]:
            _, held, thin_subjects = holdout.split(folder_items, cfg.seed)
            held_images |= {it.image for it in held}
            thin[role] = sorted(set(thin[role]) | set(thin_subjects))
        for role in ("forget", "retain"):
            if thin[role]:
                log(f"note: {len(thin[role])} {role} subject(s) have one picture, none to hold out ("
                    + ", ".join(repr(s) for s in thin[role][:5]) + (", ...)" if len(thin[role]) > 5 else ")"))
    phase("answers")
    # the check view (below) goes through the tower in the same call as the picture's other views
    per_request = [shards.cache_samples(loaded, items, "forget", cfg.views, cfg.seed, extra_views=1) for items in requests]
    forget_samples = [s for samples in per_request for s in samples]
    retain_samples = shards.cache_samples(loaded, retain_items, "retain", cfg.views, cfg.seed, extra_views=1)
    # the job's own check (targets.py) where no picture is held out: one more view of every picture
    forget_check = shards.make_batches(loaded, shards.cache_samples(loaded, forget_items, "check", 0, cfg.seed, cfg.views + 1),
                                     cfg.batch_size)
    retain_check = shards.make_batches(loaded, shards.cache_samples(loaded, retain_items, "check", 0, cfg.seed, cfg.views + 1),
                                     cfg.batch_size)
    drop_vision_tower(loaded)
    compute_dtype(loaded, keep_embeddings=True)
    held = {"forget": holdout.sample_flags(forget_items, cfg.views, held_images),
            "retain": holdout.sample_flags(retain_items, cfg.views, held_images)}
    first_forget = [s for s, h in zip(forget_samples, held["forget"]) if not h]
    first_retain = [s for s, h in zip(retain_samples, held["retain"]) if not h]
    heldout = {role: shards.make_batches(loaded, [s for s, h in zip(samples, held[role]) if h and s.view == 0],
                                         cfg.batch_size)
               for role, samples in (("forget", forget_samples), ("retain", retain_samples))}
    forget_batches = shards.make_batches(loaded, forget_samples, cfg.batch_size)
    retain_batches = shards.make_batches(loaded, retain_samples, cfg.batch_size)
    # metrics are measured on the pictures themselves, not on their augmented views
    forget_eval = shards.make_batches(loaded, [s for s in forget_samples if s.view == 0], cfg.batch_size)
    retain_eval = shards.make_batches(loaded, [s for s in retain_samples if s.view == 0], cfg.batch_size)
    bounds = [0]
    for samples in per_request:  # each request's pictures: a contiguous run of the evaluated sequences
        bounds.append(bounds[-1] + sum(1 for s in samples if s.view == 0))
    slices = list(zip(bounds, bounds[1:])) if len(per_request) > 1 else []
    phase("cache")

    params = master_params(loaded)
    # the original projector, computed once: the reference NLL of every forget view, and from the same
    # pass the forget "before" metrics (the pictures themselves, view 0, in forget_eval's order)
    forget_scores = shards.score(loaded, params, forget_batches)
    reference = forget_scores["nll"]
    mine = [not isinstance(s, shards.RemoteSample) for s in forget_samples]  # this rank's rows, in order
    view0 = torch.tensor([s.view == 0 for s, m in zip(forget_samples, mine) if m], dtype=torch.bool)
    forget_before = {k: v[view0] for k, v in forget_scores.items()}
    retain_before, retain_check_before = shards.score(loaded, params, retain_eval), shards.score(loaded, params, retain_check)
    heldout_before = {role: shards.summaries(shards.score(loaded, params, b), b)[0] for role, b in heldout.items()}
    for batch, ref in zip(forget_batches, reference.split([len(b.lengths) for b in forget_batches])):
        batch.ref_nll = ref.to(device)
    phase("reference")

    measuring = bool(heldout["forget"] or heldout["retain"])
    choosing = bool(heldout["forget"] and heldout["retain"])  # settings are compared on both sides only
    settings = holdout.candidates(cfg) if choosing else [cfg]
    if cfg.holdout and not measuring:
        log("note: no picture held out (a subject needs two pictures to lend one): the report has no figures on "
            "pictures the job did not train on")
    fisher = bool(any(c.mask == "fisher" for c in settings) and retain_samples)
    if cfg.mask == "fisher" and not retain_samples:
        log("note: no --retain folder: the saliency mask and the retain term are off, nothing protects other images")
    everything = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    masks = fisher_masks(loaded, params, forget_samples, retain_samples, cfg) if fisher else {}
    phase("mask")

    dist.test_die("optimise")
    best = {"setting": 0, "step": cfg.steps, "params": None, "trace": []}
    if measuring:
        first_batches = shards.make_batches(loaded, first_forget, cfg.batch_size)
        first_ref = reference[~torch.tensor([h for h, m in zip(held["forget"], mine) if m], dtype=torch.bool)]
        for batch, ref in zip(first_batches, first_ref.split([len(b.lengths) for b in first_batches])):
            batch.ref_nll = ref.to(device)
        first_masks = fisher_masks(loaded, params, first_forget, first_retain, cfg) if fisher else {}
        best = holdout.first_runs(loaded, params, settings, first_masks, everything,
                                  first_batches, shards.make_batches(loaded, first_retain, cfg.batch_size), heldout,
                                  heldout_before, chance, cfg.select, log)
    chosen = settings[best["setting"]]
    if cfg.select or len(settings) > 1:
        log(f"held-out pictures chose {holdout.describe_setting(chosen)}, stopped at step {best['step']} of {chosen.steps}")
    mask = masks.get(chosen.mask, everything)
    params = {n: p.detach().clone() for n, p in params.items()}
    losses = optimise(loaded, params, mask, forget_batches, retain_batches, replace(chosen, steps=best["step"]), log)
    same_state = dist.same_state(params)  # rank 0's projector on every rank, checked
    phase("optimise")

    # What will be stored: cast once from fp32; evaluate exactly those values.
    new = {n: params[n].to(loaded.original[n].dtype).cpu() for n in params}
    if all(torch.equal(new[n], loaded.original[n]) for n in new):  # an edit of nothing is no success (dry run too)
        flat = not any(f.any() for f in fisher_diagonal(loaded, master_params(loaded), forget_samples, 8).values())
        why = (loaded.adapter.connector_ignored(loaded.model) if flat else "no element of the connector moved (updates "
               "below its stored precision, or none in the mask); raise --lr or --steps, or lower --mask-threshold")
        raise UserError(f"{ckpt}: {why}; nothing was written")
    stored_params = master_params(loaded, new)
    forget_after = shards.score(loaded, stored_params, forget_eval)
    retain_after = shards.score(loaded, stored_params, retain_eval)
    (fb, fb_req), (fa, fa_req) = shards.summaries(forget_before, forget_eval, slices), shards.summaries(forget_after, forget_eval, slices)
    (rb, _), (ra, _) = shards.summaries(retain_before, retain_eval), shards.summaries(retain_after, retain_eval)
    (fc, _) = shards.summaries(shards.score(loaded, stored_params, forget_check), forget_check)
    (rcb, _), (rca, _) = (shards.summaries(retain_check_before, retain_check),
                          shards.summaries(shards.score(loaded, stored_params, retain_check), retain_check))
    # on held-out pictures: the first run's projector (which did not train on them), as it would be stored
    heldout_after = {}
    if measuring:
        first_params = master_params(loaded, {n: p.to(loaded.original[n].dtype).cpu() for n, p in best["params"].items()})
        heldout_after = {role: shards.summaries(shards.score(loaded, first_params, b), b)[0] for role, b in heldout.items()}
    # the targets are checked on the held-out pictures where there are some, else on the unseen views
    f_check, f_on = (heldout_after["forget"], "held-out pictures") if heldout["forget"] else (fc, "unseen views")
    r_check, r_on = (((heldout_before["retain"], heldout_after["retain"]), "held-out pictures") if heldout["retain"]
                     else ((rcb, rca), "unseen views") if retain_check else ((None, None), ""))
    warnings = missed_targets(f_check["greedy_accuracy"], chance, *(m and m["greedy_accuracy"] for m in r_check),
                              forget_on=f_on, retain_on=r_on)
    for warning in warnings:
        log(f"WARNING: {warning}")
    if retain_check and not heldout["retain"]:
        log("note: retention was checked on new views of the retain pictures the job trained on, where the retain "
            f"term has already restored them; {RETENTION_ON_NEW_PICTURES} (benchmarks/RESULTS.md). Gate on pictures "
            "the job never saw: fastunlearn verify ORIGINAL UNLEARNED FORGET_DIR --retain NEW_DIR --max-retain-drop 0.02")
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
        "heldout": {
            "note": ("whole pictures (one per subject with two or more) held out of a first run; 'after' is that run's "
                     "projector, which did not train on them; the written projector is the last run's, with the same "
                     "settings and steps on every picture, these included"
                     + ("; they also chose the step and settings, so these figures lean optimistic"
                        if cfg.select or len(settings) > 1 else "")
                     + "; verify --retain NEW_DIR on pictures the job never saw at all is the unbiased measure"),
            "pictures": {role: len({it.image for it in items if it.image in held_images})
                         for role, items in (("forget", forget_items), ("retain", retain_items))},
            "thin_subjects": {role: len(thin[role]) for role in thin},
            **{role: {"before": heldout_before[role], "after": heldout_after[role]} for role in heldout if heldout[role]},
        },
        "selection": {"settings": [holdout.describe_setting(c) for c in settings], "chosen": best["setting"],
                      "step": best["step"], "trace": best["trace"]},
        "metrics": {  # on every picture of the folders: the written projector trained on all of them
            "forget": {"before": fb, "after": fa},
            "retain": {"before": rb, "after": ra},
        },
        "check": {"note": "exact-answer accuracy on the held-out pictures (see heldout), or where a folder has none "
                           "to hold out, on one more augmented view of every picture, never trained on (targets.py); "
                           f"views are weak evidence, for retention most: {RETENTION_ON_NEW_PICTURES}",
                  "on": {"forget": f_on, "retain": r_on or None},
                  "chance": round(chance, 6), "forget_after": f_check["greedy_accuracy"],
                  "retain_before": r_check[0] and r_check[0]["greedy_accuracy"],
                  "retain_after": r_check[1] and r_check[1]["greedy_accuracy"],
                  "retain_nll_before": r_check[0] and r_check[0]["mean_token_nll"],
                  "retain_nll_after": r_check[1] and r_check[1]["mean_token_nll"], "warnings": warnings},
        "requests": [{"folder": d, "items": items, "metrics": {"before": b, "after": a}}
                     for d, items, b, a in zip(folders, requests, fb_req, fa_req)],
        "distributed": {**dist.describe(), "projector_identical_on_all_ranks": same_state},
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
    # under torchrun, join the process group; rank 0 alone locks, recovers, writes
    dist.init(pick_device(cfg.device), shard=cfg.shard_llm)
    try:
        return _apply(ckpt, forget_dir, retain_dir, out, report_path, delta_path, dry_run, cfg, log, started)
    except Exception as e:
        dist.stopping()  # torchrun's SIGTERM must not cut this rank's error line
        failure = dist.as_failure(e)  # a peer's death seen inside FSDP's collectives: one line
        if failure is None:
            raise
        raise failure from None
    finally:
        dist.shutdown()


def _apply(ckpt, forget_dir, retain_dir, out, report_path, delta_path, dry_run, cfg, log, started) -> dict:
    in_place = out is None and not dry_run
    main = dist.is_main()
    folders = forget_folders(forget_dir)
    # an in-place job holds the checkpoint's lock from start to end: a second one says "busy" at once
    problem, stamps = None, None
    with contextlib.ExitStack() as stack:
        try:
            check_weights_match_config(ckpt)
            if in_place and main:
                stack.enter_context(journal.locked(ckpt))
            if main and ((ckpt / journal.JOURNAL).exists() or (ckpt / (journal.JOURNAL + ".tmp")).exists()):
                if journal.recover(ckpt):
                    log(f"finished an interrupted patch of {ckpt}")
            if main:
                preflight(ckpt, out, dry_run)
                stamps = {p.resolve(): st.file_stamp(p) for p in st.weight_files(ckpt)}
        except UserError as e:
            problem = e
        # every rank could start and got the same inputs, or every rank stops here
        dist.agree({"checkpoint": lambda: fingerprint_checkpoint(ckpt),
                    "forget": lambda: [fingerprint_folder(d) for d in folders],
                    "retain": lambda: fingerprint_folder(retain_dir),
                    "options": lambda: config_fingerprint(cfg, out=out, dry_run=dry_run, delta=delta_path,
                                                               report=report_path)}, problem)

        result = unlearn(ckpt, folders, Path(retain_dir) if retain_dir else None, cfg, log)
        gc.collect()

        def write_and_report():  # rank 0 only; the whole job on one process
            journal.test_pause("before-write")
            t_write = time.perf_counter()
            proof = write_result(ckpt, result, Path(out) if out else None, dry_run, stamps)
            result["phases_s"]["write"] = round(time.perf_counter() - t_write, 3)
            result["phases_s"]["total"] = round(time.perf_counter() - started, 3)
            return _finish(result, proof, ckpt, folders, retain_dir, report_path, delta_path, dry_run)

        return dist.on_main(write_and_report)


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
