import sys; sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
import json, torch
import efficacy as E
from compare import Bench
from fastunlearn.config import Config
from fastunlearn.job import unlearn
world, model, draw = sys.argv[1], sys.argv[2], int(sys.argv[3]); K = int(sys.argv[4])
overrides = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
w = E.WORLDS[world]["make"](); ckpt = E.WORLDS[world]["checkpoints"][model]
forget = E.draw_forget(w, world, 4, draw)
folders = Path(f"/work/main/build/efficacy/{world}-forget4-seed{draw}")
b = Bench(w, ckpt, folders, forget, Config().views)
by = {s: n for n, s in b.loaded.names.items()}
before = E.measure(b, b.original, False)
runs = []
for js in range(K):
    res = unlearn(ckpt, folders / "forget", folders / "retain", replace(Config(), device="cpu", seed=js, **overrides), log=lambda *a: None)
    params = dict(b.original); params.update({by[c["name"]]: c["new"].float() for c in res["changes"]})
    runs.append(params)
    r = E.summarise(before, E.measure(b, params, False), False)
    print(f"job seed {js}: forget {r['forget_exact']:.0f}/{r['forget_mc']:.0f} retain drop {r['retain_drop']:.1f}")
avg = {n: sum(p[n] for p in runs) / K for n in runs[0]}
r = E.summarise(before, E.measure(b, avg, False), False)
print(f"average of {K}: forget {r['forget_exact']:.0f}/{r['forget_mc']:.0f} retain drop {r['retain_drop']:.1f}")
