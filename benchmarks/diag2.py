import sys; sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
from collections import defaultdict, Counter
from dataclasses import replace
from pathlib import Path
import json, torch
import efficacy as E
from fastunlearn import evaluate as ev
d = list(ev.with_options.__defaults__); d[1] = 20; ev.with_options.__defaults__ = tuple(d)
from compare import Bench
from fastunlearn.config import Config
from fastunlearn.forward import score
from fastunlearn.job import unlearn
world, model, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
w = E.WORLDS[world]["make"](); ckpt = E.WORLDS[world]["checkpoints"][model]
forget = E.draw_forget(w, world, 4, seed)
folders = Path(f"/work/main/build/efficacy/{world}-forget4-seed{seed}")
b = Bench(w, ckpt, folders, forget, Config().views)
res = unlearn(ckpt, folders / "forget", folders / "retain", replace(Config(), device="cpu", seed=seed, **overrides), log=lambda *a: None)
params = dict(b.original); by = {s: n for n, s in b.loaded.names.items()}
params.update({by[c["name"]]: c["new"].float() for c in res["changes"]})
fnames = {w.people[i]["name"] for i in forget}
for setname in ("forget_visual", "retain_visual"):
    prep = b.sets[setname]
    for label, p in (("before", b.original), ("after", params)):
        nll = score(b.loaded, p, prep.option_batches)["nll"].split([len(q.options) for q in prep.questions])
        conf = defaultdict(Counter)
        for q, n in zip(prep.questions, nll):
            if not q.question.startswith("Who"): continue
            conf[q.answer][q.options[int(torch.argmin(n))]] += 1
        print(setname, label)
        for a, c in conf.items():
            wrong = {k: v for k, v in c.items() if k != a}
            if wrong or setname == "forget_visual":
                print(f"   {a:18s} right {c[a]:2d}  wrong: " + ", ".join(f"{k}{'*' if k in fnames else ''}:{v}" for k, v in sorted(wrong.items(), key=lambda x: -x[1])))
