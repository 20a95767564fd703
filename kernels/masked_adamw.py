"""One AdamW step in place, only where a boolean mask is True.

For every element with mask True (g upcast to fp32; t = step):

    p  <- p * (1 - lr * wd)                        decoupled weight decay
    m  <- m + (1 - b1) * (g - m)                   (torch's lerp)
    v  <- b2 * v + (1 - b2) * g^2
    p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

torch.optim.AdamW's single-tensor step (amsgrad=False, maximize=False) in
the same operation order: the torch reference below is bit-identical to it,
the kernel agrees to a few ulp (fused multiply-adds). Elements with mask
False are loaded by nobody and stored by nobody (masked loads and a masked
store), so p, m and v keep their exact bits there. One pass over memory:
read p, g, m, v, mask; write p, m, v - 17 bytes in and 12 out per element
for an fp32 gradient, against a dozen passes for the torch reference
(a full AdamW step, then torch.where to restore the masked-off elements).

Why no masked dW GEMM fused with this step: skipping a 128x128 tile needs
the whole tile masked off, which an element-wise Fisher-ratio mask almost
never gives (a tile of 16384 elements is skipped only if every one is off),
so the skip saves nothing; and fusing the update into the dW epilogue would
save one [H, K] fp32 write+read of the gradient (~28 us for a 4096x4096
layer on an H200) but forbids anything that needs the whole gradient first
(global-norm clipping, Fisher accumulation). Not worth its complexity.
"""

from __future__ import annotations

import torch

from .dispatch import interpreting, tl, triton, use_triton


@torch.no_grad()
def masked_adamw_ref_(param, grad, mask, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999,
                      eps=1e-8, weight_decay=0.01):
    """Plain-torch masked AdamW step (same semantics and signature as masked_adamw_)."""
    _check(param, grad, mask, exp_avg, exp_avg_sq, step)
    g = grad.float()
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    p = param * (1 - lr * weight_decay)
    m = exp_avg.lerp(g, 1 - beta1)
    v = exp_avg_sq * beta2
    v.addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias_correction1)
    if mask is None:
        mask = torch.ones_like(param, dtype=torch.bool)
    param.copy_(torch.where(mask, p, param))
    exp_avg.copy_(torch.where(mask, m, exp_avg))
    exp_avg_sq.copy_(torch.where(mask, v, exp_avg_sq))
    return param


@triton.jit
def _masked_adamw_kernel(p_ptr, g_ptr, mask_ptr, m_ptr, v_ptr, n, one_minus_beta1, beta2,
                         one_minus_beta2, eps, decay, step_size, bias_correction2_sqrt,
                         HAS_MASK: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = offs < n
    if HAS_MASK:
        on = on & (tl.load(mask_ptr + offs, mask=on, other=0) != 0)
    p = tl.load(p_ptr + offs, mask=on)
    g = tl.load(g_ptr + offs, mask=on).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=on)
    v = tl.load(v_ptr + offs, mask=on)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps  # IEEE sqrt and divide, as torch
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, p, mask=on)
    tl.store(m_ptr + offs, m, mask=on)
    tl.store(v_ptr + offs, v, mask=on)


def _check(param, grad, mask, exp_avg, exp_avg_sq, step):
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise ValueError(f"masked_adamw_: {name} must be float32, got {t.dtype}")
        if t.shape != param.shape:
            raise ValueError(f"masked_adamw_: {name} shape {tuple(t.shape)} != {tuple(param.shape)}")
    if grad.shape != param.shape or grad.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"masked_adamw_: grad must be fp32/fp16/bf16 of shape {tuple(param.shape)}, "
                         f"got {grad.dtype} {tuple(grad.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != param.shape):
        raise ValueError(f"masked_adamw_: mask must be bool of shape {tuple(param.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if step < 1:
        raise ValueError(f"masked_adamw_: step counts from 1, got {step}")


def masked_adamw_(param, grad, mask, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999,
                  eps=1e-8, weight_decay=0.01):
    """One AdamW step on param where mask is True, in place; returns param.

    param, exp_avg, exp_avg_sq: fp32, contiguous, updated in place. grad:
    fp32/fp16/bf16. mask: bool (None = update everything). step: the
    1-based step number, used for bias correction. Triton on CUDA (or under
    TRITON_INTERPRET=1), else masked_adamw_ref_.
    """
    if not use_triton(param):
        return masked_adamw_ref_(param, grad, mask, exp_avg, exp_avg_sq, step=step, lr=lr,
                                 beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    _check(param, grad, mask, exp_avg, exp_avg_sq, step)
    if not (param.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("masked_adamw_: param, exp_avg and exp_avg_sq must be contiguous")
    n = param.numel()
    block = 1 << 16 if interpreting() else 2048
    _masked_adamw_kernel[(triton.cdiv(n, block),)](
        param, grad.contiguous(), param if mask is None else mask.contiguous(), exp_avg, exp_avg_sq,
        n, 1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, lr / (1 - beta1 ** step),
        (1 - beta2 ** step) ** 0.5, HAS_MASK=mask is not None, BLOCK=block, num_warps=8)
    return param
