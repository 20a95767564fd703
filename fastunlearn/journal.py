"""Crash-safe writes into a checkpoint folder: the lock, the redo journal, atomic files, copies.

In-place patching overwrites only the byte ranges of changed tensors (same dtype and shape), so
its writes are proportional to the projector, never to the checkpoint. It is crash-safe through a
redo journal: the new bytes are written to `.fastunlearn-journal.tmp`, fsynced, renamed to
`.fastunlearn-journal` (the commit point), then written into place, and the journal is removed.
`recover()`, run by every command before it reads a checkpoint, replays a committed journal and
drops an uncommitted one, so a killed run leaves the old checkpoint or (after replay) the new one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

from .errors import CheckpointBusy, UserError, WriteFailed
from .safetensors_io import read_range, sha256_bytes

JOURNAL = ".fastunlearn-journal"


JOURNAL_MAGIC = b"FASTUNLEARN-JOURNAL-1\n"


_held: dict[str, int] = {}  # folders this process has locked -> nesting depth


def test_pause(phase: str) -> None:
    """Test hook, inert unless FASTUNLEARN_TEST_PAUSE_AT is `phase` or `phase:SECONDS`: say so on
    stderr and sleep (default 60 s), so a fault-injection test can SIGKILL the process right here."""
    spec = os.environ.get("FASTUNLEARN_TEST_PAUSE_AT")
    if spec and spec.split(":")[0] == phase:
        print(f"fastunlearn-test: paused at {phase}", file=sys.stderr, flush=True)
        time.sleep(float(spec.split(":")[1]) if ":" in spec else 60)


@contextlib.contextmanager
def locked(ckpt: Path):
    """Exclusive lock on the checkpoint folder itself (flock on the directory: no file is added).
    Re-entrant within one process, so a job can hold it from start to end and patch under it."""
    key = str(Path(ckpt).resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = os.open(ckpt, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointBusy(f"{ckpt}: checkpoint is busy: another fastunlearn job is writing it; retry when it ends") from None
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_journal(writes: list[tuple[str, int, bytes]]) -> bytes:
    entries = [{"file": rel, "offset": off, "length": len(data)} for rel, off, data in writes]
    payload = b"".join(data for _, _, data in writes)
    head = json.dumps({"entries": entries, "payload_sha256": sha256_bytes(payload)}).encode()
    return JOURNAL_MAGIC + struct.pack("<Q", len(head)) + head + payload


def _decode_journal(blob: bytes) -> list[tuple[str, int, bytes]] | None:
    """The journal's writes, or None when it is not a complete, intact journal."""
    m = len(JOURNAL_MAGIC)
    if blob[:m] != JOURNAL_MAGIC or len(blob) < m + 8:
        return None
    (n,) = struct.unpack("<Q", blob[m : m + 8])
    try:
        head = json.loads(blob[m + 8 : m + 8 + n])
    except (ValueError, RecursionError):
        return None
    payload = blob[m + 8 + n :]
    if not isinstance(head, dict) or sha256_bytes(payload) != head.get("payload_sha256"):
        return None
    writes, pos = [], 0
    try:
        for e in head["entries"]:
            if Path(e["file"]).name != e["file"]:  # only files directly in the checkpoint folder
                return None
            writes.append((e["file"], int(e["offset"]), payload[pos : pos + e["length"]]))
            pos += e["length"]
    except (KeyError, TypeError, ValueError):
        return None
    return writes


def _write_at(f, offset: int, data: bytes) -> None:
    f.seek(offset)
    f.write(data)


def apply_writes(ckpt: Path, writes: list[tuple[str, int, bytes]]) -> None:
    by_file: dict[str, list[tuple[int, bytes]]] = {}
    for rel, off, data in writes:
        by_file.setdefault(rel, []).append((off, data))
    first = True
    for rel, ranges in by_file.items():
        with open(ckpt / rel, "r+b") as f:
            for off, data in ranges:
                if not first:
                    test_pause("mid-write")
                first = False
                _write_at(f, off, data)
            f.flush()
            os.fsync(f.fileno())


