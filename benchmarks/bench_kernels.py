"""Kernel benchmarks: fastunlearn.kernels against torch eager and torch.compile, side by side.

    python -m pytest benchmarks/bench_kernels.py --benchmark-only [--benchmark-json=FILE]
    python benchmarks/bench_kernels.py --summary FILE      # the one-screen table from that JSON

CUDA: LLaVA-1.5-7B and Qwen2-VL-7B shapes in bf16, Triton kernels. CPU: the same
shapes scaled down, fp32; there "fastunlearn" is the torch-reference path (what the
job runs on a CPU), so it shows that path costs nothing over eager, not kernel speed.
Variants: fastunlearn, eager (what a user would write), compile (torch.compile of
eager; on CPU set FASTUNLEARN_BENCH_COMPILE=0 to skip it - inductor's C++ compile
costs ~10-20 s a case there). Passes: fwd, bwd (backward of a retained graph), fwd+bwd.
CPU timings use one thread (FASTUNLEARN_BENCH_CPU_THREADS to change it).

extra_info per case: median_ms (CUDA: CUDA-event median from triton.testing.do_bench,
L2 flushed; CPU: pytest-benchmark's median), tflops or gbps, frac_peak (of the
device's dense bf16 / HBM peak), peak_mem_mb (memory the call adds on top of its
inputs: torch.cuda.max_memory_allocated on CUDA, the VmHWM rise on Linux CPU).
FLOPs count only the work the math needs (linear_nll's backward is credited 2NVH
although the fused kernel recomputes the logits: 4NVH); bytes are the fewest moved.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
COMPILE = os.environ.get("FASTUNLEARN_BENCH_COMPILE", "1") == "1"
if not CUDA:
    # On a small shared CPU, oversubscribed OpenMP threads turn a 0.2 ms matmul into 16 ms
    # (measured on 2 shared cores); time single-threaded unless told otherwise.
    torch.set_num_threads(int(os.environ.get("FASTUNLEARN_BENCH_CPU_THREADS", "1")))
# The "bwd" pass re-runs backward on a retained graph; compiled backwards donate buffers by default.
import torch._functorch.config  # noqa: E402

torch._functorch.config.donated_buffer = False

# (name, tokens, in, hidden, out)
PROJECTOR_SHAPES = [("llava1.5-7b", 576, 1024, 4096, 4096), ("qwen2vl-7b", 1024, 5120, 5120, 3584)]
# (name, answer tokens, hidden, vocab)
NLL_SHAPES = [("llava1.5-7b", 300, 4096, 32064), ("qwen2vl-7b", 300, 3584, 152064)]
# (name, projector weight shape); grads fp32 (the job's master weights), ~30% of elements updated
ADAMW_SHAPES = [("llava1.5-7b.linear_2", (4096, 4096)), ("qwen2vl-7b.mlp.0", (5120, 5120))]
if not CUDA:  # CPU: scaled down so the file runs in about a minute
    PROJECTOR_SHAPES = [("llava1.5-7b/8", 72, 128, 512, 512), ("qwen2vl-7b/8", 128, 640, 640, 448)]
    NLL_SHAPES = [("llava1.5-7b/8", 38, 512, 4008), ("qwen2vl-7b/8", 38, 448, 19008)]
    ADAMW_SHAPES = [("llava1.5-7b.linear_2/8", (512, 512)), ("qwen2vl-7b.mlp.0/8", (640, 640))]

# Dense bf16 tensor-core TFLOP/s and HBM GB/s.
PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0)}


def device_peaks():
    if not CUDA:
        return None, None
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756.0, 2000.0
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return None, None


# ------------------------------------------------------------------------------------ measuring


def _vm_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_extra_mb(fn):
    """Memory one call of fn adds on top of what is already allocated."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _vm_kb("VmRSS")
        fn()
        return max(0.0, (_vm_kb("VmHWM") - base) / 1024)
    except OSError:
        fn()
        return None


