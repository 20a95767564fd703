"""Can any edit of the projector single out the forgotten people on new pictures?

    python benchmarks/separability.py [--worlds bench lookalike] [--models llava qwen2_vl]
                                      [--forget 1 2 4] [--seeds 0 1 2 3 4] [--workdir build/efficacy]

(--worlds: any of benchmarks/efficacy.py's, e.g. clip-recipe / clip-lookalike, the worlds on a frozen
contrastively pretrained tower.)

The projector maps one unit at a time (LLaVA: one patch token; Qwen2-VL: one 2x2 merge group of
patches) and never sees the rest of the picture. An edit of it changes the LLM's input on a unit
of somebody else's picture exactly as much as on a forgotten person's unit that looks the same. So
the question is how well a function of one unit can tell the forgotten people from everyone else,
learned from what a job is given and judged on pictures it never saw.

Per draw of benchmarks/efficacy.py (its folders: 6 forget pictures a person, the thin retain folder
of 2 a person, 10 held-out pictures of everyone), a classifier with the projector's own shape
(Linear(unit, hidden) -> GELU -> Linear(hidden, 1), hidden = the projector's hidden size) is
trained on the units of the forget pictures and their views (1) against those of the retain
pictures and their views (0), class-balanced, to fit the training units. On the held-out pictures:

- `forgotten`: the share of a forgotten person's units it flags (mean over their pictures);
- `others (max)`: the same for the kept person it flags most; `others >= half`: how many kept
  people it flags at least half as often as the forgotten ones;
- `picture probe`: for contrast, a linear classifier on the mean of a picture's units (what a
  module that sees the whole picture could use): balanced accuracy on held-out pictures (the mean
  of its accuracy on the forgotten people's and on the kept people's; 50% = none).

An edit that erases the forgotten people from half their units also moves `others (max)` of the
units of the kept person flagged most.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from efficacy import WORLDS, draw_forget, write_folders  # noqa: E402
from fastunlearn.config import Config  # noqa: E402
from fastunlearn.data import read_folder  # noqa: E402
from fastunlearn.features import cache_samples  # noqa: E402
from fastunlearn.load import open_checkpoint  # noqa: E402


def picture_units(loaded, folder: Path, views: int) -> tuple[list[torch.Tensor], list[str]]:
    """Each picture's projector input units (one question per picture) and whose picture it is."""
    first = {}
    for it in read_folder(folder):
        first.setdefault(it.image, it)
    items = list(first.values())
    samples = cache_samples(loaded, items, folder.name, views, 0)
    width = loaded.model.config.vision_config.spatial_merge_size ** 2 if loaded.adapter.family == "qwen2_vl" else 1
    units = [s.features.to(torch.float32).reshape(-1, width * s.features.shape[-1]) for s in samples]
    return units, [it.subject for it in items for _ in range(1 + views)]


def fit(x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int = 1500) -> torch.nn.Module:
    torch.manual_seed(0)
    net = (torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
           if hidden else torch.nn.Linear(x.shape[1], 1))
    weight = (1 - y.mean()) / y.mean()  # class-balanced
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y, pos_weight=weight)
        loss.backward()
        opt.step()
    return net.requires_grad_(False)


def one_draw(loaded, folders: Path, hidden: int) -> dict:
    views = Config().views
    forget, forget_people = picture_units(loaded, folders / "forget", views)
    retain, _ = picture_units(loaded, folders / "retain", views)
    heldout, people = picture_units(loaded, folders / "heldout", 0)
    forgotten = set(forget_people)
    x = torch.cat(forget + retain)
    mean, std = x.mean(0), x.std(0) + 1e-6
    norm = lambda u: (u - mean) / std  # noqa: E731
    y = torch.cat([torch.ones(len(u)) for u in forget] + [torch.zeros(len(u)) for u in retain])
    units = fit(norm(x), y, hidden)
    pooled = fit(torch.stack([norm(u).mean(0) for u in forget + retain]),
                 torch.tensor([1.0] * len(forget) + [0.0] * len(retain)), 0)
    flagged: dict[str, list[float]] = {}
    hits = {True: [], False: []}  # the picture probe's answers on forgotten (True) and kept people's pictures
    for u, who in zip(heldout, people):
        flagged.setdefault(who, []).append(float((units(norm(u))[:, 0] > 0).float().mean()))
        hits[who in forgotten].append((float(pooled(norm(u).mean(0)[None])[0, 0]) > 0) == (who in forgotten))
    rate = {who: sum(v) / len(v) for who, v in flagged.items()}
    f = sum(rate[p] for p in forgotten) / len(forgotten)
    others = {p: r for p, r in rate.items() if p not in forgotten}
    top = max(others, key=others.get)
    return {"forgotten": f, "others_max": others[top], "others_max_who": top,
            "others_half": sum(r >= f / 2 for r in others.values()), "others": len(others),
            "train_fit": float(((units(norm(x))[:, 0] > 0).float() == y).float().mean()),
            "picture_probe": (sum(hits[True]) / len(hits[True]) + sum(hits[False]) / len(hits[False])) / 2}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", nargs="+", default=["bench"], choices=list(WORLDS))
    ap.add_argument("--models", nargs="+", default=["llava", "qwen2_vl"], choices=["llava", "qwen2_vl"])
    ap.add_argument("--forget", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--workdir", type=Path, default=Path("build/efficacy"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| world | model | forget | seed | units fitted (train) | forgotten flagged | others flagged (max) "
          "| others >= half | picture probe (held-out, balanced) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world_name in args.worlds:
        w = WORLDS[world_name]["make"]()
        for family in args.models:
            loaded = open_checkpoint(WORLDS[world_name]["checkpoints"][family], torch.device("cpu"))
            hidden = next(t for n, t in sorted(loaded.original.items()) if n.endswith("weight") and t.dim() == 2).shape[0]
            for n in args.forget:
                for seed in args.seeds:
                    folders = args.workdir / f"{world_name}-forget{n}-seed{seed}"
                    if not (folders / "heldout").exists():
                        write_folders(w, folders, draw_forget(w, world_name, n, seed), seed)
                    r = one_draw(loaded, folders, hidden)
                    print(f"| {world_name} | {family} | {n} | {seed} | {100 * r['train_fit']:.0f}% | "
                          f"{100 * r['forgotten']:.0f}% | {100 * r['others_max']:.0f}% ({r['others_max_who']}) | "
                          f"{r['others_half']} of {r['others']} | {100 * r['picture_probe']:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
