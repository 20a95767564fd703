"""Whole-process comparison on CPU: `fastunlearn apply` against the naive Hugging Face job
(benchmarks/baseline.py), on a CPU-scale LLaVA with real proportions, ratios from ONE run.

    python benchmarks/bench_e2e.py [--workdir build/e2e] [--steps 40 100] [--threads 2]
    python benchmarks/bench_e2e.py --curve 50 100 200 400 [--curve-steps 40]

Set-up (built once into --workdir): LLaVA-1.5 layout with random weights, CLIP tower 8 x 384 at
112 px (patch 14: 64 image tokens), Llama LLM 4 x 512 (MLP 1376), vocabulary 32,000, stored as
bf16 shards; forget folder 24 pictures (2 people x 12), retain 32 (4 people x 8), one QA line each.

Each variant runs as its own fresh process (`python -m fastunlearn apply ...` on a fresh copy of
the checkpoint, in place; `python benchmarks/baseline.py ...`, which ends with save_pretrained):
wall seconds of the whole process (imports included) and its peak RSS (ru_maxrss from wait4).
Variants: naive; fastunlearn defaults (`--mask fisher`, 4 augmented views) and `--mask none`;
all with `--batch-size 8`. `--curve` runs fastunlearn alone on forget folders of N pictures
(retain 32) and records seconds and peak memory against N.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORGET_PEOPLE, RETAIN_PEOPLE = (1, 4), (0, 2, 3, 5)


def build(workdir: Path) -> tuple[Path, Path, Path]:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_job import build_llava

    from fastunlearn.worlds import people as world

    ckpt, forget, retain = workdir / "llava-cpu", workdir / "forget", workdir / "retain"
    if not (ckpt / "config.json").exists():
        build_llava(ckpt, 112, 14, (384, 1536, 8, 6), (512, 1376, 4, 8), "cpu", torch.bfloat16, vocab=32000,
                    shard="40MB")
    if not forget.exists():
        world.write_folder(forget, FORGET_PEOPLE, 12, seed=101)
    if not retain.exists():
        world.write_folder(retain, RETAIN_PEOPLE, 8, seed=202)
    return ckpt, forget, retain


def forget_folder(workdir: Path, n: int) -> Path:
    from fastunlearn.worlds import people as world

    folder = workdir / f"forget-{n}"
    if not folder.exists():
        world.write_folder(folder, FORGET_PEOPLE, n // 2, seed=303)
    return folder


def run_process(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stderr) of one fresh process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024, stderr


def naive(ckpt, forget, retain, steps, workdir, env) -> dict:
    out = workdir / "naive-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(HERE / "baseline.py"), str(ckpt), str(forget), str(retain), "--steps", str(steps),
           "--batch-size", "8", "--out", str(out)]
    wall, peak, _ = run_process(cmd, env)
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "peak_mb": peak}


def fastunlearn(ckpt, forget, retain, steps, mask, workdir, env) -> dict:
    target = workdir / "ckpt-copy"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ckpt, target)
    report = workdir / "report.json"
    cmd = [sys.executable, "-m", "fastunlearn", "apply", str(target), str(forget), "--retain", str(retain),
           "--steps", str(steps), "--batch-size", "8", "--device", "cpu", "--mask", mask, "--report", str(report)]
    wall, peak, _ = run_process(cmd, env)
    phases = json.loads(report.read_text()).get("timing_s") or json.loads(report.read_text()).get("phases_s")
    shutil.rmtree(target, ignore_errors=True)
    return {"wall_s": wall, "peak_mb": peak, "phases_s": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("build/e2e"))
    ap.add_argument("--steps", type=int, nargs="+", default=[40, 100])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["naive", "fisher", "none"], nargs="+", default=["naive", "fisher", "none"])
    ap.add_argument("--curve", type=int, nargs="*", help="forget-folder sizes for the cost curve (fastunlearn only)")
    ap.add_argument("--curve-steps", type=int, default=40)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    ckpt, forget, retain = build(args.workdir)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()}, "
          f"torch threads {args.threads}, {os.cpu_count()} CPUs", flush=True)

    if args.curve:
        print("| forget pictures | samples (x5 views) | mask | wall s | peak RSS MB | phases s |")
        print("|---|---|---|---|---|---|")
        for n in args.curve:
            folder = forget_folder(args.workdir, n)
            for mask in ("fisher", "none"):
                if mask not in args.only:
                    continue
                r = fastunlearn(ckpt, folder, retain, args.curve_steps, mask, args.workdir, env)
                print(f"| {n} | {5 * n} | {mask} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} | {r['phases_s']} |", flush=True)
        return

    print("| steps | variant | wall s | peak RSS MB | speed-up | memory ratio | phases s |")
    print("|---|---|---|---|---|---|---|")
    for steps in args.steps:
        base = naive(ckpt, forget, retain, steps, args.workdir, env) if "naive" in args.only else None
        if base:
            print(f"| {steps} | naive HF job | {base['wall_s']:.1f} | {base['peak_mb']:.0f} | 1.00 | 1.00 | |", flush=True)
        for mask in ("fisher", "none"):
            if mask not in args.only:
                continue
            r = fastunlearn(ckpt, forget, retain, steps, mask, args.workdir, env)
            speed = f"{base['wall_s'] / r['wall_s']:.2f}" if base else "-"
            memory = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
            print(f"| {steps} | fastunlearn --mask {mask} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} | {speed} | {memory} "
                  f"| {r['phases_s']} |", flush=True)


if __name__ == "__main__":
    main()
