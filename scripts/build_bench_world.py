"""Build, train and save the benchmark world's checkpoints (20 synthetic people, two visual question
types), with fixed seeds:

    python scripts/build_bench_world.py [--out build/bench-world] [--only llava|qwen2_vl]

Writes <out>/llava-people20/ and <out>/qwen2vl-people20/ (Hugging Face checkpoint folders, fp32
safetensors, about 1 MB each) and <out>/world.json, and prints greedy accuracy on 10 held-out
pictures per person and question and on every text fact. build/ is ignored by git: rebuild
rather than commit (about 3-6 minutes per model on 2 CPU cores).
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastunlearn.worlds import same_bits_on_any_x86  # noqa: E402

same_bits_on_any_x86()
import torch  # noqa: E402

from fastunlearn.worlds import bench as bw  # noqa: E402
from fastunlearn.worlds import training  # noqa: E402

FOLDERS = {"llava": "llava-people20", "qwen2_vl": "qwen2vl-people20"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", choices=list(FOLDERS))
    ap.add_argument("--steps", type=int, help="override the training steps (for a quick trial)")
    ap.add_argument("--world", choices=["bench", "lookalike"], default="bench",
                    help="lookalike: the variant with look-alike pairs (bench_world.lookalike_world); "
                         "default --out build/lookalike-world")
    ap.add_argument("--vision-layers", type=int, help="the vision tower's depth (default: the builder's, 2)")
    args = ap.parse_args()
    args.out = args.out or Path(f"build/{args.world}-world")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(bw.BENCH["threads"])
    w = bw.bench_world() if args.world == "bench" else bw.lookalike_world()
    info_path = args.out / "world.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update(world=args.world, bench=bw.BENCH, people=[dict(p) for p in w.people], torch=torch.__version__)
    info.setdefault("results", {})
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    for family, folder in FOLDERS.items():
        if args.only and family != args.only:
            continue
        depth = {"llava": "vision_layers", "qwen2_vl": "vision_depth"}[family]
        model, parts = bw.build(family, w, **({depth: args.vision_layers} if args.vision_layers else {}))
        steps = args.steps or bw.BENCH["lookalike_steps" if args.world == "lookalike" else "steps"][family]
        started = time.time()
        bw.train(model, family, parts, w, seed=bw.BENCH["train_seed"], steps=steps, lr=bw.BENCH["lr"][family],
                 n_visual=bw.BENCH["n_visual"])
        seconds = time.time() - started
        ckpt = args.out / folder
        if ckpt.exists():
            shutil.rmtree(ckpt)
        weights = training.save(model, family, parts, ckpt)
        result = bw.evaluate(model, family, parts, w, seed=bw.BENCH["eval_seed"])
        print(f"[{family}] trained {steps} steps in {seconds:.0f}s; held-out accuracy: {result}; weights {weights}",
              flush=True)
        latest = json.loads(info_path.read_text()) if info_path.exists() else info  # another build may have written
        info["results"] = {**info["results"], **latest.get("results", {}),
                           family: dict(steps=steps, train_seconds=round(seconds, 1), weights_sha256=weights, **result)}
        info_path.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
