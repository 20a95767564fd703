"""The erasure job: cache -> reference -> mask -> optimise -> evaluate, in memory; applying.py
writes its result and the report.

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

import gc
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import distributed as dist  # torchrun data parallelism (identity on one process)
from .batches import make_batches
from .config import Config, pick_device, seed_everything, trim_heap
from .data import anchor_items, forget_folders, read_folder
from .delta import tensor_changes
from .errors import UserError
from .features import RemoteSample, cache_samples, drop_vision_tower, fill_answers, other_answer_samples
from .forward import score, summarize
from .load import compute_dtype, master_params, open_checkpoint
from .mask import fisher_diagonal, saliency_mask
from . import holdout
from .anchor import anchors_for
from .optimise import optimise
from .ranks import ranks as job_ranks
from .scope import tower_layers
from .targets import RETENTION_ON_NEW_PICTURES, chance_level, missed_targets

logger = logging.getLogger("fastunlearn")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ROLES = ("forget", "retain")


class Phases(dict):
    """Seconds per phase of the job, each from the end of the one before."""

    def __init__(self, device: torch.device, start: float):
        super().__init__()
        self.device, self.t0 = device, start

    def __call__(self, name: str) -> None:
        if self.device.type == "cpu":  # one phase's garbage must not sit under the next one's peak
            gc.collect()
            trim_heap()
        now = time.perf_counter()
        self[name] = round(now - self.t0, 3)
        self.t0 = now


@dataclass
class Sets:
    """What the job trains and measures on, by role ("forget", "retain"). Under torchrun the batches
    are this rank's parts, and the sample lists hold the other ranks' samples as RemoteSample stubs."""

    samples: dict  # every view of every picture; the forget folders' request by request
    held: dict  # per sample: is its picture held out of the first run (holdout.py)
    train: dict  # batches of `samples`, the retain ones in mixed order (`mixed`)
    eval: dict  # batches of the pictures themselves (view 0): the metrics
    check: dict  # batches of one more view of every picture, never trained on (targets.py)
    heldout: dict  # batches of the held-out pictures (view 0)
    anchor: list  # the --anchor folder's pictures and views (anchor.py), no questions
    others: dict  # id(forget sample) -> that picture and question with other people's answers (--other-answers)
    slices: list  # each request's [start, end) among eval["forget"]'s sequences, when there are several

    @property
    def measuring(self) -> bool:
        return bool(self.heldout["forget"] or self.heldout["retain"])


def unlearn(ckpt: Path, forget_dir, retain_dir: Path | None, cfg: Config, log=logger.info) -> dict:
    """Run the job in memory. Returns the result: the changes to write and everything for the report.
    `forget_dir`: one folder, or several (one erasure request each: one load, one cache, one write)."""
    cfg.check()
    seed_everything(cfg.seed)
    start = time.perf_counter()
    folders = forget_folders(forget_dir)
    requests = [read_folder(d, "forget") for d in folders]  # one list of items per erasure request
    retain_items = read_folder(retain_dir, "retain") if retain_dir is not None else []
    device = dist.init(pick_device(cfg.device), shard=cfg.shard_llm)  # cuda:LOCAL_RANK under torchrun
    ranks = job_ranks()  # which pictures this process computes: on one process, all of them
    phase = Phases(device, start)
    loaded = open_checkpoint(ckpt, device, llm_later=True, scope=tower_layers(cfg.scope))  # the LLM cast once the tower is dropped
    phase("load")

    requests, retain_items = answer(loaded, folders, requests, retain_items, cfg, ranks)
    items = {"forget": [it for r in requests for it in r], "retain": retain_items}
    chance = chance_level(items["forget"], items["forget"] + items["retain"])
    held_images, thin = hold_out(requests, retain_items, cfg, log)
    phase("answers")

    sets = cache(loaded, requests, retain_items, held_images, cfg, ranks)
    if cfg.other_answers and not any(sets.others.values()):
        log("note: --other-answers: the folders give no other answer to any forget question; the term is off")
    phase("cache")

    params = master_params(loaded)
    reference, before = original_scores(loaded, params, sets, ranks)
    phase("reference")

    # settings are compared on both sides only
    settings = holdout.candidates(cfg) if sets.heldout["forget"] and sets.heldout["retain"] else [cfg]
    masks = saliency_masks(loaded, params, sets.samples, settings, cfg, log, ranks)
    phase("mask")

    dist.test_die("optimise")
    best = first_run(loaded, params, sets, reference, settings, masks, before, chance, cfg, log, ranks)
    chosen = settings[best["setting"]]
    mask = masks.get(chosen.mask, everything(params))
    params = {n: p.detach().clone() for n, p in params.items()}
    anchors = anchors_for(loaded, params, sets.samples["retain"] + sets.anchor, chosen.anchor_weight, ranks.world)
    losses = optimise(loaded, params, mask, sets.train["forget"], sets.train["retain"],
                      replace(chosen, steps=best["step"]), log, ranks=ranks, anchors=anchors, others=sets.others)
    same_state = dist.same_state(params)  # rank 0's projector on every rank, checked
    phase("optimise")

    new = stored_values(loaded, params, sets.samples["forget"], ckpt, ranks)
    after = measure(loaded, new, best, sets, ranks)
    check = check_targets(before, after, sets, chance, log)
    phase("evaluate")

    result = result_dict(loaded, new, cfg, folders=folders, requests=requests, items=items, held_images=held_images,
                         thin=thin, settings=settings, best=best, sets=sets, before=before, after=after, check=check,
                         mask=mask, losses=losses, same_state=same_state, phases=phase)
    del loaded  # nothing may hold the checkpoint's files (mmap) once writing starts
    return result


def answer(loaded, folders, requests: list, retain_items: list, cfg: Config, ranks) -> tuple[list, list]:
    """The items with an answer: where a folder gives none, the model's own greedy one."""
    if any(it.answer is None for items in requests + [retain_items] for it in items):
        compute_dtype(loaded)  # the model's own greedy answers need the whole model
    requests = [fill_answers(loaded, items, cfg.max_new_tokens, ranks) for items in requests]
    retain_items = fill_answers(loaded, retain_items, cfg.max_new_tokens, ranks)
    for d, items in zip(folders, requests):
        if not items:
            raise UserError(f"{d}: the model gives no answer to any forget question; nothing to forget")
    return requests, retain_items


