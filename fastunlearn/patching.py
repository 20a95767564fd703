"""`fastunlearn patch CKPT DELTA`: apply a delta saved by `apply --delta`, crash-safely, in place."""
from __future__ import annotations

import os
from pathlib import Path

from . import journal
from . import safetensors_io as st
from .delta import load_delta
from .errors import UserError, WrongCheckpoint


def patch(ckpt: Path, delta: Path) -> dict:
    ckpt = Path(ckpt)
    st.weight_files(ckpt)  # a checkpoint folder at all
    changes = load_delta(Path(delta))
    journal.recover(ckpt)  # finish an interrupted patch before reading the bytes
    with journal.locked(ckpt):  # read, check and write under one lock: no other job interleaves
        stored = st.read_checkpoint(ckpt)
        writes, tensors, already = [], [], 0
        for c in changes:
            info = stored.get(c["name"])
            if info is None:
                raise WrongCheckpoint(f"{delta}: tensor {c['name']!r} is not in {ckpt}; this delta was made for another checkpoint")
            if info.dtype != c["dtype"] or info.shape != tuple(c["shape"]):
                raise WrongCheckpoint(f"{delta}: tensor {c['name']!r} is {c['dtype']} {list(c['shape'])} in the delta but "
                                f"{info.dtype} {list(info.shape)} in {ckpt}")
            current = st.sha256_bytes(st.read_bytes(info))
            if current == c["after_sha256"]:
                already += 1
            elif current == c["before_sha256"]:
                writes.append((str(info.file.relative_to(ckpt)), info.start, c["data"]))
            else:
                raise WrongCheckpoint(f"{ckpt}: tensor {c['name']!r} is neither the original nor the patched one; "
                                "this delta was made for another checkpoint")
            tensors.append(c["name"])
        if writes:
            for path in [ckpt, *sorted({ckpt / rel for rel, _, _ in writes})]:
                if not os.access(path, os.W_OK):
                    raise UserError(f"{path} is read-only; make it writable to patch it")
            journal.patch_in_place(ckpt, writes)
    status = "patched" if writes else "already patched"
    return {"status": status, "tensors": tensors, "bytes_written": sum(len(d) for _, _, d in writes),
            "already_patched": already}
