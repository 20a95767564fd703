"""Peak memory of `fastunlearn apply` against the size of the forget folder (demo LLaVA).

    python scripts/memory_bound.py --pictures 500 5000 [--workdir build/memory] [--feature-memory-mb 0]

For each size N: writes N pictures of the synthetic world (two people, N/2 each, one QA line a
picture) with fastunlearn.worlds.people.write_folder, runs `python -m fastunlearn apply ... --dry-run
--steps 2 --views 0` under /usr/bin/time -v in a fresh process, and prints its peak RSS and the
report's phase times. With --feature-memory-mb 0 (FASTUNLEARN_FEATURE_MEMORY_MB) every cached
feature goes to disk and is read back per batch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fastunlearn.worlds import people as world


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pictures", type=int, nargs="+", default=[500, 5000])
    ap.add_argument("--workdir", type=Path, default=Path("build/memory"))
    ap.add_argument("--feature-memory-mb", default=None)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = ap.parse_args()
    ckpt = world.demo_assets_dir() / "llava-people"
    for n in args.pictures:
        forget = args.workdir / f"forget-{n}"
        if not forget.exists():
            world.write_folder(forget, (1, 4), n // 2, seed=21)
        env = dict(os.environ)
        if args.feature_memory_mb is not None:
            env["FASTUNLEARN_FEATURE_MEMORY_MB"] = args.feature_memory_mb
        report = args.workdir / f"report-{n}.json"
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "fastunlearn", "apply", str(ckpt), str(forget),
               "--dry-run", "--report", str(report), "--steps", "2", "--views", "0", "--device", "cpu", *args.extra]
        t = time.time()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(run.stderr[-3000:])
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) / 1024
        phases = json.loads(report.read_text()).get("timing_s") or json.loads(report.read_text()).get("phases_s")
        print(json.dumps({"pictures": n, "peak_rss_mb": round(rss, 1), "wall_s": round(time.time() - t, 1),
                          "feature_memory_mb": args.feature_memory_mb, "phases_s": phases}), flush=True)


if __name__ == "__main__":
    main()