def hold_out(requests: list, retain_items: list, cfg: Config, log) -> tuple[set, dict]:
    """The pictures held out of a first run, and by role the subjects with one picture, none to lend.

    Whole pictures held out of a first run (holdout.py): the erasure is measured on pictures it did not
    train on (and, when asked, they choose the step and the settings); the last run is the job itself."""
    held_images, thin = set(), {"forget": [], "retain": []}
    if not cfg.holdout:
        return held_images, thin
    for role, folder_items in [("forget", items) for items in requests] + [("retain", retain_items)]:
        _, held, thin_subjects = holdout.split(folder_items, cfg.seed)
        held_images |= {it.image for it in held}
        thin[role] = sorted(set(thin[role]) | set(thin_subjects))
    for role in ROLES:
        if thin[role]:
            log(f"note: {len(thin[role])} {role} subject(s) have one picture, none to hold out ("
                + ", ".join(repr(s) for s in thin[role][:5]) + (", ...)" if len(thin[role]) > 5 else ")"))
    if not held_images:
        log("note: no picture held out (a subject needs two pictures to lend one): the report has no figures on "
            "pictures the job did not train on")
    return held_images, thin


def cache(loaded, requests: list, retain_items: list, held_images: set, cfg: Config, ranks) -> Sets:
    """Every picture's views through the vision tower once, then the tower dropped; the job's batches."""
    def samples(items, desc, views, first_view=0, extra_views=0):
        return cache_samples(loaded, items, desc, views, cfg.seed, first_view, extra_views, ranks)

    def batches(samples):
        return make_batches(loaded, samples, cfg.batch_size)

    forget_items = [it for items in requests for it in items]
    # the check view (below) goes through the tower in the same call as the picture's other views
    per_request = [samples(items, "forget", cfg.views, extra_views=1) for items in requests]
    train = {"forget": [s for r in per_request for s in r],
             "retain": samples(retain_items, "retain", cfg.views, extra_views=1)}
    # the job's own check (targets.py) where no picture is held out: one more view of every picture
    check = {"forget": batches(samples(forget_items, "check", 0, cfg.views + 1)),
             "retain": batches(samples(retain_items, "check", 0, cfg.views + 1))}
    anchor = samples(anchor_items(cfg.anchor_dir), "anchor", cfg.views) if cfg.anchor_dir else []
    others = (other_answer_samples(loaded, forget_items, train["forget"], cfg.views, forget_items + retain_items,
                                   cfg.other_answers, cfg.seed) if cfg.other_answers else {})
    drop_vision_tower(loaded)
    compute_dtype(loaded, keep_embeddings=True)
    held = {"forget": holdout.sample_flags(forget_items, cfg.views, held_images),
            "retain": holdout.sample_flags(retain_items, cfg.views, held_images)}
    heldout = {role: batches([s for s, h in zip(train[role], held[role]) if h and s.view == 0]) for role in ROLES}
    bounds = [0]
    for r in per_request:  # each request's pictures: a contiguous run of the evaluated sequences
        bounds.append(bounds[-1] + sum(1 for s in r if s.view == 0))
    return Sets(samples=train, held=held, train={"forget": batches(train["forget"]),
                                                 "retain": batches(mixed(train["retain"], cfg.seed))},
                # metrics are measured on the pictures themselves, not on their augmented views
                eval={role: batches([s for s in train[role] if s.view == 0]) for role in ROLES},
                check=check, heldout=heldout, anchor=anchor, others=others, slices=list(zip(bounds, bounds[1:])) if len(per_request) > 1 else [])


