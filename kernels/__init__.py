"""Fused Triton kernels for fastunlearn, each beside its plain-torch reference.

CUDA tensors run Triton; CPU tensors run the ``*_ref`` torch reference, or the
Triton kernels themselves through the interpreter when ``TRITON_INTERPRET=1``
was set before triton was imported.
"""

from .dispatch import use_triton
from .linear_nll import linear_nll, linear_nll_ref
from .masked_adamw import masked_adamw_, masked_adamw_ref_
from .projector import projector_mlp, projector_mlp_ref

__all__ = [
    "use_triton",
    "projector_mlp",
    "projector_mlp_ref",
    "linear_nll",
    "linear_nll_ref",
    "masked_adamw_",
    "masked_adamw_ref_",
]
