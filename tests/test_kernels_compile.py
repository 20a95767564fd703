"""Compile every Triton kernel for a Hopper GPU (sm_90) - no GPU needed.

Triton's CPU interpreter runs kernel bodies as Python, so it misses what only
the GPU compiler rejects (it once missed a non-constexpr global in the GELU
epilogue). Here each kernel variant is compiled to a cubin with the ptxas that
ships with triton, specialised the way the runtime specialises it (unit
strides, 16-byte aligned pointers), and the main GEMM is checked to be
software-pipelined (async copies into multi-stage shared memory).

Runs in a subprocess: a process whose triton was imported with
TRITON_INTERPRET=1 cannot compile for a GPU.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled 12 kernel variants" in proc.stdout, proc.stdout


def _compile(kernel, types, constexprs, num_warps, num_stages=3, aligned=()):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.autotuner import Autotuner

    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = {n: "constexpr" if n in constexprs else types[n] for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in fn.arg_names if types.get(n, "").startswith("*") or n in aligned}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def main():
    assert os.environ.get("TRITON_INTERPRET") != "1"
    mm, nll, adamw = (importlib.import_module(f"fastunlearn.kernels.{m}")
                      for m in ("matmul", "linear_nll", "masked_adamw"))
    count = 0

    # GEMM: every epilogue in bf16 (x @ w.T: unit stride along K for both operands),
    # the fp32 (IEEE) path, and the fp32-output variant linear_nll's backward uses.
    for dt, out, epilogue, bias, prec in [("bf16", "bf16", mm.NONE, True, "tf32"),
                                          ("bf16", "bf16", mm.GELU, True, "tf32"),
                                          ("bf16", "bf16", mm.GELU_GRAD, False, "tf32"),
                                          ("bf16", "fp32", mm.NONE, False, "tf32"),
                                          ("fp16", "fp16", mm.GELU, False, "tf32"),
                                          ("fp32", "fp32", mm.GELU, True, "ieee")]:
        types = dict(a_ptr=f"*{dt}", b_ptr=f"*{dt}", c_ptr=f"*{out}", bias_ptr=f"*{dt}", aux_ptr=f"*{dt}",
                     M="i32", N="i32", K="i32", M_BUCKET="i32", stride_am="i32", stride_bn="i32")
        k = _compile(mm._matmul_kernel, types,
                     dict(stride_ak=1, stride_bk=1, EPILOGUE=epilogue, HAS_BIAS=bias, UPCAST=False,
                          PRECISION=prec, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                     num_warps=8, num_stages=4, aligned=("N", "K", "stride_am", "stride_bn"))
        count += 1
        if dt == "bf16" and epilogue == mm.NONE and out == "bf16":
            ttgir = k.asm["ttgir"]
            assert "async_copy_global_to_local" in ttgir and "4x128x64xbf16" in ttgir, \
                "bf16 GEMM main loop is not pipelined"

    for dt in ("bf16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        common = dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", tgt_ptr="*i64", N="i32", V="i32", H="i32",
                      N_BUCKET="i32", stride_hn="i32", stride_wv="i32")
        consts = dict(stride_hk=1, stride_wk=1, UPCAST=False, PRECISION=prec, BLOCK_N=64, BLOCK_V=128,
                      BLOCK_H=64)
        _compile(nll._lse_partial_kernel, dict(common, m_ptr="*fp32", s_ptr="*fp32", zt_ptr="*fp32",
                                               VOCAB_PER_SPLIT="i32"), consts, num_warps=4, num_stages=4)
        _compile(nll._dlogits_kernel, dict(common, lse_ptr="*fp32", g_ptr="*fp32", out_ptr=f"*{dt}",
                                           v_begin="i32", CHUNK="i32"), consts, num_warps=4, num_stages=4)
        count += 2

    for grad, has_mask in (("bf16", True), ("fp32", False)):
        types = dict(p_ptr="*fp32", g_ptr=f"*{grad}", mask_ptr="*i1", m_ptr="*fp32", v_ptr="*fp32", n="i32",
                     one_minus_beta1="fp32", beta2="fp32", one_minus_beta2="fp32", eps="fp32", decay="fp32",
                     step_size="fp32", bias_correction2_sqrt="fp32")
        _compile(adamw._masked_adamw_kernel, types, dict(HAS_MASK=has_mask, BLOCK=2048), num_warps=8)
        count += 1
    print(f"compiled {count} kernel variants for sm_90")


if __name__ == "__main__":
    main()