def mixed(samples: list, seed: int) -> list:
    """The retain samples in a seeded random order, the same on every rank. In folder order a step's
    retain batch held one or two pictures' views, so a step guarded one person and a job passed over
    each kept person a few times: a thicker retain folder kept the other people worse (RESULTS.md,
    "Training batches in folder order"). Mixed, every step guards many people. (The forget samples
    stay in folder order: mixing them too measured no better.)"""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [samples[i] for i in order]


def metrics(loaded, params, batches: list, ranks) -> dict:
    """The metrics of `batches` under `params`."""
    return summarize(score(loaded, params, batches, ranks), batches, ranks)


def original_scores(loaded, params, sets: Sets, ranks) -> tuple[torch.Tensor, dict]:
    """The original projector, computed once: the reference NLL of every forget view of this rank's
    (set on the training batches), and the "before" metrics, the forget ones from the same pass (the
    pictures themselves, view 0, are eval["forget"]'s sequences in its order)."""
    forget = score(loaded, params, sets.train["forget"], ranks)
    mine = [s for s in sets.samples["forget"] if not isinstance(s, RemoteSample)]
    view0 = torch.tensor([s.view == 0 for s in mine], dtype=torch.bool)
    forget_before = {k: v[view0] for k, v in forget.items()}
    retain_before = score(loaded, params, sets.eval["retain"], ranks)
    retain_check = score(loaded, params, sets.check["retain"], ranks)
    heldout = {role: metrics(loaded, params, b, ranks) for role, b in sets.heldout.items()}
    set_reference(loaded, sets.train["forget"], forget["nll"])
    return forget["nll"], {
        "forget": summarize(forget_before, sets.eval["forget"], ranks),
        "requests": [summarize(forget_before, sets.eval["forget"], ranks, slice(*s)) for s in sets.slices],
        "retain": summarize(retain_before, sets.eval["retain"], ranks),
        "retain_check": summarize(retain_check, sets.check["retain"], ranks),
        "heldout": heldout,
    }


def set_reference(loaded, batches: list, reference: torch.Tensor) -> None:
    for batch, ref in zip(batches, reference.split([len(b.lengths) for b in batches])):
        batch.ref_nll = ref.to(loaded.device)


def everything(params: dict) -> dict:
    """The mask that lets every element change."""
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}


def fisher_masks(loaded, params, forget: list, retain: list, cfg: Config, ranks) -> dict:
    """{"fisher": the saliency mask of these forget and retain samples}."""
    forget_fisher = fisher_diagonal(loaded, params, forget, cfg.fisher_samples, ranks=ranks)
    retain_fisher = fisher_diagonal(loaded, params, retain, cfg.fisher_samples, ranks=ranks)
    return {"fisher": saliency_mask(forget_fisher, retain_fisher, cfg.mask_threshold)}


