"""sha256 fingerprints of a job's inputs, which every torchrun rank states before any work
(`distributed.agree`): the checkpoint folder, a data folder, the options."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


SAMPLE_BLOCKS, BLOCK = 64, 64 << 10
WHOLE_FILE_LIMIT = 64 << 20


def fingerprint_checkpoint(ckpt: Path) -> str:
    """sha256 over the checkpoint folder: every small file whole; each weight file's size, header
    and, beyond 64 MiB, 64 blocks of 64 KiB spread over it. Hashing a 146 GB checkpoint whole on every
    rank would take minutes, so a difference in a large weight file outside those blocks and the
    header is not seen here (rank 0 still checks, before writing, that the projector bytes it
    replaces are the ones it started from)."""
    from . import safetensors_io as st

    ckpt = Path(ckpt)
    h = hashlib.sha256()
    weights = {p.resolve() for p in st.weight_files(ckpt)}
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        rel = str(path.relative_to(ckpt))
        if rel == "unlearning_report.json" or path.name.startswith(".fastunlearn"):  # the report, the journal
            continue
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if path.resolve() not in weights or size <= WHOLE_FILE_LIMIT:
            h.update(_sha_file(path).encode())
            continue
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 100 << 20)))
            for k in range(SAMPLE_BLOCKS):
                f.seek(k * (size - BLOCK) // (SAMPLE_BLOCKS - 1))
                h.update(f.read(BLOCK))
    return h.hexdigest()


def fingerprint_folder(folder: Path | None) -> str | None:
    """sha256 of a data folder's contents: each regular file's relative path and bytes."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            h.update(f"{path.relative_to(folder)}\0{_sha_file(path)}\n".encode())
        elif path.is_symlink():
            h.update(f"{path.relative_to(folder)}\0link\0{os.readlink(path)}\n".encode())
    return h.hexdigest()


def config_fingerprint(cfg, **options) -> str:
    from dataclasses import asdict

    return hashlib.sha256(json.dumps({**asdict(cfg), **{k: str(v) for k, v in options.items()}},
                                     sort_keys=True).encode()).hexdigest()