def run(benchmark, fn, flops=None, nbytes=None, **info):
    """Time fn with pytest-benchmark; record speed, fraction of peak and added memory."""
    if CUDA:
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    for _ in range(2):  # warm-up: compile, autotune, allocator
        timed()
    peak_mb = peak_extra_mb(fn)
    benchmark.pedantic(timed, rounds=20 if CUDA else 15, iterations=1, warmup_rounds=1)
    if CUDA:
        import triton.testing

        median_ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    else:
        median_ms = benchmark.stats.stats.median * 1e3
    peak_tflops, peak_gbps = device_peaks()
    extra = dict(info, device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE),
                 median_ms=round(median_ms, 4),
                 peak_mem_mb=None if peak_mb is None else round(peak_mb, 1))
    if flops is not None:
        extra["tflops"] = round(flops / median_ms / 1e9, 2)
        extra["frac_peak"] = None if peak_tflops is None else round(extra["tflops"] / peak_tflops, 3)
    if nbytes is not None:
        extra["gbps"] = round(nbytes / median_ms / 1e6, 1)
        extra["frac_peak"] = None if peak_gbps is None else round(extra["gbps"] / peak_gbps, 3)
    benchmark.extra_info.update(extra)


def passes(benchmark, fwd, inputs, npass, flops_fwd, flops_bwd, **info):
    """Benchmark fwd / bwd / fwd+bwd of fwd(*inputs) -> tensor."""
    def zero_grads():
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None

    out = fwd(*inputs)
    dy = torch.randn_like(out)
    if npass == "fwd":
        fn, flops = (lambda: fwd(*inputs)), flops_fwd
    elif npass == "bwd":
        def fn():
            zero_grads()
            out.backward(dy, retain_graph=True)
        flops = flops_bwd
    else:
        def fn():
            zero_grads()
            fwd(*inputs).backward(dy)
        flops = flops_fwd + flops_bwd
    run(benchmark, fn, flops=flops, npass=npass, **info)


def variant_fn(variant, ours, eager):
    if variant == "fastunlearn":
        return ours
    if variant == "eager":
        return eager
    import pytest

    if not COMPILE:
        pytest.skip("FASTUNLEARN_BENCH_COMPILE=0")
    return torch.compile(eager)


# ------------------------------------------------------------------------------------ the cases

import pytest  # noqa: E402

from fastunlearn.kernels.linear_nll import linear_nll  # noqa: E402
from fastunlearn.kernels.masked_adamw import masked_adamw_, masked_adamw_ref_  # noqa: E402
from fastunlearn.kernels.projector import projector_mlp  # noqa: E402