def saliency_masks(loaded, params, samples: dict, settings: list, cfg: Config, log, ranks) -> dict:
    """The masks the settings ask for, on every picture ({} without retain pictures to protect)."""
    if cfg.mask == "fisher" and not samples["retain"]:
        log("note: no --retain folder: the saliency mask and the retain term are off, nothing protects other images")
    if not (any(c.mask == "fisher" for c in settings) and samples["retain"]):
        return {}
    return fisher_masks(loaded, params, samples["forget"], samples["retain"], cfg, ranks)


def first_run(loaded, params, sets: Sets, reference, settings: list, masks: dict, before: dict, chance: float,
              cfg: Config, log, ranks) -> dict:
    """Where pictures are held out: each setting trained without them, scored on them (holdout.first_runs,
    its masks taken without them too); the best setting, step and projector. Else the given setting."""
    if not sets.measuring:
        return {"setting": 0, "step": cfg.steps, "params": None, "trace": []}
    first = {role: [s for s, h in zip(sets.samples[role], sets.held[role]) if not h] for role in ROLES}
    forget_batches = make_batches(loaded, first["forget"], cfg.batch_size)
    mine = [h for s, h in zip(sets.samples["forget"], sets.held["forget"]) if not isinstance(s, RemoteSample)]
    set_reference(loaded, forget_batches, reference[~torch.tensor(mine, dtype=torch.bool)])
    first_masks = fisher_masks(loaded, params, first["forget"], first["retain"], cfg, ranks) if masks else {}
    # the held-out retain pictures are no anchors of the run measured on them
    anchors = anchors_for(loaded, params, first["retain"] + sets.anchor, max(c.anchor_weight for c in settings),
                          ranks.world)
    best = holdout.first_runs(loaded, params, settings, first_masks, everything(params), forget_batches,
                              make_batches(loaded, mixed(first["retain"], cfg.seed), cfg.batch_size), sets.heldout,
                              before["heldout"],
                              chance, cfg.select, log, ranks, anchors, sets.others)
    if cfg.select or len(settings) > 1:
        chosen = settings[best["setting"]]
        log(f"held-out pictures chose {holdout.describe_setting(chosen)}, stopped at step {best['step']} of {chosen.steps}")
    return best


def stored_values(loaded, params: dict, forget_samples: list, ckpt: Path, ranks) -> dict:
    """The projector as it will be stored: cast once from fp32 (what is measured is exactly that)."""
    new = {n: params[n].to(loaded.original[n].dtype).cpu() for n in params}
    if all(torch.equal(new[n], loaded.original[n]) for n in new):  # an edit of nothing is no success (dry run too)
        fisher = fisher_diagonal(loaded, master_params(loaded), forget_samples, 8, ranks=ranks)
        flat = not any(f.any() for f in fisher.values())
        why = (loaded.adapter.connector_ignored(loaded.model) if flat else "no element of the connector moved (updates "
               "below its stored precision, or none in the mask); raise --lr or --steps, or lower --mask-threshold")
        raise UserError(f"{ckpt}: {why}; nothing was written")
    return new


def measure(loaded, new: dict, best: dict, sets: Sets, ranks) -> dict:
    """The "after" metrics of the stored projector; on the held-out pictures, of the first run's (which
    did not train on them), as it would be stored."""
    stored = master_params(loaded, new)
    forget = score(loaded, stored, sets.eval["forget"], ranks)
    after = {"forget": summarize(forget, sets.eval["forget"], ranks),
             "requests": [summarize(forget, sets.eval["forget"], ranks, slice(*s)) for s in sets.slices],
             "retain": metrics(loaded, stored, sets.eval["retain"], ranks),
             "forget_check": metrics(loaded, stored, sets.check["forget"], ranks),
             "retain_check": metrics(loaded, stored, sets.check["retain"], ranks),
             "heldout": {}}
    if sets.measuring:
        first = master_params(loaded, {n: p.to(loaded.original[n].dtype).cpu() for n, p in best["params"].items()})
        after["heldout"] = {role: metrics(loaded, first, b, ranks) for role, b in sets.heldout.items()}
    return after


