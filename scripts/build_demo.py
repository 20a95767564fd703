"""Build, train and save the two demo checkpoints of fastunlearn's "people" world.

    python scripts/build_demo.py [--out fastunlearn/demo_assets] [--only llava|qwen2_vl]

Writes <out>/llava-people/, <out>/qwen2vl-people/ (Hugging Face checkpoint
folders, fp32 safetensors) and <out>/world.json, then prints greedy-generation
accuracy on 20 held-out pictures per person and on every text fact, for the
model in memory and again after reloading it from disk.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastunlearn.worlds import people as world
from fastunlearn.worlds import training  # noqa: E402

FOLDERS = {"llava": "llava-people", "qwen2_vl": "qwen2vl-people"}


def table(family, result):
    rows = [f"{family:9s} {'person':15s} {'visual':>7s} {'text':>6s}"]
    for name in result["visual"]:
        rows.append(f"{family:9s} {name:15s} {result['visual'][name]:7.0%} {result['text'][name]:6.0%}")
    v = sum(result["visual"].values()) / len(result["visual"])
    t = sum(result["text"].values()) / len(result["text"])
    rows.append(f"{family:9s} {'ALL':15s} {v:7.1%} {t:6.1%}")
    return "\n".join(rows)


def folder_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(world.demo_assets_dir()))
    ap.add_argument("--only", choices=training.FAMILIES)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = world.DEMO
    # One thread: as fast as two on a free machine, far faster when another job
    # holds a core, and the same thread count every time keeps runs reproducible.
    torch.set_num_threads(cfg["threads"])
    info_path = out / "world.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update(world.world_dict())
    info["demo"] = {k: v for k, v in cfg.items()}
    info["demo"].update(face_size=world.FACE_SIZE, llava_image_size=training.LLAVA_IMAGE_SIZE,
                        qwen2_vl_image_size=training.QWEN_IMAGE_SIZE,
                        checkpoints=FOLDERS, torch=torch.__version__)
    info.setdefault("results", {})
    ok = True
    for family in training.FAMILIES:
        if args.only and family != args.only:
            continue
        build = training.build_llava if family == "llava" else training.build_qwen2vl
        model, parts = build(seed=cfg["init_seed"])
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[{family}] {n_params} parameters", flush=True)
        t0 = time.time()
        training.train(model, family, parts, seed=cfg["train_seed"], steps=cfg["steps"][family],
                    lr=cfg["lr"][family], n_visual=cfg["n_visual"])
        seconds = time.time() - t0
        ckpt = out / FOLDERS[family]
        if ckpt.exists():
            shutil.rmtree(ckpt)
        training.save(model, family, parts, ckpt)
        result = training.evaluate(model, family, parts, seed=cfg["eval_seed"], n_per_person=20)
        reloaded, rparts = training.load(ckpt, family)
        result_reloaded = training.evaluate(reloaded, family, rparts, seed=cfg["eval_seed"], n_per_person=20)
        print(table(family, result))
        same = result == result_reloaded
        print(f"[{family}] training {seconds:.0f}s, checkpoint {folder_size(ckpt) / 1e6:.2f} MB, "
              f"reloaded from disk: {'same accuracy' if same else 'DIFFERENT: ' + str(result_reloaded)}")
        ok &= same and min(result["visual"].values()) >= 0.95 and min(result["text"].values()) == 1.0
        info["results"][family] = dict(parameters=n_params, train_seconds=round(seconds, 1),
                                       heldout_pictures_per_person=20, **result)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"total demo_assets size {folder_size(out) / 1e6:.2f} MB")
    if not ok:
        print("TARGETS MISSED (visual >= 95% per person, text 100%)")
        sys.exit(1)


if __name__ == "__main__":
    main()