VARIANTS = ["fastunlearn", "eager", "compile"]
PASSES = ["fwd", "bwd", "fwd+bwd"]


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    """CPU benches time the torch-reference path, never Triton's interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)


def projector_eager(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


@pytest.mark.parametrize("npass", PASSES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", PROJECTOR_SHAPES, ids=lambda s: s[0])
def test_projector_mlp(benchmark, shape, variant, npass):
    name, n, k, h, o = shape
    benchmark.group = f"projector_mlp {name} {npass}"

    def param(*size, scale=1.0):
        return (torch.randn(*size, device=DEVICE) * scale).to(DTYPE).requires_grad_()

    inputs = [param(n, k), param(h, k, scale=k ** -0.5), param(h), param(o, h, scale=h ** -0.5), param(o)]
    fwd = variant_fn(variant, projector_mlp, projector_eager)
    flops_fwd = 2 * n * k * h + 2 * n * h * o
    passes(benchmark, fwd, inputs, npass, flops_fwd, 2 * flops_fwd, kernel="projector_mlp",
           shape=f"{n}x{k}->{h}->{o}", variant=variant)


@pytest.mark.parametrize("shape", PROJECTOR_SHAPES, ids=lambda s: s[0])
def test_projector_cublas_gemms(benchmark, shape):
    """Speed of light for the projector forward: its two bare cuBLAS GEMMs (no bias, no GELU)."""
    name, n, k, h, o = shape
    benchmark.group = f"projector_mlp {name} fwd"
    x = torch.randn(n, k, device=DEVICE).to(DTYPE)
    w1 = torch.randn(h, k, device=DEVICE).to(DTYPE)
    w2 = torch.randn(o, h, device=DEVICE).to(DTYPE)
    run(benchmark, lambda: (x @ w1.T) @ w2.T, flops=2 * n * k * h + 2 * n * h * o,
        kernel="projector_mlp", shape=f"{n}x{k}->{h}->{o}", variant="cublas_gemms", npass="fwd")


def nll_eager(hidden, weight, targets):
    """What a user writes: full logits, fp32 cross-entropy."""
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")


@pytest.mark.parametrize("npass", PASSES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", NLL_SHAPES, ids=lambda s: s[0])
def test_linear_nll(benchmark, shape, variant, npass):
    name, n, h, v = shape
    benchmark.group = f"linear_nll {name} {npass}"
    hidden = torch.randn(n, h, device=DEVICE).to(DTYPE).requires_grad_()
    weight = (torch.randn(v, h, device=DEVICE) * h ** -0.5).to(DTYPE)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    fwd = variant_fn(variant, linear_nll, nll_eager)
    flops = 2 * n * v * h
    passes(benchmark, fwd, [hidden, weight, targets], npass, flops, flops, kernel="linear_nll",
           shape=f"{n}x{h}x{v}", variant=variant)


def adamw_mask_then_step(param, grad, mask, exp_avg, exp_avg_sq, **hyper):
    """The straightforward torch sequence: a full AdamW step, then restore the masked-off part."""
    return masked_adamw_ref_(param, grad, mask, exp_avg, exp_avg_sq, **hyper)


ADAMW_VARIANTS = ["fastunlearn", "eager", "compile", "torch_fused_unmasked"]


@pytest.mark.parametrize("variant", ADAMW_VARIANTS)
@pytest.mark.parametrize("shape", ADAMW_SHAPES, ids=lambda s: s[0])
def test_masked_adamw(benchmark, shape, variant):
    name, size = shape
    benchmark.group = f"masked_adamw {name} step"
    p = torch.randn(size, device=DEVICE)
    g = torch.randn(size, device=DEVICE)
    mask = torch.rand(size, device=DEVICE) < 0.3
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    hyper = dict(step=10, lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    # Fewest bytes: read p, m, v, g (fp32) and the mask; write p, m, v.
    nbytes = p.numel() * (4 * 4 + 1 + 3 * 4)
    info = dict(kernel="masked_adamw_", shape="x".join(map(str, size)), variant=variant, npass="step")
    if variant == "torch_fused_unmasked":  # floor: torch's fused AdamW kernel, no mask at all
        leaf = p.clone().requires_grad_()
        leaf.grad = g
        opt = torch.optim.AdamW([leaf], lr=1e-4, fused=True)
        run(benchmark, opt.step, nbytes=p.numel() * (4 * 4 + 3 * 4), **info)
        return
    if variant == "fastunlearn":
        fn = masked_adamw_
    elif variant == "eager":
        fn = adamw_mask_then_step
    else:
        if not COMPILE:
            pytest.skip("FASTUNLEARN_BENCH_COMPILE=0")
        fn = torch.compile(adamw_mask_then_step)
    run(benchmark, lambda: fn(p, g, mask, m, v, **hyper), nbytes=nbytes, **info)


# ---------------------------------------------------------------------------------- the summary


def summary(path):
    """One row per case: kernel, shape, variant, pass, median ms, ratio vs eager, speed, % peak, MB."""
    data = json.loads(Path(path).read_text())
    rows = [b["extra_info"] for b in data["benchmarks"] if "median_ms" in b.get("extra_info", {})]
    eager = {(r["kernel"], r["shape"], r["npass"]): r["median_ms"] for r in rows if r["variant"] == "eager"}
    table = [("kernel", "shape", "variant", "pass", "median ms", "x eager", "TFLOP/s|GB/s", "% peak", "peak MB")]
    for r in rows:
        base = eager.get((r["kernel"], r["shape"], r["npass"]))
        speed = f"{r['tflops']} TF" if "tflops" in r else f"{r['gbps']} GB/s"
        table.append((r["kernel"], r["shape"], r["variant"], r["npass"], f"{r['median_ms']:.3f}",
                      f"{base / r['median_ms']:.2f}" if base else "-", speed,
                      "-" if r.get("frac_peak") is None else f"{100 * r['frac_peak']:.1f}",
                      "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    device = rows[0]["device"] if rows else "?"
    lines = [f"kernel benchmarks on {device} (x eager > 1: faster than eager)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        print(summary(sys.argv[2]))
    else:
        sys.exit(f"usage: python {sys.argv[0]} --summary BENCH_JSON")
