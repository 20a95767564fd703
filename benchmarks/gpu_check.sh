#!/usr/bin/env bash
# GPU check: kernel correctness on CUDA tensors, then the kernel benchmarks, then one
# summary table. Offline; installs nothing (the Python environment must already hold
# torch with CUDA, triton, pytest and pytest-benchmark). Well under 8 minutes on an H100/H200.
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
timeout 180 "$PY" -m pytest tests/test_kernels.py tests/test_kernels_compile.py -q -p no:cacheprovider \
    --junitxml="$OUT/kernel_tests.xml" 2>&1 | tail -n 25
test_rc=${PIPESTATUS[0]}
[ "$test_rc" -ne 0 ] && status=1

echo "== kernel benchmarks (benchmarks/bench_kernels.py)"
timeout 270 "$PY" -m pytest benchmarks/bench_kernels.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench_kernels.json" --benchmark-columns=median,iqr,rounds \
    > "$OUT/bench_kernels.log" 2>&1
bench_rc=$?
tail -n 5 "$OUT/bench_kernels.log"
[ "$bench_rc" -ne 0 ] && status=1

# ==== END-TO-END JOB BENCHMARK (lead: add the bench_job.py run here; keep the summary last) ====

echo
echo "== summary (tests rc=$test_rc, benchmarks rc=$bench_rc; files in $OUT)"
if [ -s "$OUT/bench_kernels.json" ]; then
    "$PY" benchmarks/bench_kernels.py --summary "$OUT/bench_kernels.json" | tee "$OUT/summary.txt"
fi
exit $status
