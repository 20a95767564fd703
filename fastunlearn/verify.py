"""`fastunlearn verify ORIGINAL UNLEARNED FORGET_DIR [--retain DIR]`: recompute, independently of the
apply report, what changed byte for byte and how both checkpoints score on the given data."""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from . import checkpoint as ck
from .data import Item, read_folder
from .report import environment
from .unlearn import (cache_samples, checkpoint_files, drop_vision_tower, fill_answers, hash_files, inspect_checkpoint,
                      make_batches, master_params, open_checkpoint, pick_device, score, summarize)


def evaluate_checkpoint(ckpt: Path, item_sets: dict[str, list[Item]], device: torch.device, batch_size: int = 16,
                        per_item: bool = False) -> dict:
    """Score one checkpoint on each named item set (greedy exact match and answer NLL)."""
    loaded = open_checkpoint(ckpt, device)
    samples = {name: cache_samples(loaded, items, name) for name, items in item_sets.items()}
    drop_vision_tower(loaded)
    params = master_params(loaded)
    out = {}
    for name, s in samples.items():
        batches = make_batches(loaded, s, batch_size)
        scores = score(loaded, params, batches)
        out[name] = summarize(scores, batches)
        if per_item:
            out[name]["correct"] = scores["correct"].tolist()
    del loaded
    gc.collect()
    return out


def compare_checkpoints(original: Path, unlearned: Path) -> dict:
    """Byte-level comparison: every file's sha256, then tensor by tensor inside differing weight files."""
    original, unlearned = Path(original), Path(unlearned)
    files_a, files_b = checkpoint_files(original), checkpoint_files(unlearned)
    sha_a, _ = hash_files(original, files_a, desc="hashing original")
    sha_b, _ = hash_files(unlearned, files_b, desc="hashing unlearned")
    tensors_a, tensors_b = ck.read_checkpoint(original), ck.read_checkpoint(unlearned)
    _, _, adapter = inspect_checkpoint(original)

    changed, headers_equal = [], True
    for name, a in tensors_a.items():
        b = tensors_b.get(name)
        if b is None or sha_a.get(a.file.name) == sha_b.get(b.file.name):
            continue
        bytes_a, bytes_b = ck.read_bytes(a), ck.read_bytes(b)
        if a.dtype != b.dtype or a.shape != b.shape or a.start != b.start:
            headers_equal = False
        if bytes_a == bytes_b:
            continue
        entry = {"name": name, "file": a.file.name, "byte_range": [a.start, a.end], "dtype": a.dtype,
                 "projector": (name.startswith(adapter.projector_prefix) or ("." + adapter.projector_prefix) in name)}
        if a.dtype in ck.TORCH_DTYPES and a.dtype == b.dtype and a.shape == b.shape:
            ta, tb = ck.bytes_to_tensor(bytes_a, a.dtype, a.shape), ck.bytes_to_tensor(bytes_b, b.dtype, b.shape)
            entry["elements_changed"] = int((ta != tb).sum())
            entry["max_abs_delta"] = float((tb.double() - ta.double()).abs().max())
        changed.append(entry)
    for path in ck.weight_files(original):
        ha, hb = ck.read_header(path), ck.read_header(unlearned / path.name) if (unlearned / path.name).exists() else None
        if hb is None or ha.length != hb.length or ha.metadata != hb.metadata:
            headers_equal = False
        else:
            with open(path, "rb") as fa, open(unlearned / path.name, "rb") as fb:
                headers_equal &= fa.read(8 + ha.length) == fb.read(8 + hb.length)

    files = [{"name": n, "sha256_original": sha_a.get(n), "sha256_unlearned": sha_b.get(n),
              "identical": sha_a.get(n) == sha_b.get(n)} for n in sorted(set(sha_a) | set(sha_b))]
    weight_names = {p.name for p in ck.weight_files(original)}
    return {
        "files": files,
        "changed_tensors": changed,
        "tensor_names_equal": set(tensors_a) == set(tensors_b),
        "headers_identical": headers_equal,
        "only_projector_changed": all(c["projector"] for c in changed),
        "non_weight_files_identical": all(
            f["identical"] for f in files if f["name"] not in weight_names and f["sha256_original"] is not None
        ),
    }


def verify(original: Path, unlearned: Path, forget_dir: Path, retain_dir: Path | None = None, device="auto") -> dict:
    device = pick_device(device)
    for ckpt in (original, unlearned):
        inspect_checkpoint(ckpt)
        ck.recover(ckpt)
    forget = read_folder(forget_dir, "forget")
    retain = read_folder(retain_dir, "retain") if retain_dir else []
    comparison = compare_checkpoints(original, unlearned)

    # targets without QA lines are the ORIGINAL model's greedy answers
    loaded = open_checkpoint(original, device)
    forget = fill_answers(loaded, forget, 32)
    retain = fill_answers(loaded, retain, 32)
    del loaded
    gc.collect()
    sets = {"forget": forget, "retain": retain} if retain else {"forget": forget}
    before = evaluate_checkpoint(original, sets, device)
    after = evaluate_checkpoint(unlearned, sets, device)
    return {
        "fastunlearn_verify": 1,
        "original": str(Path(original).resolve()),
        "unlearned": str(Path(unlearned).resolve()),
        "bytes": comparison,
        "metrics": {name: {"before": before[name], "after": after[name]} for name in sets},
        "environment": environment(str(device)),
    }


def print_verification(result: dict) -> None:
    from .cli import print_metrics

    b = result["bytes"]
    print_metrics(result["metrics"])
    print(f"changed tensors: {len(b['changed_tensors'])} "
          f"({', '.join(c['name'] for c in b['changed_tensors']) or 'none'})")
    print(f"only projector tensors changed: {b['only_projector_changed']}; headers identical: {b['headers_identical']}; "
          f"non-weight files identical: {b['non_weight_files_identical']}")
