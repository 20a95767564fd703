"""How much room does the retain null space leave for forgetting? (issue 9, idea 2)

    python scripts/nullspace_room.py CKPT FORGET_DIR RETAIN_DIR [--energy 0.9 0.99 0.999 1.0] [--views 4]

For each energy threshold: the rank of the retain directions removed per projector linear layer
(of its augmented input dimension), and the fraction of the forget pictures' input energy that is
left in the null space (what a null-space-projected update can still act on), per layer.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastunlearn import nullspace  # noqa: E402
from fastunlearn.data import read_folder  # noqa: E402
from fastunlearn.guard import _unique_features  # noqa: E402
from fastunlearn.unlearn import cache_samples, master_params, open_checkpoint  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("forget", type=Path)
    ap.add_argument("retain", type=Path)
    ap.add_argument("--energy", nargs="+", type=float, default=[0.9, 0.99, 0.999, 0.9999, 1.0])
    ap.add_argument("--views", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = open_checkpoint(args.ckpt, torch.device("cpu"))
    family = loaded.adapter.family
    params = master_params(loaded)
    forget = [f.float() for f in _unique_features(cache_samples(loaded, read_folder(args.forget), "forget", args.views))]
    retain = [f.float() for f in _unique_features(cache_samples(loaded, read_folder(args.retain), "retain", args.views))]
    cov = nullspace.Covariance()
    for f in retain:
        cov.add(nullspace.layer_inputs(family, params, f))
    dims = [c.shape[0] for c in cov.c]
    print(f"{family}: {len(retain)} retain / {len(forget)} forget pictures+views; augmented input dims per layer {dims}")
    print("| energy | retain rank per layer | forget energy left per layer | retain energy left per layer |")
    print("|---|---|---|---|")
    for e in args.energy:
        proj, ranks = zip(*[nullspace.null_projector(c, e) for c in cov.c])
        free_f = nullspace.free_energy(family, params, list(proj), forget)
        free_r = nullspace.free_energy(family, params, list(proj), retain)
        print(f"| {e} | {list(ranks)} | {[round(x, 4) for x in free_f]} | {[round(x, 5) for x in free_r]} |")


if __name__ == "__main__":
    main()
