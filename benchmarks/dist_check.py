"""Issue 12 check: the same job on one process and under torchrun (N ranks, LLM replicated and
FSDP2-sharded); prints the max |projector difference| and each run's phase times.

    python benchmarks/dist_check.py --nproc 2 --device cpu      # gloo (what tests/test_distributed.py runs)
    python benchmarks/dist_check.py --nproc 2 --device cuda     # NCCL, one GPU per rank (needs >= 2 GPUs)

Demo LLaVA, two erasure requests (one person each, 3 pictures), 6 retain people x 2 pictures."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from fastunlearn.worlds import people as world


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fastunlearn-dist-check-"))
    world.write_folder(root / "forget-a", (1,), 3, seed=21)
    world.write_folder(root / "forget-b", (4,), 3, seed=22)
    world.write_folder(root / "retain", (0, 2, 3, 5, 6, 7), 2, seed=23)
    src = world.demo_assets_dir() / "llava-people"
    common = [str(src), str(root / "forget-a"), str(root / "forget-b"), "--retain", str(root / "retain"),
              "--steps", str(args.steps), "--views", "0", "--batch-size", "4", "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "FASTUNLEARN_DIST_TIMEOUT_S": "120"}
    runs = {"one process": [sys.executable, "-m", "fastunlearn", "apply"]}
    for mode, extra in (("replicated", []), ("sharded", ["--shard-llm"])):
        runs[f"torchrun x{args.nproc}, LLM {mode}"] = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc-per-node", str(args.nproc), "-m", "fastunlearn", "apply",
                                                        *extra]
    results, reference = {}, None
    for name, cmd in runs.items():
        out = root / name.replace(" ", "_").replace(",", "")
        t = time.perf_counter()
        p = subprocess.run([*cmd, *common, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            print(f"{name}: FAILED rc={p.returncode}\n{p.stderr[-3000:]}")
            sys.exit(1)
        report = json.loads((out / "unlearning_report.json").read_text())
        proj = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items() if "projector" in k}
        reference = reference or proj
        diff = max(float((proj[k] - reference[k]).abs().max()) for k in proj)
        results[name] = {"wall_s": round(wall, 2), "max_abs_diff_vs_one_process": diff, "phases_s": report["timing_s"],
                         "distributed": report["distributed"],
                         "forget_after": report["metrics"]["forget"]["after"]["greedy_accuracy"]}
        print(f"{name:<34} wall {wall:7.2f} s  job {report['timing_s']['total']:7.2f} s  "
              f"optimise {report['timing_s']['optimise']:6.2f} s  max |diff| {diff:.3g}  "
              f"forget acc after {results[name]['forget_after']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
