"""Safetensors files: header parsing and validation, tensor byte ranges, hashing.

A safetensors file is: u64 little-endian header length N, N bytes of JSON header, then the data.
Header entries are {"dtype", "shape", "data_offsets": [begin, end]} with offsets relative to the
data start (8 + N); "__metadata__" is an optional string map. Tensors are found only through the
parsed, validated offsets; nothing assumes alignment, key order or padding.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


ITEM_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "C64": 8,
}


TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor's bytes are: `file` and absolute byte range [start, end)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    file: Path
    length: int  # N, the JSON header's byte length
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def read_header(path: Path) -> Header:
    """Parse and validate one safetensors file's header; raise UserError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise UserError(f"{path}: malformed safetensors file (header length {n} does not fit in {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    header = _parse_json(raw, f"{path}: malformed safetensors header")
    if not isinstance(header, dict):
        raise UserError(f"{path}: malformed safetensors header (not a JSON object)")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise UserError(f"{path}: malformed safetensors header (__metadata__ is not a string map)")

    if not all(_unicode(k) and (not isinstance(v, str) or _unicode(v)) for k, v in (metadata or {}).items()):
        raise UserError(f"{path}: malformed safetensors header (__metadata__ holds invalid Unicode)")
    data_start = 8 + n
    tensors = {}
    for name, entry in header.items():
        if not _unicode(name):
            raise UserError(f"{path}: malformed safetensors header (a tensor name is invalid Unicode)")
        tensors[name] = _tensor_info(path, name, entry, data_start)

    # Data must be covered exactly: sorted ranges contiguous from 0 to the end of the file.
    cursor = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != cursor:
            kind = "overlap" if info.start < cursor else "hole"
            raise UserError(f"{path}: malformed safetensors file ({kind} in the data before tensor {info.name!r})")
        cursor = info.end
    if cursor != size:
        raise UserError(
            f"{path}: truncated or malformed safetensors file (data ends at byte {cursor}, file has {size})"
        )
    return Header(path, n, tensors, metadata)


def _unicode(text: str) -> bool:
    """False for strings JSON escapes can make but UTF-8 cannot hold (lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parse_json(raw: bytes, what: str):
    """json.loads that ends in UserError for any bad input (bad UTF-8, bad JSON, huge numbers, deep nesting)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what} (not UTF-8)") from None
    except ValueError as e:  # JSONDecodeError, and ints over Python's digit limit
        raise UserError(f"{what} ({str(e)[:200]})") from None
    except RecursionError:
        raise UserError(f"{what} (JSON nested too deeply)") from None


def _tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    def bad(why):
        return UserError(f"{path}: malformed safetensors header (tensor {name[:80]!r}: {why})")

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad("missing dtype")
    if dtype not in ITEM_SIZES:
        raise bad(f"unknown dtype {dtype[:40]!r}")
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**48 for d in shape)):
        raise bad(f"bad shape {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and 0 <= o < 2**62 for o in offsets)):
        raise bad(f"bad data_offsets {str(offsets)[:80]}")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets {offsets} run backwards")
    # Python ints cannot overflow (2**48 dims multiply exactly); stop multiplying once past the
    # range, so a header of millions of huge dims costs no big-number work
    numel = 0 if 0 in shape else 1
    for d in shape if numel else ():
        numel *= d
        if numel * ITEM_SIZES[dtype] > end - begin:
            break
    if numel * ITEM_SIZES[dtype] != end - begin:
        raise bad(f"{end - begin} bytes for {dtype} shape {str(shape)[:80]}")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from the shard index or the single file."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise UserError(f"{ckpt}: not a folder (expected a Hugging Face checkpoint folder)")
    if not (ckpt / "config.json").is_file():
        raise UserError(f"{ckpt}: no config.json: not a Hugging Face checkpoint folder")
    index = ckpt / INDEX_FILE
    if index.is_file():
        weight_map = _weight_map(index)
        names = sorted(set(weight_map.values()))
        files = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise UserError(f"{index}: shard {name!r} is not a .safetensors file in the checkpoint folder")
            if not (ckpt / name).is_file():
                raise UserError(f"{index}: lists shard {name}, which is missing")
            files.append(ckpt / name)
        return files
    if (ckpt / SINGLE_FILE).is_file():
        return [ckpt / SINGLE_FILE]
    if any(p.suffix in PICKLE_SUFFIXES for p in ckpt.iterdir()):
        raise UserError(
            f"{ckpt}: holds only pickle weights (.bin/.pt), which fastunlearn refuses to load; "
            "convert the checkpoint to safetensors first"
        )
    raise UserError(f"{ckpt}: no {SINGLE_FILE} or {INDEX_FILE}: not a safetensors checkpoint")


def read_checkpoint(ckpt: Path) -> dict[str, TensorInfo]:
    """All stored tensors of a checkpoint, by stored name, every shard's header validated."""
    ckpt = Path(ckpt)
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(ckpt):
        for name, info in read_header(path).tensors.items():
            if name in tensors:
                raise UserError(f"{ckpt}: tensor {name[:80]!r} is stored twice ({tensors[name].file.name}, {path.name})")
            tensors[name] = info
    index = ckpt / INDEX_FILE
    if index.is_file():
        weight_map = _weight_map(index)
        for name, info in tensors.items():
            if weight_map.get(name) != info.file.name:
                raise UserError(f"{index}: says {name[:80]!r} is in {weight_map.get(name)}, but it is in {info.file.name}")
    return tensors


def _weight_map(index: Path) -> dict[str, str]:
    try:
        if index.stat().st_size > MAX_HEADER_BYTES:
            raise UserError(f"{index}: shard index larger than {MAX_HEADER_BYTES} bytes")
        raw = index.read_bytes()
    except OSError as e:
        raise UserError(f"{index}: cannot read ({e.strerror})") from None
    obj = _parse_json(raw, f"{index}: malformed shard index")
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: malformed shard index (no weight_map of tensor name -> file name)")
    return weight_map


def read_bytes(info: TensorInfo) -> bytes:
    with open(info.file, "rb") as f:
        f.seek(info.start)
        data = f.read(info.end - info.start)
    if len(data) != info.end - info.start:
        raise UserError(f"{info.file}: truncated while reading {info.name}")
    return data


def bytes_to_tensor(data: bytes, dtype: str, shape) -> torch.Tensor:
    if dtype not in TORCH_DTYPES:
        raise UserError(f"stored dtype {dtype} is not supported for projector tensors (F32, F16, BF16 are)")
    if not data:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[dtype]).reshape(shape)


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_tensor(info: TensorInfo) -> torch.Tensor:
    return bytes_to_tensor(read_bytes(info), info.dtype, info.shape)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return h.hexdigest()


def file_stamp(path: Path) -> tuple[int, int, int]:
    """(size, mtime_ns, inode): changes when another tool rewrites the file."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise UserError(f"{path}: shorter than expected (changed on disk?); nothing was written")
    return data
