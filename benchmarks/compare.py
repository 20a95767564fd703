"""Method comparison on the synthetic people worlds: fastunlearn's default against GA, GradDiff, NPO
without the mask, the MMUnlearner-style Fisher mask with GA, and the same methods updating the
whole model (LLM included). Same data, views, batch size and steps for every method.

    python benchmarks/compare.py --world bench [--models llava qwen2_vl] [--forget 1 2 4] [--steps 100]
                                 [--workdir build/compare] [--json FILE]
    python benchmarks/compare.py --world demo  [--forget 1 2]        # the shipped 8-person checkpoints

    python benchmarks/compare.py --protocol [benchmarks/efficacy.py's options]

`--protocol` runs the efficacy protocol instead (benchmarks/efficacy.py: every method of its VARIANTS,
projector-only and whole-model, worst case over 5 draws of the pictures, both worlds).

`--world bench` needs the 20-person checkpoints: python scripts/build_bench_world.py (build/bench-world).

Each method runs in a subprocess of its own: its wall time covers the whole job (load, feature
cache, mask, optimisation) and its peak memory is the subprocess's peak RSS (ru_maxrss, torch and
transformers imports included, the same for every method). The parent scores every result on the
same held-out pictures and text facts with fastunlearn.evaluate.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import WHOLE_MODEL_LR, Bench  # noqa: E402
from fastunlearn.worlds import bench as bw  # noqa: E402
from fastunlearn import evaluate as ev  # noqa: E402
from fastunlearn.worlds import people as world  # noqa: E402
from fastunlearn.config import Config  # noqa: E402
from fastunlearn.job import unlearn  # noqa: E402

WORLDS = {
    # checkpoint folders, and how many people -> which people to forget
    "demo": dict(make=bw.demo_world, checkpoints={"llava": world.demo_assets_dir() / "llava-people",
                                                  "qwen2_vl": world.demo_assets_dir() / "qwen2vl-people"},
                 forget={1: (1,), 2: (1, 4)}),  # 12.5% and 25% of 8
    "bench": dict(make=bw.bench_world, checkpoints={"llava": Path("build/bench-world/llava-people20"),
                                                    "qwen2_vl": Path("build/bench-world/qwen2vl-people20")},
                  forget={1: (3,), 2: (3, 11), 4: (3, 11, 14, 17)}),  # 5%, 10% and 20% of 20
}
PICTURES = {"forget": (6, 101), "retain": (6, 202), "heldout": (10, 303)}  # (per person, seed), as the demo
# (label, scope, method, mask, lr or None for the scope's default)
METHODS = [
    ("fastunlearn default (NPO + Fisher mask)", "projector", "npo", "fisher", None),
    ("NPO, no mask", "projector", "npo", "none", None),
    ("GA", "projector", "ga", "none", None),
    ("GradDiff", "projector", "graddiff", "none", None),
    ("Fisher mask + GA (MMUnlearner-style)", "projector", "ga", "fisher", None),
    ("NPO", "whole model", "npo", "none", None),
    ("NPO, lr 1e-4", "whole model", "npo", "none", 1e-4),
    ("GA", "whole model", "ga", "none", None),
    ("GradDiff", "whole model", "graddiff", "none", None),
    ("Fisher mask + GA (MMUnlearner-style)", "whole model", "ga", "fisher", None),
]


# ---------------------------------------------------------------- one method, in a subprocess


def child(spec_path: Path, out_path: Path) -> None:
    torch.set_num_threads(2)
    spec = json.loads(spec_path.read_text())
    cfg = Config(**spec["config"])
    started = time.perf_counter()
    if spec["scope"] == "projector":
        result = unlearn(Path(spec["ckpt"]), Path(spec["forget"]), Path(spec["retain"]), cfg, log=lambda *a: None)
        out = {"stored": {c["name"]: c["new"] for c in result["changes"]}, "model": {},
               "mask_density": result["mask_density"]}
    else:
        from full_model import run_full_model

        result = run_full_model(Path(spec["ckpt"]), Path(spec["forget"]), Path(spec["retain"]), cfg)
        out = {"projector": result["projector"], "model": result["model"], "mask_density": result["mask_density"]}
    out["wall_s"] = time.perf_counter() - started
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save(out, out_path)


def run_method(ckpt, folders, scope, cfg: Config, scratch: Path) -> dict:
    spec = scratch / "spec.json"
    out = scratch / "result.pt"
    spec.write_text(json.dumps({"ckpt": str(ckpt), "forget": str(folders / "forget"), "retain": str(folders / "retain"),
                                "scope": scope, "config": asdict(cfg)}))
    subprocess.run([sys.executable, __file__, "--child", str(spec), str(out)], check=True)
    return torch.load(out)


# ---------------------------------------------------------------- the evaluation sets


def write_folders(w: bw.World, root: Path, forget) -> None:
    others = [i for i in range(len(w.people)) if i not in forget]
    for name, people in (("forget", forget), ("retain", others), ("heldout", range(len(w.people)))):
        n, seed = PICTURES[name]
        w.write_folder(root / name, people, n, seed)


# ---------------------------------------------------------------- tables


COLUMNS = [
    ("forget MC", lambda m: pct(m["forget_visual"]["mc_accuracy"])),
    ("forget exact", lambda m: pct(m["forget_visual"]["exact_accuracy"])),
    ("forget gen", lambda m: pct(m["forget_visual"]["generation_contains_answer"])),
    ("retain MC", lambda m: pct(m["retain_visual"]["mc_accuracy"])),
    ("retain exact", lambda m: pct(m["retain_visual"]["exact_accuracy"])),
    ("forget text", lambda m: pct(m["forget_text"]["exact_accuracy"])),
    ("all text", lambda m: pct(m["all_text"]["exact_accuracy"])),
    ("text dNLL", lambda m: f"{m.get('text_nll_max_change', 0.0):.1e}" if m.get("text_nll_max_change") else "0"),
    ("relearn", lambda m: str(m["relearn"]["steps"]) if m["relearn"]["steps"] is not None else f">{m['relearn']['max_steps']}"),
    ("probe", lambda m: pct(m["probe"]["forgotten_accuracy"])),
    ("time s", lambda m: f"{m['wall_s']:.0f}" if "wall_s" in m else "-"),
    ("peak MB", lambda m: f"{m['peak_rss_mb']:.0f}" if "peak_rss_mb" in m else "-"),
]


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def table(title: str, rows: list[tuple[str, str, dict]]) -> str:
    head = ["method", "updates"] + [c for c, _ in COLUMNS]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, scope, m in rows:
        lines.append("| " + " | ".join([label, scope] + [f(m) for _, f in COLUMNS]) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--world", default="bench", choices=list(WORLDS))
    ap.add_argument("--models", nargs="+", default=["llava", "qwen2_vl"], choices=["llava", "qwen2_vl"])
    ap.add_argument("--forget", nargs="+", type=int, help="how many people to forget (default: every setting)")
    ap.add_argument("--steps", type=int, default=Config().steps)
    ap.add_argument("--methods", nargs="+", type=int, help="indices into METHODS (default: all)")
    ap.add_argument("--workdir", type=Path, default=Path("build/compare"))
    ap.add_argument("--json", type=Path, help="default: WORKDIR/results.json")
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    torch.set_num_threads(2)
    import transformers

    transformers.logging.set_verbosity_error()
    methods = [METHODS[i] for i in args.methods] if args.methods else METHODS
    spec = WORLDS[args.world]
    w = spec["make"]()
    n_people = len(w.people)
    for family in args.models:
        if not (spec["checkpoints"][family] / "model.safetensors").exists():
            sys.exit(f"{spec['checkpoints'][family]}: missing; build it with python scripts/build_bench_world.py")
    results, tables = [], []
    started = time.perf_counter()
    for family in args.models:
        ckpt = spec["checkpoints"][family]
        for n_forget in args.forget or list(spec["forget"]):
            forget = spec["forget"][n_forget]
            folders = args.workdir / f"{args.world}-forget{n_forget}"
            if not folders.exists():
                write_folders(w, folders, forget)
            bench = Bench(w, ckpt, folders, forget, Config().views)
            before = bench.evaluate(bench.original)
            never = ev.relearn_steps(bench.loaded, ev.fresh_projector(bench.original), bench.relearn_train,
                                     bench.sets["forget_visual"].answer_batches)
            rows = [("original model", "-", before)]
            for label, scope, method, mask, lr in methods:
                lr = lr or (Config().lr if scope == "projector" else WHOLE_MODEL_LR)
                cfg = Config(method=method, mask=mask, steps=args.steps, lr=lr, device="cpu")
                with tempfile.TemporaryDirectory() as scratch:
                    result = run_method(ckpt, folders, scope, cfg, Path(scratch))
                metrics = bench.evaluate_result(result)
                metrics.update(wall_s=result["wall_s"], peak_rss_mb=result["peak_rss_mb"],
                               mask_density=result["mask_density"], lr=lr)
                metrics["text_nll_max_change"] = max(ev.max_nll_change(before[s], metrics[s])
                                                     for s in ("forget_text", "all_text"))
                rows.append((label, scope, metrics))
                print(f"[{family} forget {n_forget}/{n_people}] {scope:11s} {label}: {time.perf_counter() - started:.0f}s",
                      flush=True)
            title = (f"{args.world} world, {family}, forget {n_forget} of {n_people} people ({n_forget / n_people:.1%}); "
                     f"relearn steps of a never-trained projector: "
                     f"{never['steps'] if never['steps'] is not None else '>40'}")
            tables.append(table(title, rows))
            print("\n" + tables[-1] + "\n", flush=True)
            results.append({"world": args.world, "model": family, "forget_people": n_forget, "never_trained_relearn": never,
                            "rows": [{"method": l, "updates": s, "metrics": m} for l, s, m in rows]})
    total = time.perf_counter() - started
    out = args.json or args.workdir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "whole_model_lr": WHOLE_MODEL_LR, "total_s": total,
                               "results": results}, indent=1) + "\n")
    print("\n\n".join(tables))
    print(f"\ntotal {total:.0f}s; JSON: {out}")


if __name__ == "__main__":
    if "--protocol" in sys.argv[1:]:  # the 5-draw efficacy protocol: benchmarks/efficacy.py, every method
        sys.argv.remove("--protocol")
        import efficacy

        efficacy.main()
    else:
        main()
