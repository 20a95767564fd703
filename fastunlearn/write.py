"""The bytes: refuse bad destinations before any work, then write the changed byte ranges (in
place through the journal, or into a new folder) and hash every file before, expected and after."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from . import journal
from . import safetensors_io as st
from .config import progress
from .errors import CheckpointChanged, UserError, WriteFailed


def checkpoint_files(ckpt: Path) -> list[Path]:
    """Every regular file of a checkpoint folder (relative paths), fastunlearn's own scratch excluded."""
    skip = {journal.JOURNAL, journal.JOURNAL + ".tmp"}
    return sorted(p.relative_to(ckpt) for p in Path(ckpt).rglob("*") if p.is_file() and p.name not in skip)


def hash_files(root: Path, files: list[Path], writes: list[tuple[str, int, bytes]] | None = None, desc="hashing"):
    """sha256 of each file; with `writes`, also the sha256 each file must have once exactly those
    byte ranges are replaced (the proof that no other byte changes)."""
    hashes, expected = {}, {}
    for rel in progress(files, desc=desc):
        ranges = [(off, data) for f, off, data in (writes or []) if f == str(rel)]
        h, e = hashlib.sha256(), hashlib.sha256()
        pos = 0
        with open(root / rel, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
                if ranges:
                    patched = bytearray(chunk)
                    for off, data in ranges:
                        lo, hi = max(off, pos), min(off + len(data), pos + len(chunk))
                        if lo < hi:
                            patched[lo - pos : hi - pos] = data[lo - off : hi - off]
                    e.update(patched)
                pos += len(chunk)
        hashes[str(rel)] = h.hexdigest()
        expected[str(rel)] = e.hexdigest() if ranges else hashes[str(rel)]
    return hashes, expected


def preflight(ckpt: Path, out: Path | None, dry_run: bool) -> None:
    """Refuse bad destinations before any work is done."""
    ckpt = Path(ckpt).resolve()
    if out is not None:
        out = Path(out).resolve()
        if out == ckpt or ckpt in out.parents:
            raise UserError(f"--out {out} is inside the source checkpoint {ckpt}; choose a folder outside it")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {out} already exists and is not empty; choose a new folder")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: parent folder {out.parent} does not exist")
    elif not dry_run:
        for path in [ckpt, *st.weight_files(ckpt)]:
            if not os.access(path, os.W_OK):
                raise UserError(f"{path} is read-only: use --out DIR to write a new checkpoint, or make it writable")


def write_result(ckpt: Path, result: dict, out: Path | None, dry_run: bool, stamps: dict) -> dict:
    """Write the changed byte ranges (in place, crash-safe, or into a new folder). Returns the file proof.

    Nothing is written when a weight file changed on disk since the job read it (file stamps) or
    the bytes to replace are not the ones the job started from (their sha256)."""
    ckpt = Path(ckpt).resolve()
    writes = [(c["file"], c["byte_range"][0], c["data"]) for c in result["changes"]]
    files = checkpoint_files(ckpt)

    def unchanged_since_start():
        for path, stamp in stamps.items():
            if not path.exists() or st.file_stamp(path) != stamp:
                raise CheckpointChanged(f"{path} changed on disk while the job ran; nothing was written, run again")
        for c in result["changes"]:
            old = st.read_range(ckpt / c["file"], c["byte_range"][0], c["byte_range"][1] - c["byte_range"][0])
            if st.sha256_bytes(old) != c["before_sha256"]:
                raise CheckpointChanged(f"{ckpt / c['file']}: tensor {c['name']} changed on disk while the job ran; "
                                "nothing was written, run again")

    if dry_run:
        unchanged_since_start()
        before, expected = hash_files(ckpt, files, writes)
        return {"written_to": None, "before": before, "expected": expected, "after": None}

    if out is None:
        proof = {}

        def hash_before():
            unchanged_since_start()
            proof["before"], proof["expected"] = hash_files(ckpt, files, writes)

        journal.patch_in_place(ckpt, writes, before_commit=hash_before)
        target = ckpt
    else:
        out = Path(out).resolve()
        unchanged_since_start()
        proof = dict(zip(("before", "expected"), hash_files(ckpt, files, writes)))
        tmp = journal.copy_checkpoint(ckpt, out)
        try:
            unchanged_since_start()  # the source did not change while it was copied
            journal.apply_writes(tmp, writes)
            journal.fsync_tree(tmp)
            journal.test_pause("out-written")
            if out.exists():
                out.rmdir()  # preflight allowed only an empty folder
            os.rename(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteFailed(f"--out {out}: writing the new checkpoint failed ({journal.os_error_text(e)}); nothing was written, "
                            f"{ckpt} is untouched") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        target = out
    proof["after"], _ = hash_files(target, files, desc="hashing result")
    proof["written_to"] = str(target)
    return proof
