"""Dev harness for issue 9: run efficacy settings with overrides of module constants and Config."""
import sys, json, argparse, os
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
import efficacy as E
from fastunlearn.worlds import bench as bw
if os.environ.get('VBLOCK'):
    sys.path.insert(0, '/work/notes'); import vblock; vblock.install()

ap = argparse.ArgumentParser()
ap.add_argument("--world", default="bench"); ap.add_argument("--model", default="llava")
ap.add_argument("--forget", type=int, nargs="+", default=[4]); ap.add_argument("--seeds", type=int, nargs="+", default=[0])
ap.add_argument("--retain-pictures", type=int, default=2)
ap.add_argument("--variant", action="append", nargs="*", default=[], help="NAME KEY=VALUE ...")
a = ap.parse_args()
E.RETAIN_PICTURES = a.retain_pictures
variants = {}
for v in a.variant:
    name, *kv = v
    d = {}
    for s in kv:
        k, val = s.split("=", 1)
        try: val = json.loads(val)
        except Exception: pass
        d[k] = val
    variants[name] = d
_un = E.unlearn
def unlearn_logged(*a, **k):
    r = _un(*a, **k)
    m = r["metrics"]; c = r["check"]
    print(f"   job: train-retain {m['retain']['before']['greedy_accuracy']:.3f}->{m['retain']['after']['greedy_accuracy']:.3f}"
          f" train-forget {m['forget']['before']['greedy_accuracy']:.3f}->{m['forget']['after']['greedy_accuracy']:.3f}"
          f" check: forget {c['forget_after']:.3f} retain {c['retain_before']:.3f}->{c['retain_after']:.3f}")
    return r
E.unlearn = unlearn_logged
w = E.WORLDS[a.world]["make"]()
ckpt = E.WORLDS[a.world]["checkpoints"][a.model]
wd = Path(os.environ.get("WD") or (f"/work/main/build/efficacy" + ("" if a.retain_pictures == 2 else f"-r{a.retain_pictures}")))
for n in a.forget:
    for s in a.seeds:
        E.run_setting(w, a.world, a.model, ckpt, n, s, variants, wd, False, print)
