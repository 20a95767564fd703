"""What benchmarks/compare.py and benchmarks/efficacy.py share: a model and forget set opened once
and scored with fastunlearn.evaluate (`Bench`), and the whole-model methods' learning rate."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from fastunlearn import evaluate as ev
from fastunlearn.data import first_question_only, read_folder
from fastunlearn.features import cache_samples, drop_vision_tower
from fastunlearn.load import master_params, open_checkpoint
from fastunlearn.worlds import bench as bw

WHOLE_MODEL_LR = 1e-3  # the projector methods use Config's lr (1e-2); a whole LLM needs a smaller one


class Bench:
    """One model and forget set, opened once: the prepared sets, probes' data and the original weights."""

    def __init__(self, w: bw.World, ckpt: Path, folders: Path, forget, views: int, extra_sets: dict | None = None,
                 scope: int = 0):
        # `scope`: the tower layers the jobs measured may edit (their largest --scope vision:K), run from the
        # cached input of the first of them; with the original tensors, the outputs are the model's own
        self.loaded = open_checkpoint(ckpt, torch.device("cpu"), scope=scope)
        everyone = range(len(w.people))
        others = [i for i in everyone if i not in forget]
        heldout_all = w.visual_items(folders / "heldout", everyone)
        sets = {
            "forget_visual": ev.with_options(w.visual_items(folders / "heldout", forget), heldout_all),
            "retain_visual": ev.with_options(w.visual_items(folders / "heldout", others), heldout_all),
            "forget_text": ev.with_options(w.text_items(forget), w.text_items(everyone), kind=w.question_kind),
            "all_text": ev.with_options(w.text_items(everyone), kind=w.question_kind),
        }
        for name, people in (extra_sets or {}).items():  # e.g. the look-alike twins (benchmarks/efficacy.py)
            sets[name] = ev.with_options(w.visual_items(folders / "heldout", people), heldout_all)
        self.sets = {name: ev.prepare(self.loaded, qs) for name, qs in sets.items()}
        forget_train = read_folder(folders / "forget")
        train = forget_train + read_folder(folders / "retain")
        train = first_question_only(train)  # one sample per picture for the probe
        self.probe_train = cache_samples(self.loaded, train, "probe", views)
        self.probe_train_subjects = [it.subject for it in train for _ in range(1 + views)]
        probe_test = first_question_only(heldout_all)
        self.probe_test = cache_samples(self.loaded, probe_test, "probe test")
        self.probe_test_subjects = [it.subject for it in probe_test]
        self.forgotten = {w.slug(i) for i in forget}
        self.relearn_train = cache_samples(self.loaded, forget_train, "relearn")
        drop_vision_tower(self.loaded)
        self.original = master_params(self.loaded)
        self.original_model = {n: p.detach().clone() for n, p in self.loaded.model.named_parameters()}

    def evaluate(self, params) -> dict:
        out = {name: ev.evaluate_set(self.loaded, params, prepared) for name, prepared in self.sets.items()}
        out["relearn"] = ev.relearn_steps(self.loaded, params, self.relearn_train, self.sets["forget_visual"].answer_batches)
        out["probe"] = ev.identity_probe(self.loaded, params, self.probe_train, self.probe_train_subjects,
                                         self.probe_test, self.probe_test_subjects, self.forgotten)
        return out

    def evaluate_result(self, result: dict) -> dict:
        params = dict(self.original)
        if "projector" in result:
            params.update({n: t.float() for n, t in result["projector"].items()})
        by_stored = {stored: name for name, stored in self.loaded.names.items()}
        params.update({by_stored[s]: t.float() for s, t in result.get("stored", {}).items()})
        with self.model_weights(result["model"]):
            return self.evaluate(params)

    @contextlib.contextmanager
    def model_weights(self, tensors: dict):
        """The model with `tensors` (a whole-model method's LLM, by parameter name) in place; restored after."""
        model_params = dict(self.loaded.model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                model_params[n].copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for n in tensors:
                    model_params[n].copy_(self.original_model[n])

