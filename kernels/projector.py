"""Projector MLP: Y = gelu(X @ W1^T + b1) @ W2^T + b2, or Y = X @ W1^T + b1 when W2 is None.

Forward (X [N, K], W1 [H, K], W2 [O, H]; exact erf GELU):

    P = X @ W1^T + b1          GEMM 1, bias in the epilogue
    A = gelu(P)                 ... GELU in the same epilogue, which also stores P
    Y = A @ W2^T + b2          GEMM 2, bias in the epilogue

Backward, given dY [N, O]:

    dW2 = dY^T @ A             db2 = sum_rows dY
    dP  = (dY @ W2) * gelu'(P)  GEMM with gelu' fused into its epilogue
    dW1 = dP^T @ X             db1 = sum_rows dP
    dX  = dP @ W1

    gelu'(p) = Phi(p) + p * phi(p)   (Phi, phi: standard normal cdf and pdf)

Store or recompute P? GEMM 1's epilogue stores P next to A: one extra
[N, H] write (4.7 MB in bf16 for LLaVA-1.5's 576 x 4096, ~1 us of HBM time)
against recomputing GEMM 1 in the backward (2*N*K*H = 4.8 GFLOP, ~6 us at
H200 tensor-core speed, plus the reread of X and W1). A itself is GEMM 2's
input and dW2's operand, so it is kept too; the projector's activations are
tiny next to the LLM's, so the memory is not worth a GEMM.

All GEMMs accumulate in fp32 and take transposed operands as strides (no
copies); see matmul.py. Bias gradients are plain fp32 row sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import check_same_dtype, use_triton
from .matmul import GELU, GELU_GRAD, matmul


def projector_mlp_ref(x, w1, b1=None, w2=None, b2=None):
    """Plain-torch projector (exact erf GELU). Same signature as projector_mlp."""
    check_same_dtype("projector_mlp", x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    p = F.linear(x, w1, b1)
    if w2 is None:
        return p
    return F.linear(F.gelu(p), w2, b2)


def _row_sum(t, dtype):
    return t.sum(0, dtype=torch.float32).to(dtype)


class _ProjectorMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        if w2 is None:
            ctx.save_for_backward(x, w1, None, None, None)
            return matmul(x, w1.t(), b1)
        a, p = matmul(x, w1.t(), b1, epilogue=GELU)
        ctx.save_for_backward(x, w1, w2, p, a)
        return matmul(a, w2.t(), b2)

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, p, a = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        dx = dw1 = db1 = dw2 = db2 = None
        if w2 is None:
            dp = dy
        else:
            if need_w2:
                dw2 = matmul(dy.t(), a)
            if need_b2:
                db2 = _row_sum(dy, dy.dtype)
            dp = matmul(dy, w2, epilogue=GELU_GRAD, aux=p)
        if need_w1:
            dw1 = matmul(dp.t(), x)
        if need_b1:
            db1 = _row_sum(dp, dp.dtype)
        if need_x:
            dx = matmul(dp, w1)
        return dx, dw1, db1, dw2, db2


def projector_mlp(x, w1, b1=None, w2=None, b2=None):
    """gelu(x @ w1.T + b1) @ w2.T + b2 (or x @ w1.T + b1 when w2 is None).

    x: [..., K]; w1: [H, K]; w2: [O, H]; biases optional; all one dtype
    (fp32, fp16 or bf16) else ValueError. Returns [..., O] in x's dtype,
    differentiable w.r.t. every tensor argument. Triton on CUDA (or under
    TRITON_INTERPRET=1), else projector_mlp_ref.
    """
    check_same_dtype("projector_mlp", x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    if not use_triton(x) or x.numel() == 0:
        return projector_mlp_ref(x, w1, b1, w2, b2)
    lead, k = x.shape[:-1], x.shape[-1]
    y = _ProjectorMLP.apply(x.reshape(-1, k), w1, b1, w2, b2)
    return y.reshape(*lead, y.shape[-1])
