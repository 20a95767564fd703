"""Synthetic worlds: made-up people drawn as pictures, the small checkpoints trained to
recognise them, and the `demo` command that erases some of them. Not part of the library core."""


def same_bits_on_any_x86() -> None:
    """Make the world builders' arithmetic the same on every x86-64 CPU with AVX2. torch picks its vector
    kernels by the CPU's instruction set, and MKL and oneDNN their code paths: 150 steps of a tower's
    contrastive pretraining end in different bits with torch's AVX-512 and AVX2 kernels, 300 steps of a
    bench world's training with oneDNN's, and over thousands of steps the differences grow into different
    worlds (one tower recipe retrieved 93% of the named people when built on one machine, 95% on another).
    Must run before torch is imported."""
    import os
    import sys

    if "torch" in sys.modules:
        raise RuntimeError("same_bits_on_any_x86() must run before torch is imported")
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
