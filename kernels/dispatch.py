"""When to run Triton, and the few Triton imports every kernel file shares.

CUDA tensors run the Triton kernels. CPU tensors run the plain-torch
reference, unless ``TRITON_INTERPRET=1`` is set: then the very same Triton
kernels run on the CPU through Triton's interpreter (that is how CI tests
them). The variable must be set before ``triton`` is first imported.
"""

from __future__ import annotations

import os

import torch

try:  # triton ships with torch on Linux; elsewhere (macOS, Windows) the refs run
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

    class _NoTriton:
        """Just enough of ``triton``/``triton.language`` to define the kernels."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_, **__):
            return lambda f: f

        @staticmethod
        def Config(*_, **__):
            return None

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, int(n) - 1).bit_length()

    triton = tl = _NoTriton()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton picks interpreted-vs-compiled when a kernel is defined (at import): CPU tensors can run
# the kernels only if they were defined under the interpreter.
DEFINED_INTERPRETED = interpreting()


def use_triton(tensor: torch.Tensor) -> bool:
    """Run the Triton kernel for this tensor (else the torch reference)?
    float64 (used by tests as ground truth) always takes the reference."""
    on_cpu_ok = interpreting() and DEFINED_INTERPRETED
    return HAS_TRITON and (tensor.is_cuda or on_cpu_ok) and tensor.dtype in KERNEL_DTYPES


def configs(gpu: list, interpreter) -> list:
    """Autotune configs: several on a GPU, exactly one under the interpreter
    (autotuning more than one config fails without a GPU)."""
    return [interpreter] if interpreting() else gpu


def check_same_dtype(name: str, **tensors) -> torch.dtype:
    """All given (non-None) tensors share one floating dtype; return it."""
    given = {k: t for k, t in tensors.items() if t is not None}
    dtypes = {t.dtype for t in given.values()}
    if len(dtypes) != 1:
        listing = ", ".join(f"{k}={t.dtype}" for k, t in given.items())
        raise ValueError(f"{name}: all tensors must share one dtype, got {listing}")
    dtype = dtypes.pop()
    if dtype not in KERNEL_DTYPES + (torch.float64,):
        raise ValueError(f"{name}: dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype
