"""Build the clip-recipe worlds' checkpoints: a 6-layer vision tower pretrained contrastively on 1,702
unnamed synthetic people, frozen; then the projector, then projector + LLM, on the 20 named people
(fastunlearn/worlds/clip_recipe.py says how and why):

    python scripts/build_clip_world.py [--world clip-recipe|clip-lookalike] [--only llava|qwen2_vl]
                                       [--out build/<world>-world] [--towers build/clip-towers]

The pretrained towers are cached in <towers>/<family>.safetensors with <family>.json (steps, wall time,
loss, caption retrieval accuracy) and shared by both worlds; delete them to pretrain anew. Writes
<out>/llava-people20/, <out>/qwen2vl-people20/ and <out>/world.json with the held-out accuracy (10
pictures per person and question, every text fact), as scripts/build_bench_world.py does.
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
from safetensors.torch import load_file, save_file

from fastunlearn.safetensors_io import sha256_file  # noqa: E402
from fastunlearn.worlds import bench as bw  # noqa: E402
from fastunlearn.worlds import clip_recipe as cr  # noqa: E402
from fastunlearn.worlds import training  # noqa: E402

FOLDERS = {"llava": "llava-people20", "qwen2_vl": "qwen2vl-people20"}
WORLDS = {"clip-recipe": bw.bench_world, "clip-lookalike": bw.lookalike_world}
STEPS = {"llava": 1500, "qwen2_vl": 1500}  # projector + LLM, after cr.CLIP["projector_steps"] of the projector alone


def tower(family: str, towers: Path, steps: int) -> tuple[dict, dict]:
    """The pretrained tower's state (from the cache, or pretrained now) and what its pretraining measured."""
    weights, info_path = towers / f"{family}.safetensors", towers / f"{family}.json"
    if weights.exists() and info_path.exists() and json.loads(info_path.read_text())["steps"] == steps:
        return load_file(weights), json.loads(info_path.read_text())
    looks = cr.population()
    started = time.time()
    state, losses, pieces = cr.pretrain_tower(family, looks, steps=steps)
    seconds = time.time() - started
    named = [p["look"] for p in bw.bench_world().people]
    info = dict(family=family, steps=steps, batch=cr.CLIP["batch"], lr=cr.CLIP["lr"], population=len(looks),
                depth_pretrained=cr.TOWER_LAYERS + (family == "qwen2_vl"), depth_kept=cr.TOWER_LAYERS,
                pretrain_seconds=round(seconds, 1), loss_first=round(losses[0], 4),
                loss_last100=round(sum(losses[-100:]) / len(losses[-100:]), 4),
                retrieval_named=cr.retrieval_accuracy(family, pieces, named, seed=bw.BENCH["eval_seed"]),
                retrieval_population=cr.retrieval_accuracy(family, pieces, looks[:200], seed=bw.BENCH["eval_seed"]))
    towers.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in state.items()}, weights)
    info["weights_sha256"] = sha256_file(weights)[:16]
    print(f"[{family} tower] pretrained {steps} steps in {seconds:.0f}s: {info}", flush=True)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return state, info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=list(WORLDS), default="clip-recipe")
    ap.add_argument("--only", choices=list(FOLDERS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--towers", type=Path, default=Path("build/clip-towers"))
    ap.add_argument("--pretrain-steps", type=int, default=cr.CLIP["pretrain_steps"])
    ap.add_argument("--projector-steps", type=int, default=cr.CLIP["projector_steps"])
    ap.add_argument("--steps", type=int, help=f"projector + LLM steps (default {STEPS})")
    ap.add_argument("--tower-only", action="store_true", help="pretrain (or check) the towers and stop")
    args = ap.parse_args()
    args.out = args.out or Path(f"build/{args.world}-world")
    torch.set_num_threads(bw.BENCH["threads"])
    w = WORLDS[args.world]()
    for family, folder in FOLDERS.items():
        if args.only and family != args.only:
            continue
        state, tower_info = tower(family, args.towers, args.pretrain_steps)
        if args.tower_only:
            continue
        steps = args.steps or STEPS[family]
        started = time.time()
        model, parts, _ = cr.build_world(family, w, state, steps=steps, lr=bw.BENCH["lr"][family],
                                         projector_steps=args.projector_steps, n_visual=bw.BENCH["n_visual"])
        seconds = time.time() - started
        ckpt = args.out / folder
        if ckpt.exists():
            shutil.rmtree(ckpt)
        weights = training.save(model, family, parts, ckpt)
        result = bw.evaluate(model, family, parts, w, seed=bw.BENCH["eval_seed"])
        print(f"[{family}] {args.world}: projector {args.projector_steps} + projector/LLM {steps} steps in "
              f"{seconds:.0f}s; held-out accuracy: {result}; weights {weights}", flush=True)
        info_path = args.out / "world.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}  # the other family's build may have written
        info.update(world=args.world, bench=bw.BENCH, clip=cr.CLIP, people=[dict(p) for p in w.people],
                    torch=torch.__version__)
        info.setdefault("results", {})[family] = dict(projector_steps=args.projector_steps, steps=steps,
                                                      train_seconds=round(seconds, 1), weights_sha256=weights,
                                                      tower=tower_info, **result)
        info_path.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
