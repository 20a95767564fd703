#!/usr/bin/env bash
# GPU check: kernel correctness on CUDA tensors, then the kernel benchmarks, then (with 2 GPUs)
# the torchrun job on NCCL, then one summary table. Offline; installs nothing (the Python
# environment must already hold torch with CUDA, triton, pytest and pytest-benchmark). At most 8
# minutes on one GPU, 10.5 with two: each step has a timeout (150 + 210 + 120 [+ 150] s). The end-to-end step uses the LLaVA-1.5-7B shapes with 8 of the
# 32 LLM layers (FASTUNLEARN_BENCH_7B_LAYERS=32 for the full depth, when time allows).
#
#   OUT=/some/dir benchmarks/gpu_check.sh      # JSON + JUnit XML land in $OUT (else a temp dir)
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
#   FASTUNLEARN_BENCH_COMPILE=0 benchmarks/gpu_check.sh   # skip torch.compile baselines (faster)
# Time limits: tests 180 s, benchmarks 270 s (most of it is Triton autotuning and inductor).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
unset TRITON_INTERPRET   # compiled kernels on the GPU, never the interpreter

"$PY" - <<'EOF' || exit 1
import torch, triton
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
      f"CUDA {torch.version.cuda}", flush=True)
EOF

status=0

echo "== kernel correctness on CUDA (tests/test_kernels.py, tests/test_kernels_compile.py)"
timeout 150 "$PY" -m pytest tests/test_kernels.py tests/test_kernels_compile.py -q -p no:cacheprovider \
    --junitxml="$OUT/kernel_tests.xml" 2>&1 | tail -n 25
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -ne 0 ] && status=1

echo "== kernel benchmarks (benchmarks/bench_kernels.py)"
timeout 210 "$PY" -m pytest benchmarks/bench_kernels.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench_kernels.json" --benchmark-columns=median,iqr,rounds \
    > "$OUT/bench_kernels.log" 2>&1
bench_rc=$?
tail -n 5 "$OUT/bench_kernels.log"
[ "$bench_rc" -ne 0 ] && status=1

export FASTUNLEARN_BENCH_7B_LAYERS=${FASTUNLEARN_BENCH_7B_LAYERS:-8}
echo "== end-to-end job vs baseline, LLaVA-1.5-7B-sized (benchmarks/bench_job.py)"
timeout 120 "$PY" -m pytest benchmarks/bench_job.py --benchmark-only -q -p no:cacheprovider -k cuda \
    --benchmark-json="$OUT/bench_job.json" --benchmark-columns=median,rounds > "$OUT/bench_job.log" 2>&1
job_rc=$?
tail -n 8 "$OUT/bench_job.log"
[ "$job_rc" -ne 0 ] && status=1

# torchrun on NCCL, one GPU per rank: the same job on 1 process and on 2 ranks, the LLM
# replicated and FSDP2-sharded (--shard-llm); prints the max |projector difference| and phase times.
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
    echo "== torchrun x2 on NCCL vs one process (benchmarks/dist_check.py)"
    timeout 150 "$PY" benchmarks/dist_check.py --nproc 2 --device cuda --json "$OUT/dist_check.json" 2>&1 | tail -n 6
    dist_rc=${PIPESTATUS[0]}
    [ "$dist_rc" -ne 0 ] && status=1
else
    dist_rc=skipped
    echo "== torchrun on NCCL: skipped ($ngpu GPU; NCCL needs one GPU per rank, so 2 GPUs)"
fi

echo
echo "== summary (tests rc=$test_rc, kernel benchmarks rc=$bench_rc, job benchmark rc=$job_rc, torchrun rc=$dist_rc; files in $OUT)"
if [ -s "$OUT/bench_job.json" ]; then
    "$PY" - "$OUT/bench_job.json" <<'PYEOF'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    e = b["extra_info"]
    print(f"{b['name']:<45} {b['stats']['median']:8.2f} s  peak {e.get('peak_memory_mb', 0):9.0f} MB"
          f"  speed-up {e.get('speedup_vs_baseline', '-')}  memory ratio {e.get('memory_ratio_vs_baseline', '-')}")
PYEOF
fi
if [ -s "$OUT/bench_kernels.json" ]; then
    "$PY" benchmarks/bench_kernels.py --summary "$OUT/bench_kernels.json" | tee "$OUT/summary.txt"
fi
exit $status
