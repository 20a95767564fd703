"""Shared fixtures: real checkpoint folders derived from the shipped demo checkpoints."""
import os
import shutil

# Triton decides interpreted-vs-compiled when a kernel is defined, and transformers imports
# triton early: define the kernels under the interpreter before anything else imports triton,
# then restore the variable. Dispatch reads it at call time, so the suite runs the CPU torch
# path (the job's real CPU path) except where a test sets TRITON_INTERPRET=1 itself.
_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import fastunlearn.kernels.linear_nll  # noqa: E402,F401
import fastunlearn.kernels.masked_adamw  # noqa: E402,F401
import fastunlearn.kernels.projector  # noqa: E402,F401

if _saved is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _saved

import pytest
import torch

from fastunlearn.worlds import people as world

ASSETS = {"llava": "llava-people", "qwen2_vl": "qwen2vl-people"}
FORGET = (1, 4)
OTHERS = (0, 2, 3, 5, 6, 7)


def asset(family):
    return world.demo_assets_dir() / ASSETS[family]


@pytest.fixture(scope="session")
def variant(tmp_path_factory):
    """variant(family, dtype, sharded) -> a pristine checkpoint folder, built once per session.

    The weights are re-saved with save_pretrained in the given dtype (and shards); the tokenizer and
    processor files are the asset's own. Tests copy it before writing to it (see `fresh`)."""
    from transformers import AutoModelForImageTextToText

    built = {}

    def make(family, dtype=torch.float32, sharded=False):
        key = (family, dtype, sharded)
        if key not in built:
            src = asset(family)
            if dtype == torch.float32 and not sharded:
                built[key] = src
            else:
                dst = tmp_path_factory.mktemp(f"{family}-{str(dtype)[6:]}-{'sharded' if sharded else 'single'}")
                for f in src.iterdir():
                    if not f.name.startswith("model"):
                        shutil.copy(f, dst / f.name)
                model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype)
                model.save_pretrained(dst, max_shard_size="300KB" if sharded else "10GB")
                built[key] = dst
        return built[key]

    return make


@pytest.fixture
def fresh(tmp_path):
    """fresh(src) -> a private copy of a checkpoint folder, safe to patch."""
    def copy(src, name="ckpt"):
        return shutil.copytree(src, tmp_path / name)
    return copy


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """Forget (people 1 and 4), retain (the others) and held-out folders of the synthetic world."""
    root = tmp_path_factory.mktemp("world")
    world.write_folder(root / "forget", FORGET, 6, seed=11)
    world.write_folder(root / "retain", OTHERS, 6, seed=12)
    world.write_folder(root / "heldout", range(8), 8, seed=13)
    return root


def tree(folder):
    """Every file below a folder, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ckpt(variant, fresh):
    """A private copy of the demo LLaVA checkpoint."""
    return fresh(variant("llava"))


@pytest.fixture
def forget(tmp_path):
    """A small forget folder: one picture of each of the two people to forget."""
    world.write_folder(tmp_path / "forget", FORGET, 1, seed=3)
    return tmp_path / "forget"