def os_error_text(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full"
    return e.strerror or str(e)


def recover(ckpt: Path) -> bool:
    """Finish or drop an interrupted patch. Returns True when a committed journal was replayed."""
    ckpt = Path(ckpt)
    journal, tmp = ckpt / JOURNAL, ckpt / (JOURNAL + ".tmp")
    if not journal.exists() and not tmp.exists():
        return False
    if not os.access(ckpt, os.W_OK):
        raise UserError(f"{ckpt}: an interrupted fastunlearn patch must be finished, but the folder is read-only")
    with locked(ckpt):
        replayed = False
        if journal.exists():
            writes = _decode_journal(journal.read_bytes())
            if writes is None:
                raise UserError(f"{journal}: damaged journal; restore the checkpoint from a copy")
            try:
                apply_writes(ckpt, writes)
            except OSError as e:
                raise UserError(f"{ckpt}: cannot finish an interrupted patch ({os_error_text(e)}); fix that and run again") from None
            replayed = True
            journal.unlink()
        if tmp.exists():  # never committed: the checkpoint was not touched
            tmp.unlink()
        _fsync_dir(ckpt)
        return replayed


def patch_in_place(ckpt: Path, writes: list[tuple[str, int, bytes]], before_commit=None) -> None:
    """Overwrite byte ranges (file relative to ckpt, absolute offset, new bytes), crash-safely.

    `before_commit` is called under the lock just before the journal is committed (the job uses it
    to check that no other tool changed the files since it read them).

    A crash (kill, power loss) anywhere leaves the old bytes (journal not committed) or the new
    ones (`recover` replays the committed journal). An I/O error leaves the checkpoint as it was
    and raises UserError: before the commit point nothing was touched; after it, the old bytes
    (read before committing) are written back; if even that fails, the committed journal stays
    and the next fastunlearn command finishes the patch.
    """
    ckpt = Path(ckpt)
    journal, tmp = ckpt / JOURNAL, ckpt / (JOURNAL + ".tmp")
    with locked(ckpt):
        if before_commit is not None:
            before_commit()
        old = [(rel, off, read_range(ckpt / rel, off, len(data))) for rel, off, data in writes]
        try:
            with open(tmp, "wb") as f:
                test_pause("journal")
                f.write(_encode_journal(writes))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise WriteFailed(f"{ckpt}: cannot write the patch journal ({os_error_text(e)}); the checkpoint is unchanged") from None
        os.replace(tmp, journal)  # commit point
        _fsync_dir(ckpt)
        test_pause("committed")
        try:
            apply_writes(ckpt, writes)
        except OSError as e:
            _roll_back(ckpt, old, e)
        test_pause("written")
        journal.unlink()
        _fsync_dir(ckpt)


def _roll_back(ckpt: Path, old: list[tuple[str, int, bytes]], error: OSError):
    """A write after the commit point failed: put the old bytes back and drop the journal."""
    try:
        apply_writes(ckpt, old)
        (ckpt / JOURNAL).unlink()
        _fsync_dir(ckpt)
    except OSError:
        raise WriteFailed(
            f"{ckpt}: writing the patch failed ({os_error_text(error)}) and so did undoing it; the checkpoint is mid-patch, "
            f"kept consistent by {JOURNAL}: fix the disk, then any fastunlearn command on it finishes the patch"
        ) from None
    raise WriteFailed(f"{ckpt}: writing the patch failed ({os_error_text(error)}); the old bytes were put back, "
                    "the checkpoint is unchanged") from None


def write_file_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a checkpoint folder to a hidden temporary sibling of `dst`; the caller renames it.
    Symlinks are copied as the files they point to; a failed copy leaves nothing behind."""
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(JOURNAL, JOURNAL + ".tmp"))
    except (OSError, shutil.Error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = os_error_text(e) if isinstance(e, OSError) else "some files could not be copied"
        raise UserError(f"--out {dst}: cannot copy the checkpoint ({why}); nothing was written") from None
    return tmp


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
