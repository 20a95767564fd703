"""fastunlearn.kernels against fp64 torch references.

Where to run: with CUDA the Triton kernels run compiled on cuda tensors;
without, they run on CPU tensors through Triton's interpreter. triton.jit
picks compiled vs interpreted when a function is defined - triton's own
``tl.*`` helpers when triton is imported - so TRITON_INTERPRET=1 must be set
before triton is first imported. CI (.ci/run) sets it for the whole run.
Run alone, this module sets it itself (and sets it back after importing the
kernels, so other test modules keep the torch-reference CPU path); if
triton was imported first without it and there is no GPU, every test here
fails with that reason (the rest of the suite still runs).

Every test here can fail; none is skipped on CPU.
"""

import ctypes
import glob
import os
import sys
import zlib

import torch

ON_CUDA = torch.cuda.is_available()
_SAVED_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not ON_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # run alone: define the kernels under the interpreter

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastunlearn.kernels.dispatch import DEFINED_INTERPRETED, use_triton  # noqa: E402
from fastunlearn.kernels.linear_nll import linear_nll, linear_nll_ref  # noqa: E402
from fastunlearn.kernels.masked_adamw import masked_adamw_, masked_adamw_ref_  # noqa: E402
from fastunlearn.kernels.projector import projector_mlp, projector_mlp_ref  # noqa: E402

CANNOT_RUN = None  # why the kernels cannot run in this process; every test then fails with it
if not ON_CUDA and not DEFINED_INTERPRETED:
    CANNOT_RUN = ("the Triton kernels were defined without TRITON_INTERPRET=1 and there is no GPU, so "
                  "they cannot run in this process (tests/conftest.py arranges it; was triton imported first?)")
if not ON_CUDA:
    if _SAVED_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED_INTERPRET


