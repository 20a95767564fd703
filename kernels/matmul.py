"""One Triton GEMM, C = A @ B, with the epilogues the projector needs.

Shared by the projector (all six of its GEMMs: forward, dH, dX, dW1, dW2)
and by linear_nll's backward (d hidden = dlogits @ weight, one vocab chunk
at a time). A and B may have any strides, so ``x @ w.T`` and ``dy.T @ h``
need no copies: transposes are just swapped strides.

Epilogues, applied to the fp32 accumulator before the single store:

    NONE       C = A @ B (+ bias)
    GELU       P = A @ B + bias (stored to AUX for the backward), C = gelu(P)
    GELU_GRAD  C = (A @ B) * gelu'(AUX)       (AUX holds the saved P)

with the exact (erf) GELU

    gelu(p)  = p * Phi(p) = p/2 * (1 + erf(p / sqrt(2)))
    gelu'(p) = Phi(p) + p * phi(p) = (1 + erf(p/sqrt(2)))/2 + p * exp(-p^2/2) / sqrt(2*pi)

Accumulation is fp32. fp32 inputs follow torch's own choice between TF32
and IEEE (``torch.backends.cuda.matmul.allow_tf32``, off by default), so
results match torch's matmul precision; fp16/bf16 use tensor cores. Under
the interpreter tiles are cast to fp32 before ``tl.dot`` (its bf16 dot is
wrong), which is exact enough there.
"""

from __future__ import annotations

import torch

from .dispatch import configs, interpreting, tl, triton

NONE, GELU, GELU_GRAD = 0, 1, 2


@triton.jit
def gelu(p):
    return 0.5 * p * (1.0 + tl.math.erf(p * 0.7071067811865476))  # 1/sqrt(2)


@triton.jit
def gelu_grad(p):
    cdf = 0.5 * (1.0 + tl.math.erf(p * 0.7071067811865476))
    pdf = tl.exp(-0.5 * p * p) * 0.3989422804014327  # 1/sqrt(2*pi)
    return cdf + p * pdf


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


_GPU_CONFIGS = [  # a few classic Hopper/Ampere GEMM tiles; autotuned per shape bucket
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
]


@triton.autotune(configs=configs(_GPU_CONFIGS, _cfg(64, 64, 256, 4, 1)),  # interpreter: few, wide tiles
                 key=["M_BUCKET", "N", "K", "EPILOGUE", "HAS_BIAS"])
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, M, N, K, M_BUCKET,
                   stride_am, stride_ak, stride_bk, stride_bn,
                   EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles share each B column-tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue. C and AUX are contiguous [M, N].
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    c_offs = rm[:, None] * N + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:  # GELU: keep the pre-activation for the backward
        tl.store(aux_ptr + c_offs, acc.to(aux_ptr.dtype.element_ty), mask=c_mask)
        acc = gelu(acc)
    elif EPILOGUE == 2:  # GELU_GRAD: dP = dH * gelu'(P)
        pre = tl.load(aux_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        acc = acc * gelu_grad(pre)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision that matches torch's matmul for this dtype."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; ignored for fp16/bf16 inputs


def matmul(a, b, bias=None, epilogue=NONE, aux=None, out_dtype=None):
    """C = a @ b (+ bias) with an epilogue; a [M, K], b [K, N], any strides.

    GELU returns (gelu(P), P); GELU_GRAD needs ``aux`` = the saved P and
    returns C = (a @ b) * gelu'(P). Otherwise returns C.
    """
    M, K = a.shape
    K2, N = b.shape
    assert K == K2 and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert max(a.numel(), b.numel(), M * N) < 2**31, "int32 offsets"
    c = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    if epilogue == GELU:
        aux = torch.empty_like(c)
    elif epilogue == GELU_GRAD:
        assert aux is not None and aux.shape == (M, N) and aux.is_contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _matmul_kernel[grid](
        a, b, c, c if bias is None else bias, c if aux is None else aux, M, N, K,
        triton.next_power_of_2(M), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, UPCAST=interpreting(),
        PRECISION=dot_precision(a.dtype))
    return (c, aux) if epilogue == GELU else c
