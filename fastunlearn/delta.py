"""The change: which stored projector tensors change and how (`tensor_changes`), and delta files
that carry it to another copy of the same checkpoint (`save_delta`, `load_delta`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import UserError
from .journal import write_file_atomic
from .safetensors_io import (
    TORCH_DTYPES,
    _parse_json,
    read_bytes,
    read_header,
    sha256_bytes,
    tensor_to_bytes,
)

if TYPE_CHECKING:
    from .load import Loaded


def tensor_changes(loaded: Loaded, new: dict[str, torch.Tensor]) -> list[dict]:
    """Each projector tensor whose stored bytes change: where, how many elements, max |delta| as stored."""
    changes = []
    for name, stored_name in loaded.names.items():
        old, fresh = loaded.original[name], new[name]
        old_bytes, new_bytes = tensor_to_bytes(old), tensor_to_bytes(fresh)
        if old_bytes == new_bytes:
            continue
        info = loaded.stored[stored_name]
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[old.element_size()]
        changes.append({
            "name": stored_name,
            "file": info.file.name,
            "byte_range": [info.start, info.end],
            "dtype": info.dtype,
            "shape": list(info.shape),
            "elements": old.numel(),
            "elements_changed": int((old.view(bits) != fresh.view(bits)).sum()),
            "max_abs_delta": float((fresh.double() - old.double()).abs().max()),
            "before_sha256": sha256_bytes(old_bytes),
            "after_sha256": sha256_bytes(new_bytes),
            "new": fresh,
            "data": new_bytes,
        })
    return changes


DELTA_KEY = "fastunlearn_delta"


def save_delta(path: Path, changes: list[dict]) -> None:
    """A delta file: a safetensors file of the new stored values of each changed tensor, plus the
    sha256 of its bytes before and after in the metadata, so `patch` applies it only to the
    checkpoint it was made from (and is a no-op on the patched one)."""
    from safetensors.torch import save

    tensors = {c["name"]: c["new"] for c in changes}
    guard = {c["name"]: {"before_sha256": c["before_sha256"], "after_sha256": c["after_sha256"]} for c in changes}
    write_file_atomic(Path(path), save(tensors, metadata={DELTA_KEY: json.dumps(guard, sort_keys=True)}))


def load_delta(path: Path) -> list[dict]:
    header = read_header(path)
    meta = header.metadata or {}
    if DELTA_KEY not in meta:
        raise UserError(f"{path}: not a fastunlearn delta file (no {DELTA_KEY} metadata)")
    guard = _parse_json(meta[DELTA_KEY].encode(), f"{path}: damaged delta metadata")
    if not isinstance(guard, dict):
        raise UserError(f"{path}: damaged delta metadata (not a JSON object)")
    changes = []
    for name, info in header.tensors.items():
        hashes = guard.get(name)
        if not (isinstance(hashes, dict) and all(isinstance(hashes.get(k), str) for k in ("before_sha256", "after_sha256"))):
            raise UserError(f"{path}: tensor {name[:80]!r} has no before/after hashes")
        if info.dtype not in TORCH_DTYPES:
            raise UserError(f"{path}: tensor {name[:80]!r} is {info.dtype}; a delta holds F32, F16 or BF16 tensors")
        data = read_bytes(info)
        if sha256_bytes(data) != hashes["after_sha256"]:
            raise UserError(f"{path}: tensor {name[:80]!r} does not match its recorded hash (damaged delta)")
        changes.append({"name": name, "dtype": info.dtype, "shape": info.shape, "data": data,
                        "before_sha256": hashes["before_sha256"], "after_sha256": hashes["after_sha256"]})
    return changes
