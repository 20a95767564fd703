"""The job's options (`Config`), device choice, seeding and progress bars."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import UserError
from .objectives import METHODS
from .scope import tower_layers


@dataclass
class Config:
    method: str = "npo"
    steps: int = 100
    lr: float = 1e-2
    beta: float = 0.5
    retain_weight: float = 3.0
    mask: str = "fisher"  # fisher | none
    mask_threshold: float = 1.0
    fisher_samples: int = 64
    batch_size: int = 16
    weight_decay: float = 0.0
    views: int = 4  # augmented variants of each picture, cached beside it
    max_new_tokens: int = 32
    device: str = "auto"
    seed: int = 0
    holdout: bool = True  # a first run without one picture per subject (with two or more) measures on it
    select: bool = False  # held-out pictures choose the step (holdout.py)
    search: bool = False  # held-out pictures also choose between these settings and a gentler one
    shard_llm: bool = False  # under torchrun, FSDP2-shard the frozen LLM's decoder layers over the ranks
    scope: str = "connector"  # the edit's room: connector | vision:K (the tower's last K layers too, scope.py)
    anchor_weight: float = 0.0  # the anchor term's weight (anchor.py): visual tokens of retain and anchor pictures
    anchor_dir: str | None = None  # pictures that only anchor (no questions)
    other_answers: int = 0  # per forget sequence, other people's answers whose likelihood is a second NPO reference
    other_beta: float = 4.0  # that term's beta: large, so its pressure stops near parity (optimise.other_reference)

    def check(self):
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.mask not in ("fisher", "none"):
            raise UserError(f"--mask {self.mask!r}: expected fisher or none")
        if self.views < 0:
            raise UserError("--views must be 0 or more")
        for name in ("steps", "batch_size", "fisher_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or self.beta <= 0:
            raise UserError("--lr and --beta must be positive")
        tower_layers(self.scope)
        if self.other_answers < 0 or self.other_beta <= 0:
            raise UserError("--other-answers must be 0 or more and --other-beta positive")
        if self.anchor_weight < 0:
            raise UserError("--anchor-weight must be 0 or more")
        if self.anchor_dir is not None and not self.anchor_weight:
            raise UserError("--anchor DIR needs --anchor-weight above 0 (the weight of the anchor term)")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable=None, **kw):
    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **kw)


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim; elsewhere nothing). Between
    activation-heavy passes on a CPU: glibc otherwise keeps freed pages, and the process's peak grows
    with fragmentation instead of staying at one pass's activations."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - raises AttributeError where there is no malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None
