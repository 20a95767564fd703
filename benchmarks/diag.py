import sys; sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
import efficacy as E
from compare import Bench
from fastunlearn.config import Config
from fastunlearn.forward import score
from fastunlearn.job import unlearn
import json
world, model = sys.argv[1], sys.argv[2]
overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
w = E.WORLDS[world]["make"](); ckpt = E.WORLDS[world]["checkpoints"][model]
for seed in (0, 1):
    forget = E.draw_forget(w, world, 4, seed)
    folders = Path(f"/work/main/build/efficacy/{world}-forget4-seed{seed}")
    b = Bench(w, ckpt, folders, forget, Config().views)
    res = unlearn(ckpt, folders / "forget", folders / "retain", replace(Config(), device="cpu", seed=seed, **overrides), log=lambda *a: None)
    params = dict(b.original); by = {s: n for n, s in b.loaded.names.items()}
    params.update({by[c["name"]]: c["new"].float() for c in res["changes"]})
    prep = b.sets["retain_visual"]
    qs = prep.questions
    c0 = score(b.loaded, b.original, prep.answer_batches)["correct"]; c1 = score(b.loaded, params, prep.answer_batches)["correct"]
    per = defaultdict(lambda: [0, 0, 0])
    for q, x0, x1 in zip(qs, c0, c1):
        per[q.subject][0] += 1; per[q.subject][1] += int(x0); per[q.subject][2] += int(x1)
    looks = {w.slug(i): w.people[i]["look"] for i in range(len(w.people))}
    flooks = [w.people[i]["look"] for i in forget]
    rows = []
    for s, (n, a0, a1) in per.items():
        shared = max(sum(looks[s][k] == f[k] for k in f) for f in flooks)
        rows.append((shared, s, 100 * a0 / n, 100 * a1 / n))
    rows.sort(reverse=True)
    print(f"seed {seed} forget {[w.slug(i) for i in forget]}")
    for sh, s, a0, a1 in rows:
        print(f"  shared {sh}  {s:22s} {a0:5.0f} -> {a1:5.0f}  drop {a0 - a1:5.0f}")
    by_sh = defaultdict(list)
    for sh, s, a0, a1 in rows: by_sh[sh].append(a0 - a1)
    print("  mean drop by shared traits:", {k: round(sum(v) / len(v), 1) for k, v in sorted(by_sh.items())})