def _numpy_blas_single_thread():
    """The interpreter's tl.dot is numpy's matmul; numpy's OpenBLAS threads fight
    over a small shared CPU (a 64x256x64 dot took 15 ms instead of 0.03 ms on
    2 cores). Same effect as OPENBLAS_NUM_THREADS=1 set before numpy loads."""
    import numpy

    libs = os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs")
    for path in glob.glob(os.path.join(libs, "*openblas*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(1)
                return


if not ON_CUDA:
    _numpy_blas_single_thread()

DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture(autouse=True)
def _seed_and_interpret(request, monkeypatch):
    """Fresh, per-test seed; the Triton path on (interpreter on CPU)."""
    if CANNOT_RUN:
        pytest.fail(CANNOT_RUN, pytrace=False)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _kernel_path(t):
    assert use_triton(t), "this test must exercise the Triton kernel, not the torch reference"


def assert_close(actual, expected, dtype, what, fp32_atol=1e-5, fp32_rtol=5e-4):
    """fp32: element-wise atol/rtol. fp16/bf16: relative error of the whole tensor."""
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=fp32_atol, rtol=fp32_rtol, msg=what)
    else:
        rel = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        assert rel < (5e-3 if dtype == torch.float16 else 1.6e-2), f"{what}: relative error {rel:.2e}"


def _as_fp64_leaf(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


# ---------------------------------------------------------------------------------------- dispatch


def test_use_triton_dispatch(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(cpu)
    assert not use_triton(cpu.double()), "fp64 is reference-only"
    if ON_CUDA:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert use_triton(cpu.cuda())


# --------------------------------------------------------------------------------------- projector

# (tokens, in, hidden, out): ragged everywhere; then crossing tile and K-loop boundaries.
PROJ_SHAPES = [(47, 31, 53, 29), (130, 300, 140, 70)]
if ON_CUDA:
    PROJ_SHAPES.append((576, 1024, 4096, 4096))  # LLaVA-1.5 projector, GPU tile configs


def _linear_init(out_f, in_f, dtype, bias=True):
    bound = in_f ** -0.5
    w = (torch.rand(out_f, in_f, device=DEVICE) * 2 - 1) * bound
    b = (torch.rand(out_f, device=DEVICE) * 2 - 1) * bound if bias else None
    w = w.to(dtype).requires_grad_()
    return w, (b.to(dtype).requires_grad_() if bias else None)


def _projector_case(dtype, shape, variant, lead=(2,)):
    n, k, h, o = shape
    x = torch.randn(*lead, n, k, device=DEVICE).to(dtype).requires_grad_()
    bias = not variant.endswith("nobias")
    w1, b1 = _linear_init(h, k, dtype, bias)
    w2, b2 = (None, None) if variant.startswith("linear") else _linear_init(o, h, dtype, bias)
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("variant", ["mlp", "mlp_nobias", "linear", "linear_nobias"])
@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_projector_forward_backward_vs_fp64(dtype, shape, variant):
    args = _projector_case(dtype, shape, variant)
    _kernel_path(args[0])
    y = projector_mlp(*args)
    dy = torch.randn_like(y)
    y.backward(dy)

    ref_args = [_as_fp64_leaf(a) for a in args]
    y_ref = projector_mlp_ref(*ref_args)
    y_ref.backward(dy.double())

    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "y")
    for name, a, r in zip(["x", "w1", "b1", "w2", "b2"], args, ref_args):
        if a is not None:
            assert_close(a.grad, r.grad, dtype, f"d{name}")


def test_projector_frozen_weights_and_frozen_input():
    x, w1, b1, w2, b2 = _projector_case(torch.float32, PROJ_SHAPES[0], "mlp", lead=())
    for t in (w1, b1, w2, b2):
        t.requires_grad_(False)
    projector_mlp(x, w1, b1, w2, b2).sum().backward()
    xr = _as_fp64_leaf(x)
    projector_mlp_ref(xr, w1.double(), b1.double(), w2.double(), b2.double()).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, "dx")
    assert w1.grad is None and w2.grad is None

    x.requires_grad_(False)
    x.grad = None
    for t in (w1, b1, w2, b2):
        t.requires_grad_(True)
    projector_mlp(x, w1, b1, w2, b2).sum().backward()
    refs = [_as_fp64_leaf(t) for t in (w1, b1, w2, b2)]
    projector_mlp_ref(x.double(), *refs).sum().backward()
    for t, r, name in zip((w1, b1, w2, b2), refs, ["w1", "b1", "w2", "b2"]):
        assert_close(t.grad, r.grad, torch.float32, f"d{name}")
    assert x.grad is None


def test_projector_rejects_mixed_dtypes():
    x, w1, b1, w2, b2 = _projector_case(torch.float32, PROJ_SHAPES[0], "mlp")
    with pytest.raises(ValueError, match="dtype"):
        projector_mlp(x.bfloat16(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="dtype"):
        projector_mlp(x, w1, b1, w2.half(), b2)


def test_projector_cpu_reference_path(monkeypatch):
    """TRITON_INTERPRET unset: CPU tensors take the torch reference, which matches fp64."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for variant in ["mlp", "linear"]:
        args = [None if a is None else a.cpu() for a in _projector_case(torch.float32, PROJ_SHAPES[0], variant)]
        args = [None if a is None else a.detach().requires_grad_() for a in args]
        assert not use_triton(args[0])
        y = projector_mlp(*args)
        assert torch.equal(y, projector_mlp_ref(*args))
        y.sum().backward()
        ref_args = [_as_fp64_leaf(a) for a in args]
        x64, w164, b164, w264, b264 = ref_args
        pre = x64 @ w164.T + b164
        y64 = pre if variant == "linear" else F.gelu(pre) @ w264.T + b264
        y64.sum().backward()
        assert_close(y, y64, torch.float32, "y")
        for a, r in zip(args, ref_args):
            if a is not None:
                assert_close(a.grad, r.grad, torch.float32, "grad")


# -------------------------------------------------------------------------------------- linear_nll

# (tokens, hidden, vocab): ragged single block; then several vocab splits of several blocks,
# several backward chunks and several hidden steps (on the interpreter's block sizes).
NLL_SHAPES = [(47, 31, 123), (40, 100, 3000)]
if ON_CUDA:
    NLL_SHAPES.append((300, 4096, 32064))  # LLaVA-1.5 answer tokens, GPU tile configs


def _nll_case(dtype, n, h, v, scale=1.0, ignore_frac=0.3, lead=None):
    hidden = (torch.randn(n, h, device=DEVICE) * scale).to(dtype)
    weight = (torch.randn(v, h, device=DEVICE) * (3 / h ** 0.5)).to(dtype)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    targets[0], targets[-1] = 0, v - 1  # both vocab edges
    targets[torch.rand(n, device=DEVICE) < ignore_frac] = -100
    targets[1] = -100
    if lead is not None:
        hidden, targets = hidden.reshape(*lead, h), targets.reshape(lead)
    return hidden.requires_grad_(), weight, targets


def _nll_vs_fp64(hidden, weight, targets, dtype, fp32_atol=1e-5, fp32_rtol=5e-4):
    _kernel_path(hidden)
    nll = linear_nll(hidden, weight, targets)
    g = torch.rand_like(nll) + 0.5  # per-token incoming gradients, as the NPO weights are
    (nll * g).sum().backward()
    h64 = _as_fp64_leaf(hidden)
    nll64 = linear_nll_ref(h64, weight.double(), targets)
    (nll64 * g.double()).sum().backward()
    assert nll.dtype == torch.float32 and nll.shape == targets.shape
    ignored = targets == -100
    assert torch.all(nll[ignored] == 0), "ignored tokens must have exactly zero loss"
    assert torch.all(hidden.grad[ignored] == 0), "ignored tokens must have exactly zero gradient"
    # the loss is computed in fp32 from the given inputs, for every input dtype
    assert_close(nll, nll64, torch.float32, "nll", fp32_atol, fp32_rtol)
    assert_close(hidden.grad, h64.grad, dtype, "d hidden", fp32_atol, fp32_rtol)
    return nll, hidden.grad


@pytest.mark.parametrize("shape", NLL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_nll_forward_backward_vs_fp64(dtype, shape):
    tol = {} if shape[1] < 1000 else {"fp32_atol": 5e-5}  # H=4096 dot products
    _nll_vs_fp64(*_nll_case(dtype, *shape), dtype, **tol)


def test_linear_nll_qwen_vocab():
    """V = 152064 (Qwen2-VL): many splits and chunks, last ones ragged."""
    h = 64 if ON_CUDA else 16
    _nll_vs_fp64(*_nll_case(torch.float32, 9, h, 152064, ignore_frac=0.0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_nll_large_logits(dtype):
    """Hidden scaled by 100: logits in the thousands, no overflow, still exact."""
    hidden, weight, targets = _nll_case(dtype, 47, 31, 3000, scale=100.0)
    nll, grad = _nll_vs_fp64(hidden, weight, targets, dtype, fp32_atol=1e-3, fp32_rtol=1e-4)
    assert nll.max() > 100, "the case must really have large logits"


def test_linear_nll_all_ignored():
    hidden, weight, targets = _nll_case(torch.float32, 47, 31, 123)
    targets.fill_(-100)
    nll = linear_nll(hidden, weight, targets)
    nll.sum().backward()
    assert torch.equal(nll, torch.zeros_like(nll))
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_linear_nll_leading_dims_custom_ignore_index_frozen_weight():
    hidden, weight, targets = _nll_case(torch.float32, 48, 31, 123, lead=(4, 12))
    targets[targets == -100] = 7  # 7 is now a real target; use another ignore index
    targets[0, :3] = 122
    weight.requires_grad_()
    nll = linear_nll(hidden, weight, targets, ignore_index=122)
    nll.sum().backward()
    assert nll.shape == (4, 12) and torch.all(nll[0, :3] == 0)
    assert weight.grad is None, "the lm_head is frozen: its gradient is never computed"
    h64 = _as_fp64_leaf(hidden)
    nll64 = linear_nll_ref(h64, weight.double(), targets, ignore_index=122)
    nll64.sum().backward()
    assert_close(nll, nll64, torch.float32, "nll")
    assert_close(hidden.grad, h64.grad, torch.float32, "d hidden")


def test_linear_nll_rejects_bad_inputs():
    hidden, weight, targets = _nll_case(torch.float32, 8, 31, 123)
    with pytest.raises(ValueError, match="dtype"):
        linear_nll(hidden, weight.half(), targets)
    with pytest.raises(ValueError, match="leading dims"):
        linear_nll(hidden, weight, targets[:5])
    if not ON_CUDA:
        bad = targets.clone()
        bad[2] = 123
        with pytest.raises(ValueError, match="targets outside"):
            linear_nll(hidden, weight, bad)


def test_linear_nll_cpu_reference_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, targets = [t.cpu() for t in _nll_case(torch.float32, 47, 31, 300)]
    hidden = hidden.detach().requires_grad_()
    assert not use_triton(hidden)
    nll = linear_nll(hidden, weight, targets)
    assert torch.equal(nll, linear_nll_ref(hidden, weight, targets))
    nll.sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    logits = h64 @ weight.double().T
    keep = targets != -100
    nll64 = torch.zeros(47, dtype=torch.float64)
    nll64[keep] = torch.logsumexp(logits[keep], 1) - logits[keep, targets[keep]]
    nll64.sum().backward()
    assert_close(nll, nll64, torch.float32, "nll")
    assert_close(hidden.grad, h64.grad, torch.float32, "d hidden")


# ------------------------------------------------------------------------------------ masked AdamW

HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
ADAM_SHAPE = (331, 213)  # 70503 elements: ragged against every block size, > 1 program


def _adam_state(shape=ADAM_SHAPE, device=DEVICE):
    p = torch.randn(shape, device=device)
    return p, torch.randn(shape, device=device) * 0.1, torch.rand(shape, device=device) * 0.01


def _bits(t):
    return t.view(torch.int32)


@pytest.mark.parametrize("use_mask", [True, False], ids=["full_mask", "mask_none"])
def test_masked_adamw_matches_torch_adamw(use_mask):
    p = torch.randn(ADAM_SHAPE, device=DEVICE)
    _kernel_path(p)
    ref = p.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    mask = torch.ones_like(p, dtype=torch.bool) if use_mask else None
    for step in range(1, 6):
        g = torch.randn_like(p)
        masked_adamw_(p, g, mask, m, v, step=step, **HYPER)
        ref.grad = g.clone()
        opt.step()
        state = opt.state[ref]
        torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m, state["exp_avg"], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(v, state["exp_avg_sq"], atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("grad_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mask_kind", ["empty", "full", "random"])
def test_masked_adamw_masks_leave_untouched_bits(mask_kind, grad_dtype):
    p, m, v = _adam_state()
    _kernel_path(p)
    g = torch.randn_like(p).to(grad_dtype)
    mask = {"empty": torch.zeros_like(p, dtype=torch.bool), "full": torch.ones_like(p, dtype=torch.bool),
            "random": torch.rand_like(p) < 0.3}[mask_kind]
    before = [t.clone() for t in (p, m, v)]
    expected = [t.clone() for t in (p, m, v)]
    masked_adamw_ref_(expected[0], g, mask, expected[1], expected[2], step=7, **HYPER)
    masked_adamw_(p, g, mask, m, v, step=7, **HYPER)
    for name, new, old, exp in zip(["param", "exp_avg", "exp_avg_sq"], (p, m, v), before, expected):
        assert torch.equal(_bits(new)[~mask], _bits(old)[~mask]), f"{name}: unmasked bits changed"
        torch.testing.assert_close(new[mask], exp[mask], atol=1e-7, rtol=1e-5, msg=name)
        if mask_kind != "empty":
            assert not torch.equal(new[mask], old[mask]), f"{name}: masked elements were not updated"


def test_masked_adamw_rejects_bad_inputs():
    p, m, v = _adam_state((10, 10))
    g = torch.randn_like(p)
    mask = torch.ones_like(p, dtype=torch.bool)
    with pytest.raises(ValueError, match="float32"):
        masked_adamw_(p.half(), g, mask, m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match="mask"):
        masked_adamw_(p, g, mask.float(), m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match="step"):
        masked_adamw_(p, g, mask, m, v, step=0, **HYPER)
    with pytest.raises(ValueError, match="contiguous"):
        masked_adamw_(p.t(), g.t(), mask.t(), m.t(), v.t(), step=1, **HYPER)


def test_masked_adamw_cpu_reference_path(monkeypatch):
    """The torch reference is bit-identical to torch.optim.AdamW where the mask is
    True, and never changes a bit where it is False."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = torch.randn(ADAM_SHAPE)
    assert not use_triton(p)
    ref = p.clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], foreach=False)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    full = torch.ones_like(p, dtype=torch.bool)
    for step in range(1, 4):
        g = torch.randn_like(p)
        masked_adamw_(p, g, full, m, v, step=step, **HYPER)
        ref.grad = g.clone()
        opt.step()
        assert torch.equal(p, ref.detach()) and torch.equal(m, opt.state[ref]["exp_avg"])
        assert torch.equal(v, opt.state[ref]["exp_avg_sq"])
    mask = torch.rand_like(p) < 0.5
    before = [t.clone() for t in (p, m, v)]
    masked_adamw_(p, torch.randn_like(p).bfloat16(), mask, m, v, step=4, **HYPER)
    for new, old in zip((p, m, v), before):
        assert torch.equal(_bits(new)[~mask], _bits(old)[~mask])
        assert not torch.equal(new[mask], old[mask])


def test_each_kernel_module_holds_its_kernel_beside_its_reference():
    import importlib

    for module, names in {"dispatch": ["use_triton"], "projector": ["projector_mlp", "projector_mlp_ref"],
                          "linear_nll": ["linear_nll", "linear_nll_ref"],
                          "masked_adamw": ["masked_adamw_", "masked_adamw_ref_"]}.items():
        found = importlib.import_module(f"fastunlearn.kernels.{module}")
        for name in names:
            assert callable(getattr(found, name)), f"fastunlearn.kernels.{module}.{name}"
