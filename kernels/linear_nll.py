"""Per-token NLL of softmax(hidden @ weight^T) without the [N, V] logits.

Forward. For row i with logits z_iv = h_i . w_v and target t_i:

    nll_i = lse_i - z_{i,t_i},     lse_i = log sum_v exp(z_iv)

The vocabulary is cut into S contiguous splits (S chosen so that
row-blocks x splits fill the GPU). A program owns a block of rows and one
split; it walks the split one vocab block at a time, computing the logits
tile with an fp32-accumulated GEMM and folding it into a running max m and
a running sum s of exp(z - m) (the online log-sum-exp):

    m' = max(m, max_b z),   s' = s * exp(m - m') + sum_b exp(z - m')

It writes only (m_j, s_j) per row and split, plus z_{i,t_i} from the one
block that holds the target. A tiny torch step merges the splits:

    M = max_j m_j,   lse = M + log sum_j s_j * exp(m_j - M)

Every exp argument is <= 0, so huge logits cannot overflow. Only lse [N]
is saved for the backward; extra memory is O(N * S), never O(N * V).

Backward. With g_i the incoming gradient of nll_i (0 on ignored rows):

    d nll_i / d z_iv = softmax_iv - [v == t_i] = exp(z_iv - lse_i) - [v == t_i]
    d h_i = g_i * sum_v (exp(z_iv - lse_i) - [v == t_i]) * w_v

A kernel recomputes the logits for one vocab chunk at a time and writes
G = g * (softmax - onehot) for that chunk into a bounded workspace
[N, chunk] (chunk sized to ~16 MiB); the shared GEMM (matmul.py) then adds
G @ W[chunk] into an fp32 d hidden. The weight is a frozen lm_head: its
gradient (G^T @ h) is never computed. Cost: 3 GEMMs of 2*N*V*H flops per
forward+backward (eager: 2) in exchange for never holding [N, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import check_same_dtype, configs, interpreting, tl, triton, use_triton
from .matmul import dot_precision, matmul


def linear_nll_ref(hidden, weight, targets, ignore_index=-100):
    """Plain-torch per-token NLL (float32, shape of targets); materialises the logits."""
    check_same_dtype("linear_nll", hidden=hidden, weight=weight)
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight.detach()).float()
    nll = F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index, reduction="none")
    return nll.reshape(targets.shape)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_hn, stride_hk, stride_wv, stride_wk,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 logits z[rows, cols] = hidden[rows] @ weight[cols]^T (zero outside N x V)."""
    rk = tl.arange(0, BLOCK_H)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + rk[None, :] * stride_hk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + cols[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        h = tl.load(h_ptrs, mask=(rows[:, None] < N) & (rk[None, :] < H - k), other=0.0)
        w = tl.load(w_ptrs, mask=(rk[:, None] < H - k) & (cols[None, :] < V), other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_H * stride_hk
        w_ptrs += BLOCK_H * stride_wk
    return acc


def _cfg(bn, bv, bh, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=warps,
                         num_stages=stages)


_GPU_CONFIGS = [
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 128, 64, 8, 3),
    _cfg(64, 256, 64, 8, 3),
    _cfg(128, 256, 64, 8, 3),
]
_INTERP_CONFIG = _cfg(16, 1024, 64, 4, 1)  # few, wide blocks: the interpreter pays per iteration


@triton.autotune(configs=configs(_GPU_CONFIGS, _INTERP_CONFIG), key=["N_BUCKET", "V", "H"])
@triton.jit
def _lse_partial_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, zt_ptr, N, V, H, N_BUCKET,
                        VOCAB_PER_SPLIT, stride_hn, stride_hk, stride_wv, stride_wk,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_n = tl.program_id(0)  # row block: fastest, so programs sharing W tiles run together
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    v_begin = split * VOCAB_PER_SPLIT
    v_end = tl.minimum(v_begin + VOCAB_PER_SPLIT, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, v_end, H, stride_hn, stride_hk, stride_wv,
                         stride_wk, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        z = tl.where(cols[None, :] < v_end, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        # The target's logit, from the one block that holds it.
        z_t = tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        holds = row_ok & (tgt >= v0) & (tgt < v0 + BLOCK_V) & (tgt < v_end)
        tl.store(zt_ptr + rows, z_t, mask=holds)
    tl.store(m_ptr + rows * n_splits + split, m, mask=row_ok)
    tl.store(s_ptr + rows * n_splits + split, s, mask=row_ok)


@triton.autotune(configs=configs(_GPU_CONFIGS, _INTERP_CONFIG), key=["N_BUCKET", "V", "H"])
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr, out_ptr, N, V, H, N_BUCKET, v_begin,
                    CHUNK, stride_hn, stride_hk, stride_wv, stride_wk, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """out[:, j] = g * (softmax - onehot)[:, v_begin + j] for the chunk's columns j."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_begin + j
    row_ok = rows < N
    z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_hn, stride_hk, stride_wv, stride_wk,
                     BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    out_mask = row_ok[:, None] & (j[None, :] < CHUNK) & (cols[None, :] < V)
    tl.store(out_ptr + rows[:, None] * CHUNK + j[None, :], (p * g[:, None]).to(out_ptr.dtype.element_ty),
             mask=out_mask)


# Vocabulary split (forward) and chunk (backward workspace) sizes.
WORKSPACE_BYTES = 16 << 20  # backward [N, chunk] workspace budget on a GPU
_INTERP_VOCAB_PER_SPLIT = 2048  # under the interpreter: 2 blocks a split; tests cross splits and chunks
_INTERP_VOCAB_CHUNK = 2048


def _round_up(x, m):
    return -(-x // m) * m


def _vocab_per_split(n_rows, vocab, device):
    if interpreting() or device.type != "cuda":  # at most 8 splits, at least 2 blocks each
        return max(_INTERP_VOCAB_PER_SPLIT, _round_up(triton.cdiv(vocab, 8), 1024))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, (4 * sms) // triton.cdiv(n_rows, 64))  # ~4 programs per SM
    return max(256, _round_up(triton.cdiv(vocab, splits), 256))


def _vocab_chunk(n_rows, vocab, itemsize, device):
    if interpreting() or device.type != "cuda":  # at most 8 chunks
        return max(_INTERP_VOCAB_CHUNK, _round_up(triton.cdiv(vocab, 8), 1024))
    return max(1024, WORKSPACE_BYTES // (n_rows * itemsize) // 256 * 256)


class _LinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        n, h = hidden.shape
        v = weight.shape[0]
        per_split = _vocab_per_split(n, v, hidden.device)
        splits = triton.cdiv(v, per_split)
        m = torch.empty((n, splits), device=hidden.device, dtype=torch.float32)
        s = torch.empty_like(m)
        z_t = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        _lse_partial_kernel[grid](
            hidden, weight, targets, m, s, z_t, n, v, h, triton.next_power_of_2(n), per_split,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            UPCAST=interpreting(), PRECISION=dot_precision(hidden.dtype))
        m_max = m.max(dim=1).values
        lse = m_max + torch.log(torch.sum(s * torch.exp(m - m_max[:, None]), dim=1))
        keep = targets != ignore_index
        nll = torch.where(keep, lse - z_t, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse, keep)
        return nll

    @staticmethod
    def backward(ctx, d_nll):
        hidden, weight, targets, lse, keep = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        n, h = hidden.shape
        v = weight.shape[0]
        g = torch.where(keep, d_nll.float(), 0.0).contiguous()
        chunk = min(v, _vocab_chunk(n, v, hidden.element_size(), hidden.device))
        work = torch.empty((n, chunk), device=hidden.device, dtype=hidden.dtype)
        d_hidden = torch.zeros((n, h), device=hidden.device, dtype=torch.float32)
        for v0 in range(0, v, chunk):
            c = min(chunk, v - v0)
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_V"]))  # noqa: E731,B023
            _dlogits_kernel[grid](
                hidden, weight, targets, lse, g, work, n, v, h, triton.next_power_of_2(n), v0, chunk,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                UPCAST=interpreting(), PRECISION=dot_precision(hidden.dtype))
            d_hidden += matmul(work[:, :c], weight[v0:v0 + c], out_dtype=torch.float32)
        return d_hidden.to(hidden.dtype), None, None, None


def linear_nll(hidden, weight, targets, ignore_index=-100):
    """Per-token NLL of softmax(hidden @ weight.T) at targets, 0 where target == ignore_index.

    hidden: [..., H]; weight: [V, H] (frozen lm_head, same dtype); targets:
    integer, shape [...]. Returns float32 of targets' shape, differentiable
    w.r.t. hidden only. Never materialises the [N, V] logits on the Triton
    path (CUDA, or TRITON_INTERPRET=1); otherwise runs linear_nll_ref.
    """
    check_same_dtype("linear_nll", hidden=hidden, weight=weight)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"linear_nll: hidden {tuple(hidden.shape)} and targets "
                         f"{tuple(targets.shape)} disagree on the leading dims")
    if not use_triton(hidden) or targets.numel() == 0:
        return linear_nll_ref(hidden, weight, targets, ignore_index)
    if weight.numel() >= 2**31 or targets.numel() * hidden.shape[-1] >= 2**31:
        raise ValueError("linear_nll: tensors this large need int64 offsets, which the kernel lacks")
    if not targets.is_cuda:  # on a GPU this check would cost a sync; torch's own CE asserts there
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bad.any():
            raise ValueError(f"linear_nll: targets outside [0, {weight.shape[0]}) that are not ignore_index")
    flat = hidden.reshape(-1, hidden.shape[-1])
    nll = _LinearNLL.apply(flat, weight, targets.reshape(-1).contiguous(), ignore_index)
    return nll.reshape(targets.shape)