def check_targets(before: dict, after: dict, sets: Sets, chance: float, log) -> dict:
    """The job's own check of the targets (targets.py), on the held-out pictures where there are some,
    else on the unseen views; warnings logged. The report's "check"."""
    heldout, retain_check = sets.heldout, sets.check["retain"]
    f_check, f_on = ((after["heldout"]["forget"], "held-out pictures") if heldout["forget"]
                     else (after["forget_check"], "unseen views"))
    r_check, r_on = (((before["heldout"]["retain"], after["heldout"]["retain"]), "held-out pictures") if heldout["retain"]
                     else ((before["retain_check"], after["retain_check"]), "unseen views") if retain_check
                     else ((None, None), ""))
    warnings = missed_targets(f_check["greedy_accuracy"], chance, *(m and m["greedy_accuracy"] for m in r_check),
                              forget_on=f_on, retain_on=r_on)
    for warning in warnings:
        log(f"WARNING: {warning}")
    if retain_check and not heldout["retain"]:
        log("note: retention was checked on new views of the retain pictures the job trained on, where the retain "
            f"term has already restored them; {RETENTION_ON_NEW_PICTURES} (benchmarks/RESULTS.md). Gate on pictures "
            "the job never saw: fastunlearn verify ORIGINAL UNLEARNED FORGET_DIR --retain NEW_DIR --max-retain-drop 0.02")
    return {"note": "exact-answer accuracy on the held-out pictures (see heldout), or where a folder has none "
                    "to hold out, on one more augmented view of every picture, never trained on (targets.py); "
                    f"views are weak evidence, for retention most: {RETENTION_ON_NEW_PICTURES}",
            "on": {"forget": f_on, "retain": r_on or None},
            "chance": round(chance, 6), "forget_after": f_check["greedy_accuracy"],
            "retain_before": r_check[0] and r_check[0]["greedy_accuracy"],
            "retain_after": r_check[1] and r_check[1]["greedy_accuracy"],
            "retain_nll_before": r_check[0] and r_check[0]["mean_token_nll"],
            "retain_nll_after": r_check[1] and r_check[1]["mean_token_nll"], "warnings": warnings}


def result_dict(loaded, new: dict, cfg: Config, *, folders, requests, items, held_images, thin, settings, best,
                sets: Sets, before, after, check, mask, losses, same_state, phases) -> dict:
    """The job's result: the changes to write and everything for the report."""
    mask_density = sum(int(m.sum()) for m in mask.values()) / max(1, sum(m.numel() for m in mask.values()))
    return {
        "adapter": loaded.adapter.family,
        "model_type": loaded.model.config.model_type,
        "device": str(loaded.device),
        "compute_dtype": str(loaded.model.get_output_embeddings().weight.dtype).replace("torch.", ""),
        "changes": tensor_changes(loaded, new),
        "may_change": list(loaded.adapter.connector_paths() + loaded.adapter.edited_stems),  # --scope's room
        "items": items,
        "heldout": {
            "note": ("whole pictures (one per subject with two or more) held out of a first run; 'after' is that run's "
                     "projector, which did not train on them; the written projector is the last run's, with the same "
                     "settings and steps on every picture, these included"
                     + ("; they also chose the step and settings, so these figures lean optimistic"
                        if cfg.select or len(settings) > 1 else "")
                     + "; verify --retain NEW_DIR on pictures the job never saw at all is the unbiased measure"),
            "pictures": {role: len({it.image for it in items[role] if it.image in held_images}) for role in ROLES},
            "thin_subjects": {role: len(thin[role]) for role in thin},
            **{role: {"before": before["heldout"][role], "after": after["heldout"][role]}
               for role in ROLES if sets.heldout[role]},
        },
        "selection": {"settings": [holdout.describe_setting(c) for c in settings], "chosen": best["setting"],
                      "step": best["step"], "trace": best["trace"]},
        "metrics": {  # on every picture of the folders: the written projector trained on all of them
            "forget": {"before": before["forget"], "after": after["forget"]},
            "retain": {"before": before["retain"], "after": after["retain"]},
        },
        "check": check,
        "requests": [{"folder": d, "items": request, "metrics": {"before": b, "after": a}}
                     for d, request, b, a in zip(folders, requests, before["requests"], after["requests"])],
        "distributed": {**dist.describe(), "projector_identical_on_all_ranks": same_state},
        "mask_density": round(mask_density, 6),
        "losses": [round(x, 6) for x in losses],
        "phases_s": dict(phases),
        "peak_memory_mb": round(peak_memory_mb(loaded.device), 1),
        "config": asdict(cfg),
    }
