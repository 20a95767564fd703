"""The audit report: what changed (byte-exact), what it measured, how to reproduce it.

It never holds forgotten content: images, questions, answers and subject folder names appear
only as sha256 hashes.
"""
from __future__ import annotations

import hashlib
import platform
import sys
import time
from pathlib import Path

import torch

from . import __version__
from . import safetensors_io as st


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_items(items) -> dict:
    images = sorted({it.image for it in items if it.image is not None})
    return {
        "items": len(items),
        "images": len(images),
        "subjects_sha256": sorted({_sha(it.subject) for it in items if it.subject}),
        "items_sha256": [
            {
                "image": st.sha256_file(Path(it.image)) if it.image is not None else None,
                "question": _sha(it.question),
                "answer": _sha(it.answer or ""),
            }
            for it in items
        ],
    }


def environment(device: str) -> dict:
    import safetensors
    import transformers

    env = {
        "fastunlearn": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "device": device,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
    return env


def delta_sha256(changes: list[dict]) -> str:
    """One hash of the whole delta: each changed tensor's stored name and the sha256 of its new bytes."""
    return _sha("\n".join(f"{c['name']} {c['after_sha256']}" for c in sorted(changes, key=lambda c: c["name"])))


def reproduce_info(result: dict) -> dict:
    """What reproduces the delta bit for bit: the same inputs (the checkpoint files' and items' sha256
    in this report), configuration, seed and versions, on CPU."""
    cfg = result["config"]
    options = " ".join(f"--{k.replace('_', '-')} {cfg[k]}" for k in ("method", "steps", "lr", "beta", "retain_weight",
                                                                        "mask", "mask_threshold", "views", "batch_size",
                                                                        "seed") if k in cfg)
    options += " --no-holdout" if cfg.get("holdout") is False else ""
    options += "".join(f" --{flag}" for k, flag in (("select", "select-step"), ("search", "search")) if cfg.get(k))
    world = result.get("distributed", {}).get("world_size", 1)
    if world > 1:  # the same job under torchrun: sums are reduced in another order
        options += " --shard-llm" if cfg.get("shard_llm") else ""
    return {
        "seed": cfg["seed"],
        "delta_sha256": delta_sha256(result["changes"]),
        "deterministic_on_cpu": result["device"] == "cpu",
        "torch_threads": torch.get_num_threads(),
        "command": (f"torchrun --nproc-per-node {world} -m " if world > 1 else "")
        + f"fastunlearn apply CKPT FORGET_DIR --retain RETAIN_DIR --device {result['device'].split(':')[0]} {options}",
        "inputs": "the files' sha256_before (checkpoint) and data.*.items_sha256 (pictures, questions, answers) below",
        "note": ("same checkpoint, folders, configuration, seed and versions give the same delta bit for bit on CPU "
                 "(checked by tests/test_job.py::test_same_seed_same_delta); on CUDA, kernels may differ in the last bits"
                 + (f"; under torchrun, with {world} ranks (another number of ranks sums in another order: the projector "
                    "agrees to float32 rounding, not bit for bit)" if world > 1 else "")),
    }


def _folder_sha(folder) -> str:
    return _sha(str(Path(folder).resolve()))


def build_report(result: dict, proof: dict, source: Path, forget_dir, retain_dir) -> dict:
    """`forget_dir`: one folder or a list of them (one erasure request each)."""
    before, after, expected = proof["before"], proof["after"], proof["expected"]
    forget_dirs = [forget_dir] if isinstance(forget_dir, (str, Path)) else list(forget_dir)
    changed_files = sorted({c["file"] for c in result["changes"]})
    files = [
        {
            "name": name,
            "sha256_before": before[name],
            "sha256_after": after[name] if after else None,
            "sha256_expected_after": expected[name],
            "patched": name in changed_files,
        }
        for name in before
    ]
    if after is None:
        all_other_unchanged = None  # dry run: nothing written
    else:
        all_other_unchanged = set(after) == set(expected) and all(after[n] == expected[n] for n in expected)
    return {
        "fastunlearn_report": 1,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": {
            "source": str(Path(source).resolve()),
            "written_to": proof["written_to"],
            "in_place": proof["written_to"] == str(Path(source).resolve()),
            "model_type": result["model_type"],
            "adapter": result["adapter"],
        },
        "changed_tensors": [{k: v for k, v in c.items() if k not in ("new", "data")} for c in result["changes"]],
        "byte_proof": {
            "method": (
                "sha256 of every file before the write, the sha256 each must have with only the listed "
                "byte ranges replaced, and the sha256 after the write; equal expected and after hashes "
                "prove that no other byte (headers, __metadata__, other tensors, other files) changed"
            ),
            "bytes_written": sum(c["byte_range"][1] - c["byte_range"][0] for c in result["changes"]),
            # what the job was allowed to touch (--scope): stems of stored tensor names
            "scope": result["config"]["scope"],
            "may_change": result["may_change"],
            "all_other_bytes_unchanged": all_other_unchanged,
        },
        "files": files,
        "heldout": result["heldout"],  # the headline: whole pictures the update never trained on
        "selection": result["selection"],
        "metrics": result["metrics"],  # on the pictures the job trained on
        "mask_density": result["mask_density"],
        "loss_curve": result["losses"],
        "check": result["check"],  # the job's own check of its targets on unseen views, and its warnings
        "data": {
            "forget": {"folder_sha256": (_folder_sha(forget_dirs[0]) if len(forget_dirs) == 1
                                         else [_folder_sha(d) for d in forget_dirs]),
                       **describe_items(result["items"]["forget"])},
            "retain": (
                {"folder_sha256": _sha(str(Path(retain_dir).resolve())), **describe_items(result["items"]["retain"])}
                if retain_dir else None
            ),
        },
        # each erasure request of the job (one per forget folder), by hash only
        "requests": [
            {"folder_sha256": _folder_sha(r["folder"]),
             **{k: v for k, v in describe_items(r["items"]).items() if k != "items_sha256"},
             "metrics": {"forget": r["metrics"]}}
            for r in result.get("requests", [])
        ],
        "distributed": result.get("distributed", {"world_size": 1, "backend": None}),
        # the --anchor folder by hash only, as the forget and retain folders
        "config": {**result["config"], "anchor_dir": result["config"].get("anchor_dir") and
                   _folder_sha(result["config"]["anchor_dir"])},
        "reproduce": reproduce_info(result),
        "environment": environment(result["device"]),
        "compute_dtype": result["compute_dtype"],
        "timing_s": result["phases_s"],
        "peak_memory_mb": result["peak_memory_mb"],
    }
